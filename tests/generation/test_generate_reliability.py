"""``generate`` as a careless user meets it (issue 10): read-only and locked output folders, non-finite floats, an
unavailable device, strict JSON, umask modes, errors naming flags, and progress for the slow stages."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import stat
import typing

import pytest
from process_helpers import error_lines, run_cli

from persam_dreambooth.cli import generate as generate_cli
from persam_dreambooth.generation import GenerationConfig, generate
from persam_dreambooth.utils.locks import lock_output_dir


def _base_args(tiny_sd_dir, out) -> list[str]:
    return ["--pretrained_model_name_or_path", str(tiny_sd_dir), "--prompt", "a dog", "--num-images", "1",
            "--num-inference-steps", "2", "--device", "cpu", "--output-dir", str(out)]


def _tree(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_read_only_output_is_refused_before_any_work(tmp_path):
    """The output folder is checked first: even a model that would take minutes to load (here: one that does not
    exist) is not looked at when the results could not be written."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        out = ro / "new" / "run"  # a new folder under a read-only parent (tests/test_reliability.py: both cases)
        done = run_cli(["generate", "--pretrained_model_name_or_path", str(tmp_path / "no-such-model"), "--prompt",
                        "a dog", "--output-dir", str(out)], unprivileged=True, timeout=120)
        assert done.returncode == 2, done.stderr
        errors = error_lines(done.stderr)
        assert len(errors) == 1, done.stderr
        assert errors[0].startswith("persam-dreambooth generate: error: `--output-dir`") and "not writable" in \
            errors[0], errors[0]
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_a_second_run_into_a_locked_folder_refuses_with_the_holders_pid(tiny_sd_dir, tmp_path):
    out = tmp_path / "gen"
    with lock_output_dir(out, "generate", "--output-dir"):
        done = run_cli(["generate", *_base_args(tiny_sd_dir, out)], timeout=120)
        assert done.returncode == 2, done.stderr
        errors = error_lines(done.stderr)
        assert len(errors) == 1, done.stderr
        assert f"`--output-dir` {str(out)!r} is in use by another run (PID {os.getpid()}" in errors[0]
        assert _tree(out) == [".persam.lock"], "the refused run wrote nothing"
    generate(progress=False, pretrained_model_name_or_path=str(tiny_sd_dir), prompts=["a dog"], num_images=1,
             num_inference_steps=2, device="cpu", output_dir=str(out))  # free again once the holder is done
    assert "images/p000_i00_s0.png" in _tree(out)


def _float_fields(cls) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if float in (hints[f.name], *typing.get_args(hints[f.name]))]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persam-dreambooth")
    generate_cli.register(parser.add_subparsers())
    return parser


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_every_float_option_refuses_non_finite_values_at_parse_time(bad, tmp_path, capsys):
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["generate"]
    flags = {a.dest: a.option_strings[0] for a in sub._actions if a.option_strings}
    floats = _float_fields(GenerationConfig)
    assert sorted(floats) == ["guidance_scale", "lora_scale"]
    # the command's own flags (not from the config) take no numbers at all
    assert all(a.type is None for a in sub._actions if a.dest in ("config", "prompts_file"))
    for name in floats:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["generate", "--prompt", "a", "--output-dir", str(tmp_path / "g"),
                               f"{flags[name]}={bad}"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"`{flags[name]}` must be a finite number" in err, err
    # ... and so does the library, when the config is built in code
    for name in floats:
        with pytest.raises(ValueError, match=rf"^`--{name.replace('_', '-')}` must be a finite number"):
            GenerationConfig(prompts=["a"], output_dir=str(tmp_path / "g"), **{name: float(bad)})
    assert not (tmp_path / "g").exists()


def test_non_finite_guidance_scale_on_the_command_line_writes_nothing(tiny_sd_dir, tmp_path):
    out = tmp_path / "gen"
    done = run_cli(["generate", *_base_args(tiny_sd_dir, out), "--guidance-scale", "nan"], timeout=120)
    assert done.returncode == 2
    errors = error_lines(done.stderr)
    assert len(errors) == 1 and "`--guidance-scale` must be a finite number, got 'nan'" in errors[0], done.stderr
    assert not out.exists()


def test_generation_jsonl_is_strict_json(tmp_path):
    from persam_dreambooth.generation.generate import _write_records

    rec = {"file": "images/p000_i00_s0.png", "prompt_index": 0, "image_index": 0, "guidance_scale": math.nan}
    with pytest.raises(ValueError, match="non-finite"):
        _write_records(tmp_path, {rec["file"]: rec})
    assert list(tmp_path.iterdir()) == []
    _write_records(tmp_path, {rec["file"]: {**rec, "guidance_scale": 7.5}})
    assert (tmp_path / "generation.jsonl").read_text() == (
        '{"file": "images/p000_i00_s0.png", "prompt_index": 0, "image_index": 0, "guidance_scale": 7.5}\n')


def test_a_device_this_machine_lacks_is_refused_before_anything_is_written(tiny_sd_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "gen"
    with pytest.raises(ValueError, match=r"^`--device` is 'cuda' but CUDA is not available"):
        generate(progress=False, pretrained_model_name_or_path=str(tiny_sd_dir), prompts=["a dog"], num_images=1,
                 num_inference_steps=2, device="cuda", output_dir=str(out))
    with pytest.raises(ValueError, match=r"^`--device` must be a torch device"):
        generate(progress=False, pretrained_model_name_or_path=str(tiny_sd_dir), prompts=["a dog"], num_images=1,
                 num_inference_steps=2, device="gpu0", output_dir=str(out))
    assert not out.exists()


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_deliverables_get_the_umask_modes(tiny_sd_dir, tmp_path, umask):
    out = tmp_path / "gen"
    old = os.umask(umask)
    try:
        generate(progress=False, pretrained_model_name_or_path=str(tiny_sd_dir), prompts=["a dog", "a cat"],
                 num_images=2, num_inference_steps=2, device="cpu", output_dir=str(out))
    finally:
        os.umask(old)
    paths = [out, *out.rglob("*")]
    assert {p.relative_to(out).as_posix() for p in paths} >= {
        ".", "images", "grids", "generation.jsonl", "images/p001_i01_s1.png", "grids/p001.jpg"}
    for path in paths:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert _mode(path) == want, f"{path.relative_to(out)}: {oct(_mode(path))} != {oct(want)}"


def test_errors_name_the_flags_the_user_types(tiny_sd_dir, tmp_path):
    from persam_dreambooth.generation.pipeline import check_image_size, load_pipeline, model_geometry

    cases = [
        (lambda: GenerationConfig(prompts=["a"], output_dir="o", num_images=0), r"^`--num-images` must be >= 1"),
        (lambda: GenerationConfig(prompts=["a", " "], output_dir="o"), r"^`--prompt` number 2 must be a non-empty"),
        (lambda: GenerationConfig(prompts=["a"], output_dir="o", lora="a", model="b"),
         r"^Pass either `--lora` or `--model`, not both"),
        (lambda: GenerationConfig(prompts=[], output_dir="o"), r"`--prompt` or a `--prompts-file`"),
        (lambda: check_image_size(30, 32, 8), r"^`--height` must be a positive multiple of 8"),
        (lambda: load_pipeline(None), r"^`--pretrained_model_name_or_path` is required \(or `--model`"),
        (lambda: load_pipeline(str(tiny_sd_dir), dtype="float64"), r"^`--dtype` must be one of"),
        (lambda: model_geometry(str(tmp_path / "no-model")), r"`--pretrained_model_name_or_path`"),
    ]
    internal = ("`num_images`", "`prompts", "`lora`", "`model`", "`height`", "`dtype`",
                "`pretrained_model_name_or_path`")
    for make, match in cases:
        with pytest.raises((ValueError, RuntimeError, FileNotFoundError), match=match) as exc:
            make()
        assert not any(key in str(exc.value) for key in internal), str(exc.value)


def test_prompts_file_flag_is_named_as_typed(tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("# nothing\n", encoding="utf-8")
    args = _parser().parse_args(["generate", "--prompts_file", str(empty), "--output-dir", str(tmp_path / "g")])
    with pytest.raises(ValueError, match=r"^`--prompts-file` file .* holds no prompts"):
        args.func(args)


def test_slow_stages_show_progress(tiny_sd_dir, tmp_path, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="persam_dreambooth"):
        generate(progress=True, pretrained_model_name_or_path=str(tiny_sd_dir), prompts=["a dog"], num_images=3,
                 num_inference_steps=2, batch_size=2, device="cpu", output_dir=str(tmp_path / "gen"))
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Loading the pipeline") for m in messages), messages
    assert any(m.startswith("Pipeline ready on cpu") for m in messages), messages
    bar = capsys.readouterr().err
    # denoising steps of all images, advanced step by step (3 images x 2 steps), images done in the postfix
    assert "generate 3 image(s) -> gen" in bar and "6/6" in bar and "3/3 images" in bar, bar
