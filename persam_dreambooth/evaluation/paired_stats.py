"""Is a difference between two runs real? Paired differences, bootstrap confidence intervals and a verdict.

Every run is generated with the same prompts and seeds, so image ``(prompt p, seed s)`` of run A and of run B start
from the same noise: the two scores form a **pair**, and the difference ``A - B`` of a pair removes what the prompt and
the seed contribute to both. The reported difference is the mean over all pairs (images where either run has no
value, e.g. masked DINO where PerSAM found no subject, are left out).

**The bootstrap scheme** (two-stage, "prompts, then seeds within them"): one resample draws as many prompts as there
are, with replacement; for each drawn prompt it draws as many of that prompt's paired images (seeds) as it has, with
replacement; the statistic is the mean difference over the drawn images. The prompts are resampled because they are
the population the conclusion is about (another 25 prompts would give other numbers); the seeds are nested within
them because images of one prompt are alike. :data:`DEFAULT_RESAMPLES` resamples from a ``numpy`` generator seeded
with :data:`DEFAULT_SEED` (``compare --bootstrap-resamples/--bootstrap-seed``) give the percentile interval at
:data:`CONFIDENCE`, so the same scores always give the same interval.

**The verdict** at that level: ``"better"`` or ``"worse"`` when the interval excludes 0, in the metric's own
direction (background leakage: lower is better), else ``"no clear difference"``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "CONFIDENCE",
    "DEFAULT_RESAMPLES",
    "DEFAULT_SEED",
    "WIDE_HALF_WIDTH",
    "Verdict",
    "Difference",
    "paired_differences",
    "bootstrap_interval",
    "verdict",
    "difference",
    "compare_pair",
    "run_pairs",
    "scheme",
]

CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
WIDE_HALF_WIDTH = 0.01
"""An interval wider than ±0.01 (cosine similarity) is "wide": it cannot tell apart differences of the size that
separate methods in published DreamBooth tables (CLIP-T differences there are a few hundredths)."""

Verdict = Literal["better", "worse", "no clear difference"]


@dataclass(frozen=True)
class Difference:
    """The paired difference ``run - against`` of one metric, with its interval and verdict.

    Attributes:
        difference: mean over the paired images.
        low, high: the bootstrap confidence interval (``None`` with fewer than 2 pairs).
        verdict: ``better`` / ``worse`` / ``no clear difference`` in the metric's direction.
        n_prompts, n_pairs: how many prompts and paired images the difference rests on.
        spread: what dominates the interval's width: ``"prompts"`` (the prompts disagree) or ``"seeds"`` (images of
            one prompt disagree); ``None`` when it cannot be told (one prompt or one seed each).
    """

    difference: float
    low: float | None
    high: float | None
    verdict: Verdict
    n_prompts: int
    n_pairs: int
    spread: Literal["prompts", "seeds"] | None = None

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ci"] = None if self.low is None else [self.low, self.high]
        out["width"] = None if self.low is None or self.high is None else self.high - self.low
        del out["low"], out["high"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Difference:
        ci = data.get("ci") or (None, None)
        return cls(difference=data["difference"], low=ci[0], high=ci[1], verdict=data["verdict"],
                   n_prompts=data["n_prompts"], n_pairs=data["n_pairs"], spread=data.get("spread"))


def paired_differences(
    rows_a: Sequence[Mapping[str, Any]], rows_b: Sequence[Mapping[str, Any]], metric: str,
    prompt_indices: Collection[int] | None = None,
) -> dict[int, np.ndarray]:
    """``metric`` of A minus B for every image both runs have a value for, grouped by prompt.

    Args:
        rows_a, rows_b: per-image score rows (``prompt_index``, ``seed``, the metrics), as ``score_run`` returns.
        metric: the metric key.
        prompt_indices: only these prompts (a prompt group); all when ``None``.

    Returns:
        ``{prompt_index: (S_p,) float64 differences, ordered by seed}``; prompts without a pair are absent.
    """
    b_by_key = {(r["prompt_index"], r["seed"]): r.get(metric) for r in rows_b}
    out: dict[int, list[tuple[int, float]]] = {}
    for r in rows_a:
        p = r["prompt_index"]
        if prompt_indices is not None and p not in prompt_indices:
            continue
        a, b = r.get(metric), b_by_key.get((p, r["seed"]))
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            continue
        out.setdefault(p, []).append((r["seed"], float(a) - float(b)))
    return {p: np.array([d for _, d in sorted(pairs)], dtype=np.float64) for p, pairs in sorted(out.items())}


def bootstrap_interval(
    by_prompt: Sequence[np.ndarray], *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile interval of the mean over all values, resampling prompts and, within each, its values.

    Args:
        by_prompt: P arrays, one per prompt, of its paired differences (at least one value each).
        resamples: bootstrap resamples B.
        seed: seed of the ``numpy`` generator (same inputs and seed -> same interval).
        confidence: the interval's level.

    Returns:
        ``(low, high)``.
    """
    groups = [np.asarray(g, dtype=np.float64) for g in by_prompt if len(g)]
    if not groups:
        raise ValueError("`by_prompt` must hold at least one value.")
    sizes = np.array([len(g) for g in groups])  # (P,)
    table = np.zeros((len(groups), sizes.max()))  # (P, S_max), padded with zeros
    for p, g in enumerate(groups):
        table[p, : len(g)] = g
    rng = np.random.default_rng(seed)
    n_prompts, s_max = table.shape
    prompts = rng.integers(0, n_prompts, size=(resamples, n_prompts))  # (B, P): the drawn prompts
    n = sizes[prompts]  # (B, P): how many values each drawn prompt has
    picks = np.floor(rng.random((resamples, n_prompts, s_max)) * n[..., None]).astype(np.int64)  # (B, P, S_max)
    values = table[prompts[..., None], picks]  # (B, P, S_max)
    used = np.arange(s_max) < n[..., None]  # (B, P, S_max): a prompt with S_p values draws S_p of them
    means = (values * used).sum(axis=(1, 2)) / used.sum(axis=(1, 2))  # (B,)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def verdict(low: float | None, high: float | None, lower_is_better: bool = False) -> Verdict:
    """``better`` / ``worse`` when the interval excludes 0 (in the metric's direction), else no clear difference."""
    if low is None or high is None or low <= 0 <= high:
        return "no clear difference"
    higher = low > 0
    return "better" if higher != lower_is_better else "worse"


def _spread(by_prompt: Sequence[np.ndarray]) -> Literal["prompts", "seeds"] | None:
    """Which part of the variance of the mean is larger: between prompts, or between the seeds of a prompt."""
    multi = [g for g in by_prompt if len(g) > 1]
    if len(by_prompt) < 2 or not multi:
        return None
    within = float(np.mean([g.var(ddof=1) for g in multi]))  # seed-to-seed variance
    per_prompt = float(np.var([g.mean() for g in by_prompt], ddof=1))  # variance of prompt means
    mean_seeds = float(np.mean([len(g) for g in by_prompt]))
    # per_prompt holds within / S of seed noise; what is left is the prompts' own disagreement
    return "prompts" if per_prompt - within / mean_seeds > within / mean_seeds else "seeds"


def difference(
    by_prompt: Mapping[int, np.ndarray], *, lower_is_better: bool = False, resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED, confidence: float = CONFIDENCE,
) -> Difference | None:
    """The :class:`Difference` of paired differences grouped by prompt; ``None`` when there is no pair."""
    groups = [g for g in by_prompt.values() if len(g)]
    n_pairs = sum(len(g) for g in groups)
    if n_pairs == 0:
        return None
    mean = float(np.concatenate(groups).mean())
    if n_pairs < 2:
        return Difference(mean, None, None, "no clear difference", len(groups), n_pairs)
    low, high = bootstrap_interval(groups, resamples=resamples, seed=seed, confidence=confidence)
    return Difference(mean, low, high, verdict(low, high, lower_is_better), len(groups), n_pairs, _spread(groups))


def compare_pair(
    rows_a: Sequence[Mapping[str, Any]], rows_b: Sequence[Mapping[str, Any]], metrics: Sequence[str],
    lower_is_better: Collection[str], groups: Mapping[str, Collection[int]], *, resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Run A against run B: ``{"overall": {metric: Difference dict}, "groups": {group: {metric: ...}}}``.

    Metrics without any pair (e.g. background metrics that are off) are left out.
    """

    def table(prompts: Collection[int] | None) -> dict[str, Any]:
        out = {}
        for m in metrics:
            diff = difference(paired_differences(rows_a, rows_b, m, prompts), lower_is_better=m in lower_is_better,
                              resamples=resamples, seed=seed)
            if diff is not None:
                out[m] = diff.to_dict()
        return out

    return {"overall": table(None), "groups": {g: table(p) for g, p in groups.items()}}


def run_pairs(run_names: Sequence[str], base: str) -> list[tuple[str, str]]:
    """The comparisons a report shows: each trained run against the base model, then each pair of trained runs in
    the order given (``masked`` before ``vanilla`` -> ``masked - vanilla``)."""
    trained = [n for n in run_names if n != base]
    return [(n, base) for n in trained] + [
        (a, b) for i, a in enumerate(trained) for b in trained[i + 1:]
    ]


def scheme(resamples: int, seed: int) -> dict[str, Any]:
    """How the intervals were made, as recorded in ``metrics.json``."""
    return {
        "method": "paired two-stage bootstrap: resample prompts with replacement, then within each drawn prompt its "
                  "paired images (seeds) with replacement; statistic: mean paired difference; percentile interval",
        "confidence": CONFIDENCE,
        "resamples": resamples,
        "seed": seed,
        "wide_half_width": WIDE_HALF_WIDTH,
        "verdict": "better / worse when the interval excludes 0 (in the metric's direction; background leakage: "
                   "lower is better), else no clear difference",
    }
