"""Seeds derived from several integers, so every random draw of a run is a pure function of its position.

Data order depends on ``(seed, epoch)``, a sample's augmentation on ``(seed, epoch, index)``, a step's noise,
timesteps and dropout on ``(seed, step, micro-step, process)``. Nothing depends on how many draws happened before,
which is what makes a resumed run end with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np

__all__ = ["derive_seed"]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixing ``parts`` (numpy ``SeedSequence``); equal parts give equal seeds on every platform."""
    entropy = [int(p) % (1 << 32) for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))
