"""``persam-dreambooth generate`` from the command line."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest

from persam_dreambooth.cli import generate as generate_cli


def _parse(argv):
    parser = argparse.ArgumentParser()
    generate_cli.register(parser.add_subparsers())
    return parser.parse_args(["generate", *argv])


def test_flags_as_in_the_issue(tiny_sd_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog\n", encoding="utf-8")
    args = _parse([
        "--pretrained_model_name_or_path", str(tiny_sd_dir), "--prompt", "a sks dog on the beach",
        "--prompts-file", str(prompts), "--num-images", "2", "--seed", "7", "--num-inference-steps", "2",
        "--guidance-scale", "5", "--height", "32", "--width", "32", "--device", "cpu", "--dtype", "float32",
        "--batch-size", "3", "--output-dir", str(tmp_path / "gen"),
    ])
    assert args.func(args) == 0
    records = [json.loads(x) for x in (tmp_path / "gen" / "generation.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in records] == [
        ("a sks dog on the beach", 7), ("a sks dog on the beach", 8), ("a dog", 7), ("a dog", 8)]
    assert {r["guidance_scale"] for r in records} == {5.0}
    assert sorted(p.name for p in (tmp_path / "gen" / "grids").iterdir()) == ["p000.jpg", "p001.jpg"]


def test_underscore_aliases(tmp_path):
    args = _parse(["--prompt", "x", "--num_images", "3", "--output_dir", str(tmp_path), "--lora_scale", "0.5"])
    assert (args.num_images, args.output_dir, args.lora_scale) == (3, str(tmp_path), 0.5)


def test_lora_and_model_are_exclusive(tmp_path):
    with pytest.raises(SystemExit):
        _parse(["--prompt", "x", "--lora", "a", "--model", "b", "--output-dir", str(tmp_path)])


def test_no_prompt_is_an_error(tiny_sd_dir, tmp_path):
    args = _parse(["--pretrained_model_name_or_path", str(tiny_sd_dir), "--output-dir", str(tmp_path / "g")])
    with pytest.raises(ValueError, match="at least one `--prompt`"):
        args.func(args)


@pytest.mark.skipif(
    any(importlib.util.find_spec(f"persam_dreambooth.cli.{m}") is None for m in ("segment", "eval_perseg", "train")),
    reason="the other sub-commands are not in the tree yet (the entry point imports them all)",
)
def test_entry_point_turns_errors_into_exit_code_2(tiny_sd_dir, tmp_path, capsys):
    from persam_dreambooth.cli import main

    code = main(["generate", "--pretrained_model_name_or_path", str(tiny_sd_dir), "--prompt", "a dog",
                 "--height", "31", "--output-dir", str(tmp_path / "g")])
    assert code == 2
    assert "VAE scale factor 2; the pipeline needs multiples of 8), got 31" in capsys.readouterr().err


def test_config_file_prompts_file_and_flags_merge(tmp_path):
    """generate's flags are GenerationConfig's fields: --config FILE < flags; --prompt repeats; errors name flags."""
    from persam_dreambooth.config import parse_config
    from persam_dreambooth.generation import GenerationConfig

    config = tmp_path / "gen.yaml"
    config.write_text("prompts: [a dog]\nnum_images: 3\nseed: 2\noutput_dir: out\n", encoding="utf-8")
    cfg = parse_config(GenerationConfig, _parse(["--config", str(config), "--seed", "5"]), str(config))
    assert (cfg.prompts, cfg.num_images, cfg.seed, cfg.output_dir) == (["a dog"], 3, 5, "out")
    args = _parse(["--prompt", "a", "--prompt", "b", "--output-dir", "o", "--pretrained-model-name-or-path", "m"])
    assert args.prompts == ["a", "b"] and args.pretrained_model_name_or_path == "m"
    # the flag the user typed, never the internal key (issue 10, item 8)
    with pytest.raises(ValueError, match=r"^`--num-images` must be >= 1, got 0\.$"):
        parse_config(GenerationConfig, _parse(["--prompt", "a", "--output-dir", "o", "--num-images", "0"]))
