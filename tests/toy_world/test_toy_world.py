"""The toy-world leakage benchmark's machinery on a reduced setting (issue 13): world, base-model training, the
detector and scorer, and one trainer + ``generate`` pass through ``accelerate launch`` / the CLI.

Nothing here asserts the size of the masked-vs-vanilla effect: that is the benchmark's job
(``benchmarks/toy_world/README.md``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from toy_world import world  # noqa: E402
from toy_world.base_model import BaseConfig, base_model, write_world_tokenizer  # noqa: E402
from toy_world.detector import DetectorConfig, load_detector  # noqa: E402
from toy_world.experiment import ExperimentConfig, degrade, run_experiment, train_command  # noqa: E402
from toy_world.report import background_table, figure, table  # noqa: E402
from toy_world.scoring import reference_hist, score_images  # noqa: E402

TINY_BASE = BaseConfig(n_images=64, vae_channels=(8, 16), vae_steps=3, vae_batch=8, unet_channels=(8, 16),
                       text_dim=16, unet_steps=3, unet_batch=8)
SMALL_DETECTOR = DetectorConfig(steps=120, batch=32, width=8, pool_size=600)


@pytest.fixture(scope="module")
def detector():
    model, info = load_detector(SMALL_DETECTOR)
    return model, info


def test_world_is_deterministic_with_exact_masks():
    a, b = world.world_samples(6, seed=3), world.world_samples(6, seed=3)
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0].image, world.world_samples(6, seed=4)[0].image)
    for s in a + world.subject_samples(3):
        assert s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8 and s.mask.shape == (32, 32)
        assert 30 < s.mask.sum() < 32 * 32 / 2
        assert s.caption.split()[-2:] == ["on", s.background]
    assert world.subject_samples(3)[0].caption == "a sks square on stripes"
    with pytest.raises(ValueError, match="background kind must be one of"):
        world.background("clouds", np.random.default_rng(0))


def test_tokenizer_has_one_token_per_world_word(tmp_path):
    tok = write_world_tokenizer(tmp_path)
    ids = tok("a sks square on grass").input_ids
    assert len(ids) == 7 and tok.unk_token_id not in ids[1:-1]
    assert len(set(ids[1:-1])) == 5


def test_degraded_masks_err_the_expected_way():
    cfg = ExperimentConfig()
    rng = np.random.default_rng(0)
    for s in world.subject_samples(3):
        dil, ero, part = (degrade(s.mask, v, cfg, rng) for v in ("dilated", "eroded", "partial"))
        assert (dil >= s.mask).all() and dil.sum() > s.mask.sum()
        assert (ero <= s.mask).all() and ero.sum() < s.mask.sum()
        assert (part <= s.mask).all() and 0.3 * s.mask.sum() < part.sum() < 0.9 * s.mask.sum()
        assert np.array_equal(degrade(s.mask, "exact", cfg, rng), s.mask)


def test_scorer_ranks_known_cases(detector):
    model, info = detector
    assert info["clean_acc_background"] > 0.9
    train = world.subject_samples(5)
    ref = reference_hist(train)
    other = [f"a sks square on {bg}" for bg in ("dots", "sky", "grass")]
    # the training images themselves, asked on other backgrounds: full leakage, no prompt fidelity
    leaked = score_images(model, np.stack([s.image for s in train for _ in other]), other * 5, ref).summary()
    assert leaked["leakage"] == 1.0 and leaked["prompt_fidelity"] == 0.0
    # the subject rendered exactly where asked: no leakage, full prompt fidelity
    rng = np.random.default_rng(5)
    clean = [world.render("square", "subject", p.split()[-1], rng) for p in other for _ in range(3)]
    prompts = [p for p in other for _ in range(3)]
    ideal = score_images(model, np.stack([s.image for s in clean]), prompts, ref).summary()
    assert ideal["leakage"] == 0.0 and ideal["prompt_fidelity"] == 1.0
    # a plain-coloured square on the asked background: not the subject
    plain = [world.render("square", "red", p.split()[-1], rng) for p in prompts]
    wrong = score_images(model, np.stack([s.image for s in plain]), prompts, ref).summary()
    assert ideal["subject_fidelity"] > 0.6 > 0.2 > wrong["subject_fidelity"]


def test_train_commands_are_the_users_commands(tmp_path):
    cfg = ExperimentConfig(launcher="accelerate")
    vanilla = train_command(tmp_path / "base", tmp_path, "vanilla", 1, tmp_path / "out", cfg)
    masked = train_command(tmp_path / "base", tmp_path, "dilated", 1, tmp_path / "out", ExperimentConfig())
    assert masked[:2] == ["persam-dreambooth", "train"]
    assert vanilla[1:3] == ["-m", "accelerate.commands.launch"] and vanilla[vanilla.index("--seed") + 1] == "1"
    assert vanilla[-2:] == ["--mask_source", "none"] and "--mask_dir" not in vanilla
    assert masked[-2:] == ["--mask_dir", str(tmp_path / "masks_dilated")] and "--mask_source" not in masked


def test_experiment_end_to_end_reduced(tmp_path, detector):
    """Tiny base model trained for 3 steps, then masked DreamBooth through `accelerate launch` (the benchmark's
    default is `persam-dreambooth train`, same flags),
    `persam-dreambooth generate` of the base and the run, scoring, table and figure."""
    folder = base_model(TINY_BASE)
    assert (folder / "model_index.json").is_file() and base_model(TINY_BASE) == folder  # cached
    cfg = ExperimentConfig(seeds=(0,), variants=("exact",), train_steps=2, num_images=2,
                           inference_steps=2, base_prompt_images=0, base=TINY_BASE, detector=SMALL_DETECTOR,
                           launcher="accelerate")
    results = run_experiment(tmp_path, cfg)
    assert json.loads((tmp_path / "results.json").read_text())["runs"].keys() == {"base", "exact"}
    for arm, seed in (("base", "-"), ("exact", "0")):
        s = results["runs"][arm][seed]
        assert s["n"] == 6 and 0.0 <= s["leakage"] <= 1.0 and 0.0 <= s["subject_fidelity"] <= 1.0
    resolved = yaml.safe_load((tmp_path / "runs" / "exact-s0" / "config.resolved.yaml").read_text())
    assert resolved["mask_dir"] == str(tmp_path / "data" / "masks_exact") and resolved["max_train_steps"] == 2
    assert len(list((tmp_path / "runs" / "exact-s0" / "masks").glob("*.png"))) == 5
    assert results["known_cases"]["training_images"]["leakage"] == 1.0
    assert results["known_cases"]["clean_renders"]["leakage"] == 0.0
    assert "| exact | 1 |" in table(results) and "| exact |" in background_table(results)
    assert sum(results["runs"]["exact"]["0"]["detected_backgrounds"].values()) == pytest.approx(1.0)
    assert figure(tmp_path, results).is_file()
