"""compare(): end to end on tiny models, reuse on rerun, and every bad input rejected before generation."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from persam_dreambooth import testing as tiny
from persam_dreambooth.cli import compare as compare_cli
from persam_dreambooth.evaluation.compare import compare
from persam_dreambooth.evaluation.compare_config import parse_runs
from persam_dreambooth.evaluation.embedders import MetricModelError
from persam_dreambooth.evaluation.scoring import METRICS


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tiny.tiny_compare_workspace(tmp_path_factory.getbasetemp() / "shared-compare" / "workspace")


@pytest.fixture(scope="module")
def report(tmp_path_factory, ws):
    return tiny.tiny_compare_report(tmp_path_factory.getbasetemp() / "shared-compare")


def _records(gen_dir):
    return [json.loads(x) for x in (gen_dir / "generation.jsonl").read_text().splitlines()]


def test_end_to_end_outputs(report, ws):
    metrics = json.loads((report / "metrics.json").read_text())
    assert list(metrics["runs"]) == ["base", "masked", "vanilla"]
    for name, run in metrics["runs"].items():
        assert all(run["overall"][m] is not None for m in METRICS), name
        assert run["overall"]["num_images"] == 6  # 3 prompts x 2 seeds
        assert list(run["groups"]) == ["recontextualization", "property"]
        assert len(run["prompts"]) == 3 and len(run["images"]) == 6
    assert metrics["runs"]["masked"]["kind"] == "lora" and metrics["runs"]["base"]["kind"] == "base"
    assert metrics["runs"]["masked"]["mask_source"] == "persam"
    assert metrics["models"] == {"dino": str(ws["dino"]), "clip": str(ws["clip"]),
                                 "sam": {"model_type": "tiny", "checkpoint": str(ws["sam"])}}
    assert metrics["settings"]["identifier"] == "sks"  # from the runs' instance_prompt "a photo of sks dog"
    assert metrics["settings"]["pretrained_model_name_or_path"] == str(ws["sd"])
    assert "identifier removed" in metrics["definitions"]["clip_t"]
    assert metrics["reference"] == {"image": str(ws["instance"] / "00.jpg"),
                                    "mask": str(ws["masked"] / "masks" / "00.png")}
    assert metrics["real_images"]["dino"] is not None and metrics["real_images"]["clip_t"] is None
    # identical prompts and seeds for every run, the base model included
    ident = {n: [(r["file"], r["prompt"], r["seed"]) for r in _records(report / "generations" / n)]
             for n in metrics["runs"]}
    assert ident["base"] == ident["masked"] == ident["vanilla"]
    assert ident["base"][0] == ("images/p000_i00_s0.png", "a sks dog on the beach", 0)
    # ... but different weights give different pictures
    base = np.array(Image.open(report / "generations" / "base" / "images" / "p000_i00_s0.png"))
    masked = np.array(Image.open(report / "generations" / "masked" / "images" / "p000_i00_s0.png"))
    assert np.abs(base.astype(int) - masked.astype(int)).max() > 10
    md = (report / "metrics.md").read_text()
    assert "## recontextualization (2 prompts)" in md and "## property (1 prompt)" in md
    assert "## Run masked" in md and "background leakage ↓" in md
    with Image.open(report / "grids" / "p000.jpg") as grid:  # 2 seeds (rows) x 3 runs (columns)
        assert grid.width > grid.height > 2 * 128
    assert (report / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_hold_paired_intervals_and_verdicts(report):
    """Every run against the base, then masked against vanilla; overall and per group; reproducible from the images."""
    from persam_dreambooth.evaluation.paired_stats import difference, paired_differences

    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["statistics"]["resamples"] == 2000 and metrics["statistics"]["seed"] == 0
    assert "resample prompts" in metrics["statistics"]["method"]
    comps = metrics["comparisons"]
    assert [(c["run"], c["against"]) for c in comps] == [("masked", "base"), ("vanilla", "base"),
                                                         ("masked", "vanilla")]
    for comp in comps:
        assert set(comp["overall"]) == set(METRICS)
        assert list(comp["groups"]) == ["recontextualization", "property"]
        assert "background_clip_t" not in comp["groups"]["property"]  # "a red {}" asks nothing of the background
        for d in comp["overall"].values():
            assert d["ci"][0] <= d["difference"] <= d["ci"][1] and d["width"] == pytest.approx(d["ci"][1] - d["ci"][0])
            assert d["verdict"] in ("better", "worse", "no clear difference")
            assert (d["verdict"] != "no clear difference") == (d["ci"][0] > 0 or d["ci"][1] < 0)
        assert comp["overall"]["dino"]["n_pairs"] == 6 and comp["overall"]["dino"]["n_prompts"] == 3
        assert comp["overall"]["background_clip_t"]["n_pairs"] == 4  # the two recontextualization prompts
    runs = metrics["runs"]
    again = difference(paired_differences(runs["masked"]["images"], runs["vanilla"]["images"], "clip_t"))
    assert comps[2]["overall"]["clip_t"] == again.to_dict()
    assert runs["masked"]["overall"]["background_clip_t"] is not None
    assert [r["background_clip_t"] is None for r in runs["masked"]["images"]] == [False] * 4 + [True] * 2
    assert "MaSC" in metrics["definitions"]["background_clip_t"]
    md = (report / "metrics.md").read_text()
    assert md.count("Paired differences, 95% confidence intervals:") == 3  # all prompts and the two groups
    assert "| masked − vanilla |" in md and "## How sure are these differences?" in md


def test_rerun_reuses_everything(report, tmp_path, ws):
    out = tmp_path / "again"
    shutil.copytree(report, out)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".png", ".json") and
              ("generations" in p.parts or "scores" in p.parts)}
    result = compare(progress=False, **tiny.tiny_compare_kwargs(ws, out))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no image regenerated, no score recomputed
    assert result.metrics["runs"]["masked"]["overall"] == json.loads(
        (report / "metrics.json").read_text())["runs"]["masked"]["overall"]


def test_partial_results_are_completed(report, tmp_path, ws):
    out = tmp_path / "partial"
    shutil.copytree(report, out)
    victim = out / "generations" / "vanilla" / "images" / "p002_i01_s1.png"
    original = np.array(Image.open(victim))
    victim.unlink()
    other = out / "generations" / "vanilla" / "images" / "p000_i00_s0.png"
    before = other.stat().st_mtime_ns
    compare(progress=False, **tiny.tiny_compare_kwargs(ws, out))
    np.testing.assert_array_equal(np.array(Image.open(victim)), original)  # regenerated, identically
    assert other.stat().st_mtime_ns == before


def _no_generation(out):
    return not (out / "generations").exists()


def test_run_without_weights(ws, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.resolved.yaml").write_text(yaml.safe_dump({"pretrained_model_name_or_path": str(ws["sd"])}))
    out = tmp_path / "r"
    with pytest.raises(FileNotFoundError, match=r"`--runs broken` folder .* holds no trained weights"):
        compare(progress=False, **tiny.tiny_compare_kwargs(ws, out, runs={"masked": str(ws["masked"]),
                                                                           "broken": str(broken)}))
    assert _no_generation(out)


def test_mismatched_base_models(ws, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(ws["vanilla"], other)
    (other / "config.resolved.yaml").write_text(yaml.safe_dump({"pretrained_model_name_or_path": "org/other-sd"}))
    out = tmp_path / "r"
    with pytest.raises(ValueError, match=r"run 'other' was trained from 'org/other-sd', but the first run is"):
        compare(progress=False, **tiny.tiny_compare_kwargs(ws, out, runs={"masked": str(ws["masked"]),
                                                                           "other": str(other)}))
    with pytest.raises(ValueError, match=r"run 'masked' was trained from .*`--pretrained_model_name_or_path` is "
                                         r"'org/other-sd'"):
        compare(progress=False, **tiny.tiny_compare_kwargs(ws, out, pretrained_model_name_or_path="org/other-sd"))
    assert _no_generation(out)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"prompt_set": "animals"}, ValueError, r"`--prompt-set` must be 'live', 'object'"),
        ({"dino_model": "missing/dino"}, MetricModelError, r"`--dino-model missing/dino`.*hf download missing/dino"),
        ({"clip_model": "missing/clip"}, MetricModelError, r"`--clip-model missing/clip`"),
        ({"runs": {"base": "x"}}, ValueError, r"'base' is reserved"),
        ({"runs": {"my run!": "x"}}, ValueError, r"name 'my run!' must be letters, digits"),
        ({"sam_checkpoint": "/no/sam.pth"}, FileNotFoundError, r"/no/sam.pth"),
        ({"height": 30}, ValueError, r"`--height` must be a positive multiple of 8 \(VAE scale factor 2"),
        ({"class_noun": "cat"}, ValueError, r"`--identifier` is required"),
        ({"instance_data_dir": "/no/photos"}, FileNotFoundError, r"/no/photos"),
        ({"reference_image": "x.jpg"}, ValueError, r"give both or neither"),
    ],
)
def test_bad_input_fails_before_generation(ws, tmp_path, overrides, error, match):
    out = tmp_path / "r"
    with pytest.raises(error, match=match):
        compare(progress=False, **tiny.tiny_compare_kwargs(ws, out, **overrides))
    assert _no_generation(out)
    assert not out.exists(), "bad input writes nothing, not even the folder's lock file"


def test_parse_runs():
    assert parse_runs(["masked=out/a", " vanilla = out/b"]) == {"masked": "out/a", "vanilla": "out/b"}
    for bad, match in ((["masked"], "NAME=FOLDER"), (["a=x", "a=y"], "appears twice"), (["a="], "has no folder"),
                       ([], "at least one run")):
        with pytest.raises(ValueError, match=match):
            parse_runs(bad)


def test_prompt_file_without_placeholder(ws, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a dog on the beach\n")
    out = tmp_path / "r"
    with pytest.raises(ValueError, match=r"must contain exactly one `\{\}`"):
        compare(progress=False, **tiny.tiny_compare_kwargs(ws, out, prompt_set=str(bad)))
    assert _no_generation(out)


def test_no_masks_anywhere_needs_a_reference_or_no_background_metrics(ws, tmp_path):
    runs = {"vanilla": str(ws["vanilla"])}
    out = tmp_path / "r"
    with pytest.raises(ValueError, match=r"`--instance-mask-dir`.*`--no-background-metrics`"):
        compare(progress=False, **tiny.tiny_compare_kwargs(ws, out, runs=runs))
    assert _no_generation(out)
    result = compare(progress=False, **tiny.tiny_compare_kwargs(
        ws, out, runs=runs, background_metrics=False, num_images_per_prompt=1, sam_checkpoint=None))
    overall = result.metrics["runs"]["vanilla"]["overall"]
    assert overall["dino"] is not None and overall["masked_dino"] is None and overall["background_leakage"] is None
    assert result.metrics["models"]["sam"] is None and (out / "report.html").is_file()


def test_explicit_reference_segments_the_instance_images(ws, tmp_path):
    result = compare(progress=False, **tiny.tiny_compare_kwargs(
        ws, tmp_path / "r", runs={"vanilla": str(ws["vanilla"])}, num_images_per_prompt=1,
        reference_image=str(ws["instance"] / "01.jpg"), reference_mask=str(ws["masked"] / "masks" / "01.png")))
    assert result.metrics["instance_masks"] == "PerSAM (from the reference)"
    assert result.metrics["reference"]["image"].endswith("01.jpg")
    assert result.metrics["runs"]["vanilla"]["overall"]["background_leakage"] is not None


def test_cli_flags_as_in_the_issue(report, ws, tmp_path):
    out = tmp_path / "cli"
    shutil.copytree(report, out)  # everything is reused: this checks the flags and the wiring
    parser = argparse.ArgumentParser()
    compare_cli.register(parser.add_subparsers())
    args = parser.parse_args([
        "compare", "--pretrained_model_name_or_path", str(ws["sd"]),
        "--runs", f"masked={ws['masked']}", f"vanilla={ws['vanilla']}", "--instance_data_dir", str(ws["instance"]),
        "--class-noun", "dog", "--prompt-set", str(ws["prompts"]), "--num-images-per-prompt", "2", "--seed", "0",
        "--num-inference-steps", "2", "--dino-model", str(ws["dino"]), "--clip-model", str(ws["clip"]),
        "--sam-model-type", "tiny", "--sam-checkpoint", str(ws["sam"]), "--device", "cpu", "--output-dir", str(out),
    ])
    stamp = (out / "generations" / "masked" / "generation.jsonl").stat().st_mtime_ns
    assert args.func(args) == 0
    assert (out / "generations" / "masked" / "generation.jsonl").stat().st_mtime_ns == stamp
    assert (out / "report.html").is_file()


def test_cli_mode_errors(tmp_path):
    parser = argparse.ArgumentParser()
    compare_cli.register(parser.add_subparsers())
    common = ["compare", "--instance_data_dir", "x", "--class-noun", "dog", "--output-dir", str(tmp_path)]
    for extra, match in ((["--train"], "needs `--train-config"), ([], "`--runs NAME=FOLDER ...` is required"),
                         (["--runs", "a=b", "--train-config", "c.yaml"], "only apply with `--train`"),
                         (["--train", "--train-config", "c.yaml", "--runs", "a=b"], "exclude each other")):
        args = parser.parse_args(common + extra)
        with pytest.raises(ValueError, match=match):
            args.func(args)


def test_sam_model_flag_spellings():
    """``--sam-model`` as in ``segment`` / ``eval-perseg``; ``--sam-model-type`` and ``--sam_model_type`` too."""
    parser = argparse.ArgumentParser()
    compare_cli.register(parser.add_subparsers())
    common = ["compare", "--runs", "a=b", "--instance_data_dir", "x", "--class-noun", "dog", "--output-dir", "o"]
    for flag in ("--sam-model", "--sam-model-type", "--sam_model_type"):
        assert parser.parse_args([*common, flag, "vit_b"]).sam_model_type == "vit_b"
    assert parser.parse_args(common).sam_model_type is None  # compare's default (vit_h) or the training config's


def test_edited_instance_mask_rescores_but_keeps_the_images(ws, tmp_path):
    masks = tmp_path / "masks"
    shutil.copytree(ws["masked"] / "masks", masks)
    out = tmp_path / "r"
    kwargs = tiny.tiny_compare_kwargs(ws, out, runs={"vanilla": str(ws["vanilla"])}, num_images_per_prompt=1,
                                      instance_mask_dir=str(masks))
    first = compare(progress=False, **kwargs)
    pngs = {p: p.stat().st_mtime_ns for p in (out / "generations").rglob("*.png")}
    # the same file, new content: the subject of photo 02 drawn twice as big
    mask = np.array(Image.open(masks / "02.png").convert("L")) > 127
    mask[np.argwhere(mask).min(0)[0]:, :] |= mask.any(axis=0)
    Image.fromarray(mask.astype(np.uint8) * 255).save(masks / "02.png")
    second = compare(progress=False, **kwargs)
    assert {p: p.stat().st_mtime_ns for p in pngs} == pngs  # nothing regenerated
    before = first.metrics["runs"]["vanilla"]["overall"]["background_leakage"]
    after = second.metrics["runs"]["vanilla"]["overall"]["background_leakage"]
    assert after != pytest.approx(before, abs=1e-6)  # ... but every image was scored against the new masks
    assert second.metrics["real_images"]["background_leakage"] != first.metrics["real_images"]["background_leakage"]


def test_cli_config_file_and_flag_spellings(tmp_path):
    """compare's flags are CompareCommandConfig's fields: --config FILE < flags; both spellings; checked ranges."""
    from persam_dreambooth.config import parse_config
    from persam_dreambooth.evaluation.compare_config import CompareCommandConfig

    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({"runs": {"masked": "out/m", "vanilla": "out/v"}, "class_noun": "cat",
                                      "instance_data_dir": "photos", "output_dir": "report", "seed": 3,
                                      "bootstrap_seed": 7}), encoding="utf-8")
    parser = argparse.ArgumentParser()
    compare_cli.register(parser.add_subparsers())
    args = parser.parse_args(["compare", "--config", str(config), "--class_noun", "dog", "--num-images-per-prompt",
                              "8", "--no-background-metrics"])
    cfg = parse_config(CompareCommandConfig, args, args.config)
    assert cfg.runs == {"masked": "out/m", "vanilla": "out/v"} and (cfg.class_noun, cfg.seed) == ("dog", 3)
    assert (cfg.num_images_per_prompt, cfg.background_metrics, cfg.bootstrap_seed) == (8, False, 7)
    assert cfg.settings().class_noun == "dog" and not hasattr(cfg.settings(), "runs")
    args = parser.parse_args(["compare", "--config", str(config), "--runs", "a=x", "--bootstrap-resamples", "10"])
    with pytest.raises(ValueError, match=r"`--bootstrap-resamples` must be >= 100"):
        parse_config(CompareCommandConfig, args, args.config)
    with pytest.raises(SystemExit):  # finite floats only
        parser.parse_args(["compare", "--guidance-scale", "nan"])
