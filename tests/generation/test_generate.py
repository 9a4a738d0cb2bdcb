"""generate(): file names, records, grids, determinism across batch sizes, resuming, LoRA loading, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from persam_dreambooth import testing as tiny
from persam_dreambooth.generation import GenerationConfig, generate, image_name, load_records, read_prompts_file

PROMPTS = ["a photo of sks dog", "a dog"]


def _pixels(path):
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_sd_dir):
    return tiny.save_tiny_lora_run(tmp_path_factory.mktemp("lora-run"), tiny_sd_dir, seed=3)


def _gen(tiny_sd_dir, out, **kw):
    settings = {"pretrained_model_name_or_path": str(tiny_sd_dir), "prompts": PROMPTS, "num_images": 2, "seed": 5,
                "num_inference_steps": 2, "output_dir": str(out), "device": "cpu", **kw}
    return generate(progress=False, **settings)


def test_names_records_and_grids(tiny_sd_dir, tmp_path):
    result = _gen(tiny_sd_dir, tmp_path / "gen", guidance_scale=3.0)
    files = sorted(p.relative_to(tmp_path / "gen").as_posix() for p in (tmp_path / "gen" / "images").iterdir())
    assert files == ["images/p000_i00_s5.png", "images/p000_i01_s6.png", "images/p001_i00_s5.png",
                     "images/p001_i01_s6.png"]
    assert image_name(3, 1, 1234) == "images/p003_i01_s1234.png"
    assert result.num_generated == 4 and result.num_reused == 0
    lines = (tmp_path / "gen" / "generation.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [r["file"] for r in records] == files
    first = records[0]
    assert first["prompt"] == PROMPTS[0] and first["seed"] == 5 and first["image_index"] == 0
    assert first["num_inference_steps"] == 2 and first["guidance_scale"] == 3.0
    assert (first["height"], first["width"]) == (32, 32)  # tiny UNet sample_size 16 x VAE scale factor 2
    assert first["pretrained_model_name_or_path"] == str(tiny_sd_dir.resolve())
    assert first["lora"] is None and first["dtype"] == "float32" and first["scheduler"] == "DDIMScheduler"
    assert _pixels(tmp_path / "gen" / files[0]).shape == (32, 32, 3)
    assert [g.name for g in result.grids] == ["p000.jpg", "p001.jpg"]
    with Image.open(result.grids[0]) as grid:
        assert grid.width > 2 * 32 and grid.height > 32  # two images side by side plus seed labels


def test_batch_size_does_not_change_images(tiny_sd_dir, tmp_path):
    one = _gen(tiny_sd_dir, tmp_path / "b1", batch_size=1)
    three = _gen(tiny_sd_dir, tmp_path / "b3", batch_size=3)  # batches mix prompts: [p0 i0, p0 i1, p1 i0], [p1 i1]
    for a, b in zip(one.image_paths(), three.image_paths(), strict=True):
        np.testing.assert_array_equal(_pixels(a), _pixels(b))
    # ...while the seed does change them
    assert not np.array_equal(_pixels(one.image_paths()[0]), _pixels(one.image_paths()[1]))


def test_resume_skips_complete_images_and_redoes_missing(tiny_sd_dir, tmp_path):
    out = tmp_path / "gen"
    first = _gen(tiny_sd_dir, out)
    before = {p.name: _pixels(p) for p in first.image_paths()}
    again = _gen(tiny_sd_dir, out)
    assert again.num_generated == 0 and again.num_reused == 4
    victim = first.image_paths()[3]
    victim.unlink()
    truncated = first.image_paths()[1]
    truncated.write_bytes(truncated.read_bytes()[:40])  # a half-written file (e.g. from another tool)
    third = _gen(tiny_sd_dir, out)
    assert third.num_generated == 2 and third.num_reused == 2
    for p in third.image_paths():
        np.testing.assert_array_equal(_pixels(p), before[p.name])
    assert len(load_records(out)) == 4
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no temporary files left behind


def test_resume_with_other_settings_is_an_error_before_generating(tiny_sd_dir, tmp_path):
    out = tmp_path / "gen"
    _gen(tiny_sd_dir, out)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    with pytest.raises(ValueError, match=r"other settings.*num_inference_steps: 2 on disk vs 3 now"):
        _gen(tiny_sd_dir, out, num_inference_steps=3)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamp


def test_lora_changes_images_and_scale_zero_is_the_base(tiny_sd_dir, lora_run, tmp_path):
    base = _gen(tiny_sd_dir, tmp_path / "base", prompts=[PROMPTS[0]], num_images=1)
    lora = _gen(tiny_sd_dir, tmp_path / "lora", prompts=[PROMPTS[0]], num_images=1, lora=str(lora_run))
    off = _gen(tiny_sd_dir, tmp_path / "off", prompts=[PROMPTS[0]], num_images=1, lora=str(lora_run), lora_scale=0.0)
    b, with_lora, o = (_pixels(r.image_paths()[0]) for r in (base, lora, off))
    assert np.abs(b.astype(int) - with_lora.astype(int)).max() > 10
    np.testing.assert_array_equal(b, o)
    assert lora.records[0]["lora"] == str(lora_run.resolve()) and lora.records[0]["lora_scale"] == 1.0


def test_base_model_is_read_from_the_lora_folder(tiny_sd_dir, lora_run, tmp_path):
    result = generate(prompts=["a dog"], lora=str(lora_run), num_images=1, num_inference_steps=1,
                      output_dir=str(tmp_path / "g"), device="cpu", progress=False)
    assert result.records[0]["pretrained_model_name_or_path"] == str(tiny_sd_dir.resolve())


def test_bfloat16_on_cpu_is_recorded(tiny_sd_dir, tmp_path):
    result = _gen(tiny_sd_dir, tmp_path / "bf16", prompts=["a dog"], num_images=1, dtype="bfloat16")
    assert result.records[0]["dtype"] == "bfloat16"
    assert _pixels(result.image_paths()[0]).std() > 5  # a real picture, not a blank


def test_full_pipeline_folder_as_model(tiny_sd_dir, tmp_path):
    base = _gen(tiny_sd_dir, tmp_path / "base", prompts=["a dog"], num_images=1)
    full = generate(model=str(tiny_sd_dir), prompts=["a dog"], num_images=1, seed=5, num_inference_steps=2,
                    output_dir=str(tmp_path / "full"), device="cpu", progress=False)
    np.testing.assert_array_equal(_pixels(base.image_paths()[0]), _pixels(full.image_paths()[0]))
    assert full.records[0]["model"] == str(tiny_sd_dir.resolve())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"height": 33}, ValueError, r"`--height` must be a positive multiple of 8 \(VAE scale factor 2; .*, got 33"),
        ({"width": 31}, ValueError, r"`--width` must be a positive multiple of 8 \(VAE scale factor 2; .*, got 31"),
        ({"prompts": []}, ValueError, r"at least one prompt"),
        ({"num_images": 0}, ValueError, r"^`--num-images` must be >= 1, got 0"),  # the flag, not the key
        ({"dtype": "float64"}, ValueError, r"`dtype` must be one of"),
        ({"lora": "/nonexistent/run"}, FileNotFoundError, r"`--lora` folder '/nonexistent/run' does not exist"),
        ({"colour": "red"}, ValueError, r"Unknown config key `colour`"),
    ],
)
def test_bad_settings_fail_before_writing(tiny_sd_dir, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        _gen(tiny_sd_dir, tmp_path / "gen", **kwargs)
    assert not (tmp_path / "gen").exists()


def test_folder_without_weights_is_a_clear_error(tiny_sd_dir, tmp_path):
    empty = tmp_path / "unfinished-run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no trained weights.*pytorch_lora_weights.safetensors"):
        _gen(tiny_sd_dir, tmp_path / "gen", lora=str(empty))


def test_lora_and_model_exclude_each_other(tiny_sd_dir, lora_run):
    with pytest.raises(ValueError, match="not both"):
        GenerationConfig(prompts=["a"], output_dir="x", lora=str(lora_run), model=str(tiny_sd_dir))


def test_prompts_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# my prompts\na sks dog\n\n  a dog on the beach  \n", encoding="utf-8")
    assert read_prompts_file(path) == ["a sks dog", "a dog on the beach"]
    path.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts_file(path)


def _diff(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_lora_scale_is_applied_and_does_not_leak_between_calls(tiny_sd_dir, lora_run, tmp_path):
    """diffusers 0.42 + peft: ``cross_attention_kwargs={"scale": s}`` scales the LoRA for that call only."""
    from persam_dreambooth.generation import load_pipeline

    base = _pixels(_gen(tiny_sd_dir, tmp_path / "base", prompts=[PROMPTS[0]], num_images=1).image_paths()[0])
    pipe = load_pipeline(str(tiny_sd_dir), lora=str(lora_run), device="cpu")
    images = {}
    for k, scale in enumerate((1.0, 0.0, 0.5, 1.0)):  # one pipeline: a scale must not stick to the next call
        result = _gen(tiny_sd_dir, tmp_path / f"s{k}", prompts=[PROMPTS[0]], num_images=1, lora=str(lora_run),
                      lora_scale=scale, pipeline=pipe)
        images[k] = _pixels(result.image_paths()[0])
        assert result.records[0]["lora_scale"] == scale
    np.testing.assert_array_equal(images[1], base)  # scale 0 is the base model
    np.testing.assert_array_equal(images[0], images[3])  # scale 1 before and after the other scales
    fresh = _gen(tiny_sd_dir, tmp_path / "fresh", prompts=[PROMPTS[0]], num_images=1, lora=str(lora_run))
    np.testing.assert_array_equal(_pixels(fresh.image_paths()[0]), images[0])  # = a freshly loaded LoRA pipeline
    half, full = _diff(images[2], base), _diff(images[0], base)
    assert 0.5 < half < full  # scale 0.5 lies between the base model and the full LoRA
    assert _diff(images[2], images[0]) < full


def test_retrained_weights_in_the_same_folder_are_not_reused(tiny_sd_dir, tmp_path):
    run = tiny.save_tiny_lora_run(tmp_path / "run", tiny_sd_dir, seed=3)
    out = tmp_path / "gen"
    first = _gen(tiny_sd_dir, out, prompts=["a dog"], num_images=1, lora=str(run))
    assert first.records[0]["weights_fingerprint"].startswith("sha256:")
    tiny.save_tiny_lora_run(run, tiny_sd_dir, seed=4)  # trained again into the same folder
    with pytest.raises(ValueError, match=r"other settings .*weights_fingerprint: 'sha256:"):
        _gen(tiny_sd_dir, out, prompts=["a dog"], num_images=1, lora=str(run))


class _FailingPipeline:
    """The real pipeline, but the ``fail_on``-th call raises (a crash or Ctrl-C in the middle of a run)."""

    def __init__(self, pipe, fail_on: int) -> None:
        self.pipe, self.fail_on, self.calls = pipe, fail_on, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt
        return self.pipe(**kwargs)


def test_interrupted_generation_leaves_complete_pngs_and_resumes(tiny_sd_dir, tmp_path):
    from persam_dreambooth.generation import load_pipeline

    out = tmp_path / "gen"
    failing = _FailingPipeline(load_pipeline(str(tiny_sd_dir), device="cpu"), fail_on=2)
    with pytest.raises(KeyboardInterrupt):
        _gen(tiny_sd_dir, out, batch_size=3, pipeline=failing)
    # the first batch (3 images) is on disk, complete and recorded; nothing else, no temporary files
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [
        ".persam.lock", "generation.jsonl", "p000_i00_s5.png", "p000_i01_s6.png", "p001_i00_s5.png"]
    assert len(load_records(out)) == 3
    resumed = _gen(tiny_sd_dir, out, batch_size=3)
    assert (resumed.num_generated, resumed.num_reused) == (1, 3)
    fresh = _gen(tiny_sd_dir, tmp_path / "fresh", batch_size=3)
    for a, b in zip(resumed.image_paths(), fresh.image_paths(), strict=True):
        np.testing.assert_array_equal(_pixels(a), _pixels(b))


def test_wrong_kind_of_weights_folder_fails_before_writing(tiny_sd_dir, lora_run, tmp_path):
    with pytest.raises(ValueError, match=r"`--lora` folder .* holds a full pipeline .* pass it as `--model`"):
        _gen(tiny_sd_dir, tmp_path / "a", lora=str(tiny_sd_dir))
    with pytest.raises(ValueError, match=r"`--model` folder .* holds LoRA weights .* pass it as `--lora`"):
        generate(model=str(lora_run), prompts=["a dog"], output_dir=str(tmp_path / "b"), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_grid_of_more_than_four_images_labels_rows_with_seeds(tiny_sd_dir, tmp_path):
    result = _gen(tiny_sd_dir, tmp_path / "gen", prompts=["a dog"], num_images=6, seed=10)
    with Image.open(result.grids[0]) as grid:
        rows_only = grid.size
    # 2 rows of up to 4 tiles (32 px), plus a label column left of them ("seeds 10-13", "seeds 14-15")
    assert rows_only[1] == 2 * 32 + 3 * 4 and rows_only[0] > 4 * 32 + 5 * 4 + 30


def test_full_pipeline_fingerprint_follows_the_component_weights(tiny_sd_dir, tmp_path):
    import os
    import shutil

    from persam_dreambooth.generation import find_run_weights
    from persam_dreambooth.generation.pipeline import weights_fingerprint

    run = tmp_path / "full"
    shutil.copytree(tiny_sd_dir, run)  # copy2 keeps the times: the same weights
    before = weights_fingerprint(find_run_weights(run, "--model"))
    assert before == weights_fingerprint(find_run_weights(tiny_sd_dir, "--model")) and before.startswith("files:")
    (run / "checkpoint-100").mkdir()
    (run / "checkpoint-100" / "model.safetensors").write_bytes(b"x")  # training state, not the pipeline
    assert weights_fingerprint(find_run_weights(run, "--model")) == before
    unet = next((run / "unet").glob("*.safetensors"))
    os.utime(unet, ns=(unet.stat().st_atime_ns, unet.stat().st_mtime_ns + 10**9))  # rewritten by a new training
    assert weights_fingerprint(find_run_weights(run, "--model")) != before


def _write_safetensors(path, tensors, metadata):
    """A ``.safetensors`` file written byte by byte, with the header keys in exactly the given order."""
    import struct

    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_lora_fingerprint_follows_the_tensors_not_the_metadata_order(tmp_path):
    """Two saves of the same LoRA whose metadata keys come out in another order are the same weights; one changed
    value is not. (safetensors writes the metadata map in an order that varies between saves, so a resumed
    `compare --train` run re-saved identical weights as different bytes.)"""
    from safetensors.numpy import load_file

    from persam_dreambooth.generation.pipeline import RunWeights, weights_fingerprint

    a, b = np.arange(6.0).reshape(2, 3), np.ones((3, 2))
    files = {
        "one": ({"unet.a.lora.down.weight": a, "unet.b.lora.up.weight": b}, {"format": "pt", "x": "1"}),
        "two": ({"unet.b.lora.up.weight": b, "unet.a.lora.down.weight": a}, {"x": "1", "format": "pt"}),
        "three": ({"unet.a.lora.down.weight": a, "unet.b.lora.up.weight": b + 2**-20}, {"format": "pt", "x": "1"}),
    }
    prints = {}
    for name, (tensors, meta) in files.items():
        (tmp_path / name).mkdir()
        path = tmp_path / name / "pytorch_lora_weights.safetensors"
        _write_safetensors(path, tensors, meta)
        assert set(load_file(str(path))) == set(tensors)  # a valid file
        prints[name] = weights_fingerprint(RunWeights(kind="lora", path=tmp_path / name))
    assert (tmp_path / "one" / "pytorch_lora_weights.safetensors").read_bytes() != \
        (tmp_path / "two" / "pytorch_lora_weights.safetensors").read_bytes()
    assert prints["one"] == prints["two"] != prints["three"]
