"""``compare`` as a careless user meets it (issue 10): read-only and locked output folders, non-finite floats, an
unavailable device, strict JSON, umask modes, and progress for the slow stages."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import stat
import typing

import pytest
from process_helpers import error_lines, run_cli

from persam_dreambooth import testing as tiny
from persam_dreambooth.cli import compare as compare_cli
from persam_dreambooth.evaluation.compare import compare
from persam_dreambooth.evaluation.compare_config import CompareCommandConfig
from persam_dreambooth.utils.locks import FolderLockedError, lock_output_dir


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tiny.tiny_compare_workspace(tmp_path_factory.getbasetemp() / "shared-compare" / "workspace")


@pytest.fixture(scope="module")
def report(tmp_path_factory, ws):
    return tiny.tiny_compare_report(tmp_path_factory.getbasetemp() / "shared-compare")


def _cli_args(ws, out) -> list[str]:
    return [
        "compare", "--runs", f"masked={ws['masked']}", f"vanilla={ws['vanilla']}",
        "--instance_data_dir", str(ws["instance"]), "--class-noun", "dog", "--prompt-set", str(ws["prompts"]),
        "--num-images-per-prompt", "2", "--num-inference-steps", "2", "--dino-model", str(ws["dino"]),
        "--clip-model", str(ws["clip"]), "--sam-model-type", "tiny", "--sam-checkpoint", str(ws["sam"]),
        "--device", "cpu", "--output-dir", str(out),
    ]


def test_read_only_output_is_refused_before_any_work(tmp_path):
    """Checked first: not even the run folders (here: missing) are looked at when nothing could be written."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        out = ro / "new"  # a new folder under a read-only parent (tests/test_reliability.py: both cases)
        done = run_cli(["compare", "--runs", f"a={tmp_path / 'no-run'}", "--instance_data_dir",
                        str(tmp_path / "no-photos"), "--class-noun", "dog", "--output-dir", str(out)],
                       unprivileged=True, timeout=120)
        assert done.returncode == 2, done.stderr
        errors = error_lines(done.stderr)
        assert len(errors) == 1, done.stderr
        assert errors[0].startswith("persam-dreambooth compare: error: `--output-dir`") and "not writable" in \
            errors[0], errors[0]
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_a_second_comparison_into_a_locked_folder_refuses_with_the_holders_pid(ws, tmp_path):
    out = tmp_path / "report"
    with lock_output_dir(out, "compare", "--output-dir"):
        done = run_cli(_cli_args(ws, out), tiny_sam=True, timeout=300)
        assert done.returncode == 2, done.stderr
        errors = error_lines(done.stderr)
        assert len(errors) == 1, done.stderr
        assert f"`--output-dir` {str(out)!r} is in use by another run (PID {os.getpid()}" in errors[0]
        assert "Loading the DINO model" not in done.stderr, "refused before loading anything"
        assert [p.name for p in out.iterdir()] == [".persam.lock"], "the refused run wrote nothing"


def _train_config(ws, path):
    import yaml

    path.write_text(yaml.safe_dump({
        "pretrained_model_name_or_path": str(ws["sd"]), "instance_prompt": "a photo of sks dog", "resolution": 32,
        "max_train_steps": 2, "report_to": "none", "mask_source": "persam",
        "reference_image": str(ws["instance"] / "00.jpg"), "reference_mask": str(ws["masked"] / "masks" / "00.png"),
        "sam_model_type": "tiny", "sam_checkpoint": str(ws["sam"]),
    }), encoding="utf-8")
    return path


def test_compare_train_holds_the_lock_before_training(ws, tmp_path):
    out = tmp_path / "report"
    parser = argparse.ArgumentParser()
    compare_cli.register(parser.add_subparsers())
    args = parser.parse_args([
        "compare", "--train", "--train-config", str(_train_config(ws, tmp_path / "train.yaml")),
        "--instance_data_dir", str(ws["instance"]), "--class-noun", "dog", "--prompt-set", str(ws["prompts"]),
        "--num-images-per-prompt", "1", "--num-inference-steps", "2", "--dino-model", str(ws["dino"]),
        "--clip-model", str(ws["clip"]), "--device", "cpu", "--output-dir", str(out),
    ])
    with lock_output_dir(out, "compare", "--output-dir"):  # a second open file description: refused like a process
        with pytest.raises(FolderLockedError, match=rf"`--output-dir` .* \(PID {os.getpid()}, persam-dreambooth "
                                                    r"compare\)"):
            args.func(args)
    assert [p.name for p in out.iterdir()] == [".persam.lock"], "no training started"


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "1e999"])
def test_every_float_option_refuses_non_finite_values_at_parse_time(bad, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="persam-dreambooth")
    compare_cli.register(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["compare"]
    flags = {a.dest: a.option_strings[0] for a in sub._actions if a.option_strings}
    hints = typing.get_type_hints(CompareCommandConfig)
    floats = [f.name for f in dataclasses.fields(CompareCommandConfig)
              if float in (hints[f.name], *typing.get_args(hints[f.name]))]
    assert sorted(floats) == ["guidance_scale", "lora_scale"]
    assert all(a.type is None for a in sub._actions if a.dest in ("config", "runs"))  # hand-added: no numbers
    for name in floats:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["compare", "--runs", "a=b", "--instance_data_dir", "x", "--class-noun", "dog",
                               "--output-dir", str(tmp_path / "r"), f"{flags[name]}={bad}"])
        assert exc.value.code == 2
        assert f"`{flags[name]}` must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_non_finite_float_on_the_command_line_writes_nothing(ws, tmp_path):
    out = tmp_path / "report"
    done = run_cli([*_cli_args(ws, out), "--lora-scale", "inf"], timeout=120)
    assert done.returncode == 2
    errors = error_lines(done.stderr)
    assert len(errors) == 1 and "`--lora-scale` must be a finite number, got 'inf'" in errors[0], done.stderr
    assert not out.exists()


def test_a_device_this_machine_lacks_is_refused_before_anything_is_written(ws, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "report"
    with pytest.raises(ValueError, match=r"^`--device` is 'cuda' but CUDA is not available"):
        compare(progress=False, **tiny.tiny_compare_kwargs(ws, out, device="cuda"))
    assert not out.exists()


def _reject_constant(name: str):
    raise ValueError(f"not strict JSON: {name}")


def test_every_json_written_is_strict(report):
    files = [*report.rglob("*.json"), *report.rglob("*.jsonl")]
    assert {p.name for p in files} >= {"metrics.json", "masked.json", "generation.jsonl"}
    for path in files:
        for chunk in (path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]):
            json.loads(chunk, parse_constant=_reject_constant)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_deliverables_get_the_umask_modes_and_slow_stages_show_progress(ws, tmp_path, umask, caplog):
    out = tmp_path / "report"
    old = os.umask(umask)
    try:
        with caplog.at_level(logging.INFO, logger="persam_dreambooth"):
            compare(progress=False, **tiny.tiny_compare_kwargs(ws, out))
    finally:
        os.umask(old)
    paths = [out, *out.rglob("*")]
    names = {p.relative_to(out).as_posix() for p in paths}
    assert names >= {"metrics.json", "metrics.md", "metrics.png", "report.html", "grids/p000.jpg", "scores/base.json",
                     "generations/masked/generation.jsonl", "generations/masked/images/p000_i00_s0.png"}, names
    for path in paths:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert _mode(path) == want, f"{path.relative_to(out)}: {oct(_mode(path))} != {oct(want)}"
    messages = [r.getMessage() for r in caplog.records]
    for start in ("Loading the DINO model", "Loading the CLIP model", "Loading SAM tiny", "Encoding the PerSAM "
                  "reference", "Embedding the 3 instance image(s)", "Loading the pipeline", "Report written to"):
        assert any(m.startswith(start) for m in messages), (start, messages)


def test_a_non_finite_metric_is_recorded_as_missing_and_the_score_file_stays_strict_json(tmp_path, caplog):
    """An fp16 overflow can make a metric NaN: it must not stop `compare` at the strict-JSON writer; it counts as a
    missing value (as the means already treat NaN) and the warning names the image and the metric."""
    import json as _json
    import logging

    import numpy as np
    from PIL import Image

    from persam_dreambooth.evaluation.prompts import PromptSpec
    from persam_dreambooth.evaluation.scoring import score_run
    from persam_dreambooth.generation.generate import IDENTITY_KEYS

    class OverflowingScorer:  # the scorer's interface: score(images, clip_texts, background_texts) -> rows
        def score(self, images, clip_texts, background_texts):
            return [{"dino": float("nan"), "clip_t": 0.25, "clip_i": float("inf")} for _ in images]

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    record = {"file": "a.png", "prompt_index": 0, "image_index": 0, **dict.fromkeys(IDENTITY_KEYS)}
    spec = PromptSpec(index=0, template="a {} on the beach", group="recontextualization",
                      prompt="a sks dog on the beach", clip_text="a dog on the beach", background_text="the beach")
    cache = tmp_path / "scores.json"
    with caplog.at_level(logging.WARNING):
        rows = score_run(OverflowingScorer(), [record], tmp_path, [spec], cache, {"v": 1}, progress=False)
    assert rows[0]["dino"] is None and rows[0]["clip_i"] is None and rows[0]["clip_t"] == 0.25
    assert "a.png" in caplog.text and "dino" in caplog.text and "clip_i" in caplog.text
    stored = _json.loads(cache.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert stored["images"]["a.png"]["dino"] is None
