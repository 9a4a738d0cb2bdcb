"""Paired bootstrap intervals and verdicts: coverage, identical runs, constant shifts, pairing, direction."""

from __future__ import annotations

import numpy as np
import pytest

from persam_dreambooth.evaluation.paired_stats import (
    Difference,
    bootstrap_interval,
    compare_pair,
    difference,
    paired_differences,
    run_pairs,
    verdict,
)


def _rows(scores: np.ndarray, metric: str = "dino", seed0: int = 0) -> list[dict]:
    """Score rows as ``score_run`` returns them, from a ``(P, S)`` table (prompt p, image i with seed seed0 + i)."""
    return [{"prompt_index": p, "image_index": i, "seed": seed0 + i, metric: float(scores[p, i])}
            for p in range(scores.shape[0]) for i in range(scores.shape[1])]


def _table(rng: np.random.Generator, prompts: int = 25, seeds: int = 4, prompt_sd: float = 0.05,
           seed_sd: float = 0.02) -> np.ndarray:
    """``(P, S)`` scores: a prompt effect shared by the seeds of a prompt, plus per-image noise."""
    return 0.6 + rng.normal(0, prompt_sd, (prompts, 1)) + rng.normal(0, seed_sd, (prompts, seeds))


def test_coverage_of_a_known_true_difference():
    """200 simulated comparisons (25 prompts x 4 seeds) with a true mean difference of 0.01: the 95% interval covers
    it in about 95% of them (loose bound 0.88-0.99)."""
    rng = np.random.default_rng(2026)
    true, covered = 0.01, 0
    for k in range(200):
        a = _table(rng)
        # B differs from A by the true difference plus a prompt-level and an image-level part of its own
        b = a - true + rng.normal(0, 0.03, (25, 1)) + rng.normal(0, 0.02, (25, 4))
        diff = difference(paired_differences(_rows(a), _rows(b), "dino"), resamples=1000, seed=k)
        covered += diff.low <= true <= diff.high
    assert 0.88 <= covered / 200 <= 0.99, covered / 200


def test_identical_runs_give_no_clear_difference():
    a = _rows(_table(np.random.default_rng(0)))
    diff = difference(paired_differences(a, a, "dino"))
    assert (diff.difference, diff.low, diff.high) == (0.0, 0.0, 0.0)
    assert diff.verdict == "no clear difference" and not diff.excludes_zero
    assert (diff.n_prompts, diff.n_pairs) == (25, 100)


@pytest.mark.parametrize(("shift", "lower_is_better", "expected"), [
    (0.004, False, "better"), (-0.004, False, "worse"),
    (-0.004, True, "better"), (0.004, True, "worse"),  # background leakage: lower is better
])
def test_a_constant_shift_is_a_clear_verdict_in_the_metrics_direction(shift, lower_is_better, expected):
    b = _table(np.random.default_rng(1))
    diff = difference(paired_differences(_rows(b + shift), _rows(b), "dino"), lower_is_better=lower_is_better)
    assert diff.difference == pytest.approx(shift)
    assert diff.low == pytest.approx(shift) and diff.high == pytest.approx(shift)
    assert diff.verdict == expected


def test_the_verdict_is_paired():
    """Better on every image by a margin far below the spread between prompts: still "better", because the pairs
    share their prompt and seed. Unpaired (the same scores with the seeds shuffled across prompts) it would not be."""
    rng = np.random.default_rng(7)
    b = _table(rng, prompt_sd=0.1, seed_sd=0.02)
    a = b + 0.005 + rng.normal(0, 0.002, b.shape)  # better everywhere, by 0.005 +- 0.002
    assert np.std(b.mean(axis=1)) > 10 * 0.005  # prompts differ by far more than the margin
    paired = difference(paired_differences(_rows(a), _rows(b), "dino"))
    assert paired.verdict == "better" and paired.low > 0
    # The same two score tables compared without pairing: prompt means of A against other prompts' of B.
    unpaired = difference(paired_differences(_rows(a), _rows(np.roll(b, 5, axis=0)), "dino"))
    assert unpaired.verdict == "no clear difference"
    assert unpaired.high - unpaired.low > 10 * (paired.high - paired.low)


def test_the_interval_is_reproducible_and_follows_its_seed():
    groups = list(_table(np.random.default_rng(3)) - 0.6)
    assert bootstrap_interval(groups, seed=4) == bootstrap_interval(groups, seed=4)
    assert bootstrap_interval(groups, seed=4) != bootstrap_interval(groups, seed=5)


def test_prompts_are_resampled_with_their_seeds_nested():
    """One prompt with all the spread between its seeds, the others constant: the interval reflects both levels."""
    only_seeds = [np.array([-1.0, 1.0])] * 10  # prompts agree, seeds do not
    lo, hi = bootstrap_interval(only_seeds, resamples=2000)
    assert lo < 0 < hi  # seed resampling within prompts is active
    only_prompts = [np.full(4, v) for v in np.linspace(-1, 1, 10)]  # seeds agree, prompts do not
    lo, hi = bootstrap_interval(only_prompts, resamples=2000)
    assert lo < 0 < hi  # prompt resampling is active
    assert difference(dict(enumerate(only_prompts))).spread == "prompts"
    assert difference(dict(enumerate(only_seeds))).spread == "seeds"


def test_pairs_match_prompt_and_seed_and_skip_missing_values():
    a = [{"prompt_index": 0, "seed": 1, "m": 0.5}, {"prompt_index": 0, "seed": 0, "m": 0.4},
         {"prompt_index": 1, "seed": 0, "m": None}, {"prompt_index": 2, "seed": 0, "m": 0.9}]
    b = [{"prompt_index": 0, "seed": 0, "m": 0.1}, {"prompt_index": 0, "seed": 1, "m": 0.2},
         {"prompt_index": 1, "seed": 0, "m": 0.3}, {"prompt_index": 2, "seed": 9, "m": 0.0}]
    pairs = paired_differences(a, b, "m")
    assert list(pairs) == [0] and pairs[0] == pytest.approx([0.3, 0.3])  # ordered by seed
    assert paired_differences(a, b, "m", prompt_indices={2}) == {}
    assert difference({}) is None
    single = difference({0: np.array([0.2])})
    assert single.low is None and single.verdict == "no clear difference"


def test_compare_pair_overall_and_per_group():
    b = _table(np.random.default_rng(5), prompts=6)
    rows_a, rows_b = _rows(b + 0.01), _rows(b)
    for r in rows_b:
        r["background_leakage"] = None  # a metric that was not computed is left out
    result = compare_pair(rows_a, rows_b, ["dino", "background_leakage"], {"background_leakage"},
                          {"g1": {0, 1, 2}, "g2": {3, 4, 5}}, resamples=500)
    assert set(result["overall"]) == {"dino"} and set(result["groups"]) == {"g1", "g2"}
    overall = Difference.from_dict(result["overall"]["dino"])
    assert overall.verdict == "better" and overall.n_pairs == 24
    assert result["groups"]["g2"]["dino"]["n_prompts"] == 3
    assert result["overall"]["dino"]["ci"] == [overall.low, overall.high]


def test_run_pairs_and_verdict():
    assert run_pairs(["base", "masked", "vanilla"], "base") == [
        ("masked", "base"), ("vanilla", "base"), ("masked", "vanilla")]
    assert verdict(0.001, 0.02) == "better" and verdict(-0.02, -0.001) == "worse"
    assert verdict(-0.01, 0.01) == "no clear difference" and verdict(0.0, 0.01) == "no clear difference"
    assert verdict(None, None) == "no clear difference"
