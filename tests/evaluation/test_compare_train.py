"""``compare --train``: one training config -> a masked and a vanilla run (same seed and steps) -> the comparison."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import yaml

from persam_dreambooth import testing as tiny
from persam_dreambooth.cli import compare as compare_cli
from persam_dreambooth.config import ConfigError
from persam_dreambooth.evaluation.train_compare import paired_train_configs

_MASK_KEYS = {"mask_source", "mask_dir", "reference_image", "reference_mask", "mask_method", "output_dir"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tiny.tiny_compare_workspace(tmp_path_factory.getbasetemp() / "shared-compare" / "workspace")


def _train_config(ws, path, **extra):
    cfg = {
        "pretrained_model_name_or_path": str(ws["sd"]), "instance_prompt": "a photo of sks dog", "resolution": 32,
        "max_train_steps": 50, "learning_rate": 1e-2, "report_to": "none", "mask_source": "persam",
        "reference_image": str(ws["instance"] / "00.jpg"), "reference_mask": str(ws["masked"] / "masks" / "00.png"),
        "sam_model_type": "tiny", "sam_checkpoint": str(ws["sam"]),
        "accept_masks": True,  # the tiny random SAM makes implausible masks; the review would stop the run
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _args(ws, train_config, out, *extra):
    parser = argparse.ArgumentParser()
    compare_cli.register(parser.add_subparsers())
    return parser.parse_args([
        "compare", "--train", "--train-config", str(train_config), "--max-train-steps", "2",
        "--instance_data_dir", str(ws["instance"]), "--class-noun", "dog", "--prompt-set", str(ws["prompts"]),
        "--num-images-per-prompt", "1", "--num-inference-steps", "2", "--dino-model", str(ws["dino"]),
        "--clip-model", str(ws["clip"]), "--device", "cpu", "--output-dir", str(out), *extra,
    ])


def test_train_then_compare_end_to_end(ws, tmp_path):
    out = tmp_path / "report"
    args = _args(ws, _train_config(ws, tmp_path / "train.yaml"), out)
    assert args.func(args) == 0
    masked = yaml.safe_load((out / "train" / "masked" / "config.resolved.yaml").read_text())
    vanilla = yaml.safe_load((out / "train" / "vanilla" / "config.resolved.yaml").read_text())
    assert masked["mask_source"] == "persam" and vanilla["mask_source"] == "none"
    assert masked["max_train_steps"] == vanilla["max_train_steps"] == 2  # --max-train-steps overrides the file
    assert masked["seed"] == vanilla["seed"] == 0
    same = {k for k in masked if k not in _MASK_KEYS and k != "_meta"}
    assert {k: masked[k] for k in same} == {k: vanilla[k] for k in same}  # the runs differ in the mask alone
    assert (out / "train" / "masked" / "masks" / "masks_grid.jpg").is_file()
    # same seed, steps and data: the weights differ because of the mask alone
    from safetensors.torch import load_file

    wm = load_file(out / "train" / "masked" / "pytorch_lora_weights.safetensors")
    wv = load_file(out / "train" / "vanilla" / "pytorch_lora_weights.safetensors")
    assert wm.keys() == wv.keys()
    assert any(not torch.equal(wm[k], wv[k]) for k in wm)
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["runs"]) == ["base", "masked", "vanilla"]
    assert metrics["runs"]["vanilla"]["mask_source"] == "none"
    assert metrics["models"]["sam"]["model_type"] == "tiny"  # from the training config
    assert metrics["reference"]["mask"] == str(out / "train" / "masked" / "masks" / "00.png")
    assert metrics["runs"]["masked"]["overall"]["background_leakage"] is not None
    assert (out / "report.html").is_file()

    # a rerun reuses both trainings (and every image)
    weights = out / "train" / "masked" / "pytorch_lora_weights.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert args.func(args) == 0
    assert weights.stat().st_mtime_ns == stamp
    # ... but refuses to mix in a run trained with other settings
    with pytest.raises(ValueError, match=r"already holds a run trained with other settings \(max_train_steps: 2 "
                                         r"there, 3 now\)"):
        args3 = _args(ws, tmp_path / "train.yaml", out)
        args3.max_train_steps = 3
        args3.func(args3)


def test_vanilla_only_config_is_rejected(ws, tmp_path):
    cfg = yaml.safe_load(_train_config(ws, tmp_path / "t.yaml").read_text())
    cfg["mask_source"] = "none"
    with pytest.raises(ConfigError, match="both runs would be vanilla"):
        paired_train_configs(cfg, tmp_path / "out", instance_data_dir=str(ws["instance"]))
    assert not (tmp_path / "out").exists()


def test_paired_configs_share_everything_but_the_mask(ws, tmp_path):
    cfg = yaml.safe_load(_train_config(ws, tmp_path / "t.yaml", seed=None).read_text())
    pair = paired_train_configs(cfg, tmp_path / "out", instance_data_dir=str(ws["instance"]), max_train_steps=7,
                                seed=11)
    assert pair["masked"].seed == pair["vanilla"].seed == 11 and pair["vanilla"].max_train_steps == 7
    assert pair["vanilla"].reference_image is None and pair["vanilla"].mask_source == "none"
    assert pair["masked"].output_dir == str(tmp_path / "out" / "train" / "masked")


def test_missing_metric_model_fails_before_training(ws, tmp_path):
    out = tmp_path / "report"
    args = _args(ws, _train_config(ws, tmp_path / "train.yaml"), out, "--dino-model", "missing/dino")
    with pytest.raises(RuntimeError, match=r"--dino-model missing/dino"):
        args.func(args)
    assert not (out / "train").exists()
    assert not out.exists(), "nothing written, not even the folder's lock file"


def test_finished_run_matches_settings_the_trainer_resolved_at_run_time(ws, tmp_path):
    """The trainer records what it ran with (``mixed_precision: no`` for a null in the config): still a match."""
    from persam_dreambooth.config import to_dict
    from persam_dreambooth.evaluation.train_compare import _training_to_do

    cfg = yaml.safe_load(_train_config(ws, tmp_path / "t.yaml").read_text())
    pair = paired_train_configs(cfg, tmp_path / "out", instance_data_dir=str(ws["instance"]))
    run = pair["vanilla"]
    folder = tmp_path / "out" / "train" / "vanilla"
    folder.mkdir(parents=True)
    assert _training_to_do(run) is not None  # no weights yet
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"")
    stored = {**to_dict(run), "mixed_precision": "no", "_meta": {"versions": {}}}
    (folder / "config.resolved.yaml").write_text(yaml.safe_dump(stored), encoding="utf-8")
    assert run.mixed_precision is None and _training_to_do(run) is None
    with pytest.raises(ValueError, match=r"other settings \(mixed_precision: 'no' there, 'bf16' now\)"):
        _training_to_do(run.replace(mixed_precision="bf16"))
    with pytest.raises(ValueError, match=r"other settings \(rank: "):
        _training_to_do(run.replace(rank=run.rank + 1))


def test_interrupted_training_resumes_from_its_latest_checkpoint(ws, tmp_path, caplog):
    """compare --train killed between two checkpoints of the masked run: the rerun resumes it (no restart at step 0)
    and keeps the finished vanilla run; an unfinished run with other settings is refused."""
    import logging

    from safetensors.torch import load_file

    out = tmp_path / "report"
    args = _args(ws, _train_config(ws, tmp_path / "train.yaml", checkpointing_steps=1), out)
    assert args.func(args) == 0
    masked = out / "train" / "masked"
    weights = masked / "pytorch_lora_weights.safetensors"
    finished = load_file(weights)
    vanilla_stamp = (out / "train" / "vanilla" / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
    # as if killed after checkpoint-1: no final weights, no checkpoint-2
    import shutil

    weights.unlink()
    shutil.rmtree(masked / "checkpoint-2")
    assert [p.name for p in masked.glob("checkpoint-*")] == ["checkpoint-1"]
    with caplog.at_level(logging.INFO):
        assert args.func(args) == 0
    text = caplog.text
    assert "Resuming the unfinished run" in text and "from checkpoint-1" in text
    assert f"Resuming from {masked / 'checkpoint-1'}" in text  # the trainer loaded the checkpoint
    resumed = load_file(weights)
    assert resumed.keys() == finished.keys()
    for key in finished:
        torch.testing.assert_close(resumed[key], finished[key])  # same weights as the uninterrupted run
    assert (out / "train" / "vanilla" / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == vanilla_stamp
    # an unfinished run trained with other settings is not resumed
    weights.unlink()
    args3 = _args(ws, tmp_path / "train.yaml", out)
    args3.max_train_steps = 3
    with pytest.raises(ValueError, match=r"already holds an unfinished run trained with other settings "
                                         r"\(max_train_steps: 2 there, 3 now\)"):
        args3.func(args3)
