"""``persam-dreambooth segment`` on albums: batches, dtype, cache, resume, settings, instances, methods, bad flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from segment_anything.modeling import ImageEncoderViT

from persam_dreambooth import cli
from persam_dreambooth import testing as tiny


@pytest.fixture(autouse=True)
def _only_segment(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("segment",))
    tiny.register_tiny_sam()


@pytest.fixture
def encoder_calls(monkeypatch):
    """Counts image-encoder forward calls of every SAM (the CLI loads its own)."""
    calls = [0]
    real = ImageEncoderViT.forward

    def counting(self, x):
        calls[0] += 1
        return real(self, x)

    monkeypatch.setattr(ImageEncoderViT, "forward", counting)
    return calls


@pytest.fixture
def data(tmp_path):
    image, mask = tiny.synthetic_subject()
    Image.fromarray(image).save(tmp_path / "ref.jpg", quality=95)
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "ref_mask.png")
    image2, mask2 = tiny.synthetic_subject(80, 100, box_yx=(20, 30, 60, 80), seed=5)
    Image.fromarray(image2).save(tmp_path / "ref2.jpg", quality=95)
    Image.fromarray(mask2.astype(np.uint8) * 255).save(tmp_path / "ref2_mask.png")
    tiny.write_instance_dir(tmp_path / "photos", n=3)
    return tmp_path


def run(data, ckpt, *extra, ref=("--ref-image", "ref.jpg", "--ref-mask", "ref_mask.png"), output="out"):
    args = ["segment"]
    for token in ref:
        args.append(str(data / token) if token.endswith((".jpg", ".png")) else token)
    args += ["--images", str(data / "photos"), "--output", str(data / output), "--sam-model", "tiny",
             "--sam-checkpoint", str(ckpt), "--device", "cpu", *extra]
    return cli.main(args)


def rows(out):
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_batch_cache_and_resume(data, tiny_sam_checkpoint, encoder_calls, monkeypatch):
    cache = str(data / "cache")
    assert run(data, tiny_sam_checkpoint, "--batch-size", "2", "--cache-dir", cache) == 0
    assert encoder_calls[0] == 1 + 2  # reference, then photos 2 + 1
    first = rows(data / "out")
    assert [r["stem"] for r in first] == ["00", "01", "02"] and not any(r["cached"] for r in first)

    from persam_dreambooth.segmentation import sam as sam_module

    before = snapshot(data / "out")
    with monkeypatch.context() as patch:
        patch.setattr(sam_module, "load_sam", lambda *a, **k: pytest.fail("loaded SAM with nothing to do"))
        assert run(data, tiny_sam_checkpoint, "--batch-size", "2", "--cache-dir", cache) == 0  # complete: no work
    assert snapshot(data / "out") == before

    encoder_calls[0] = 0
    assert run(data, tiny_sam_checkpoint, "--cache-dir", cache, output="other_ref",
               ref=("--ref-image", "ref.jpg", "--ref-box", "30,20,100,80")) == 0
    assert encoder_calls[0] == 0, "another reference on the same photos must not run the encoder"
    assert all(r["cached"] for r in rows(data / "other_ref"))

    (data / "out" / "01.png").unlink()  # resume redoes only this photo
    encoder_calls[0] = 0
    assert run(data, tiny_sam_checkpoint, "--batch-size", "2") == 0
    assert encoder_calls[0] == 2  # reference + photo 01 (no cache this time)
    again = rows(data / "out")
    assert [r["stem"] for r in again] == ["00", "01", "02"]
    assert again[0] == first[0] and again[2] == first[2]
    # 01 was encoded in a batch of 2 before and alone now: equal to float rounding, which can move the negative
    # point across a near-tie of the tiny SAM's flat similarity map (see test_album_encoding); the positive one holds
    assert again[1]["points_xy"][0] == first[1]["points_xy"][0] and again[1]["source"] == first[1]["source"]


def test_warm_cache_gives_bit_identical_outputs(data, tiny_sam_checkpoint):
    cache = str(data / "cache")
    assert run(data, tiny_sam_checkpoint, output="plain") == 0
    assert run(data, tiny_sam_checkpoint, "--cache-dir", cache, output="cold") == 0
    assert run(data, tiny_sam_checkpoint, "--cache-dir", cache, output="warm") == 0
    for stem in ("00", "01", "02"):
        plain = (data / "plain" / f"{stem}.png").read_bytes()
        assert plain == (data / "cold" / f"{stem}.png").read_bytes() == (data / "warm" / f"{stem}.png").read_bytes()
    drop = ("seconds", "cached")
    for a, b in zip(rows(data / "plain"), rows(data / "warm"), strict=True):
        assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


def test_bfloat16_run_and_settings_mismatch(data, tiny_sam_checkpoint, capsys):
    assert run(data, tiny_sam_checkpoint) == 0
    before = snapshot(data / "out")
    capsys.readouterr()
    assert run(data, tiny_sam_checkpoint, "--dtype", "bfloat16") == 2
    err = capsys.readouterr().err
    assert 'dtype: "float32" before, "bfloat16" now' in err and "--overwrite" in err
    assert snapshot(data / "out") == before
    assert run(data, tiny_sam_checkpoint, "--dtype", "bfloat16", "--overwrite") == 0
    saved = json.loads((data / "out" / "run.json").read_text())
    assert saved["settings"]["dtype"] == "bfloat16" and len(rows(data / "out")) == 3
    assert run(data, tiny_sam_checkpoint, "--dtype", "bfloat16", "--batch-size", "3") == 0  # not a setting


def test_several_references_validate_counts_and_sizes(data, tiny_sam_checkpoint, capsys):
    def expect(pattern, ref):
        assert run(data, tiny_sam_checkpoint, ref=ref) == 2
        err = capsys.readouterr().err
        assert pattern in err, err
        assert not (data / "out").exists()

    expect("`--ref-mask` gives 1 value(s) but `--ref-image` gives 2 image(s)",
           ("--ref-image", "ref.jpg", "ref2.jpg", "--ref-mask", "ref_mask.png"))
    expect("`--ref-box` gives 2 value(s) but `--ref-image` gives 1 image(s)",
           ("--ref-image", "ref.jpg", "--ref-box", "1,1,20,20", "--ref-box", "2,2,30,30"))
    expect("`--ref-mask #2` has size", ("--ref-image", "ref.jpg", "ref2.jpg", "--ref-mask", "ref_mask.png",
                                          "ref_mask.png"))
    expect("`--ref-box #2` must lie inside the reference image (W x H = 100 x 80)",
           ("--ref-image", "ref.jpg", "ref2.jpg", "--ref-box", "1,1,20,20", "1,1,120,20"))
    expect("`--ref-point #1` must lie inside", ("--ref-image", "ref.jpg", "ref2.jpg", "--ref-point", "500,1", "5,5"))


BAD_FLAGS = [
    (["--method", "persam-x"], "`--method` must be one of ['persam', 'persam-f'], got 'persam-x'"),
    (["--batch-size", "0"], "`--batch-size` must be an integer >= 1, got '0'"),
    (["--batch-size", "two"], "`--batch-size` must be an integer >= 1, got 'two'"),
    (["--dtype", "float64"], "`--dtype` must be one of ['float32', 'bfloat16', 'float16'], got 'float64'"),
    (["--max-instances", "0"], "`--max-instances` must be an integer >= 1, got '0'"),
    (["--max-instances", "1.5"], "`--max-instances` must be an integer >= 1, got '1.5'"),
    (["--similarity-threshold", "0.5"], "`--similarity-threshold` '0.5' applies only to several instances"),
    (["--overlap-iou", "0.5"], "`--overlap-iou` '0.5' applies only to several instances"),
    (["--max-instances", "2", "--similarity-threshold", "1.5"],
     "`--similarity-threshold` must be a number in [-1, 1], got '1.5'"),
    (["--max-instances", "2", "--overlap-iou", "-0.1"], "`--overlap-iou` must be a number in [0, 1], got '-0.1'"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_new_flags_name_flag_and_value_and_write_nothing(data, tiny_sam_checkpoint, capsys, flags, message):
    assert run(data, tiny_sam_checkpoint, *flags) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (data / "out").exists()


@pytest.mark.parametrize("flag", ["--similarity-threshold", "--overlap-iou"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_thresholds_are_refused_when_the_flags_are_parsed(data, tiny_sam_checkpoint, capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        run(data, tiny_sam_checkpoint, "--max-instances", "2", f"{flag}={value}")  # "=": "-inf" is not an option
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}: `{flag}` must be " in err and f"got '{value}'" in err, err
    assert not (data / "out").exists()


def test_cache_dir_that_is_a_file(data, tiny_sam_checkpoint, capsys):
    (data / "taken").write_text("x")
    assert run(data, tiny_sam_checkpoint, "--cache-dir", str(data / "taken" / "sub")) == 2
    err = capsys.readouterr().err
    assert "`--cache-dir` must be a folder" in err and "a parent of" in err
    assert not (data / "out").exists() and (data / "taken").read_text() == "x"


def test_photo_that_would_overwrite_an_instance_mask(data, tiny_sam_checkpoint, capsys):
    Image.open(data / "photos" / "00.jpg").save(data / "photos" / "00_inst2.jpg")
    assert run(data, tiny_sam_checkpoint, "--max-instances", "3") == 2
    err = capsys.readouterr().err
    assert "would overwrite instance mask 2" in err and "00_inst2.jpg" in err
    assert not (data / "out").exists()
    assert run(data, tiny_sam_checkpoint) == 0  # fine with one instance per photo


def test_model_without_official_checkpoint_needs_one(data, capsys):
    code = cli.main(["segment", "--ref-image", str(data / "ref.jpg"), "--ref-mask", str(data / "ref_mask.png"),
                     "--images", str(data / "photos"), "--output", str(data / "out"), "--sam-model", "tiny"])
    assert code == 2 and "`--sam-checkpoint` is required for `--sam-model` 'tiny'" in capsys.readouterr().err


def test_help_lists_the_album_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["segment", "--help"])
    out = capsys.readouterr().out
    for flag in ("--method", "--max-instances", "--similarity-threshold", "--overlap-iou", "--batch-size",
                 "--dtype", "--cache-dir", "--overwrite"):
        assert flag in out


def test_max_instances_writes_one_png_per_instance_and_their_union(data, tiny_sam_checkpoint):
    assert run(data, tiny_sam_checkpoint, "--max-instances", "3", "--overlap-iou", "0.9",
               "--similarity-threshold", "-1") == 0
    out = data / "out"
    for row in rows(out):
        stem, instances = row["stem"], row["instances"]
        assert 1 <= row["num_instances"] == len(instances) <= 3
        masks = []
        for i, inst in enumerate(instances, start=1):
            assert inst["mask"] == f"{stem}_inst{i}.png" and inst["index"] == i
            masks.append(np.asarray(Image.open(out / inst["mask"])) > 0)
            assert inst["mask_area"] == int(masks[-1].sum()) and len(inst["points_xy"]) == len(inst["point_labels"])
        union = np.asarray(Image.open(out / f"{stem}.png")) > 0
        assert np.array_equal(union, np.logical_or.reduce(masks)) and row["mask_area"] == int(union.sum())
        assert not (out / f"{stem}_inst{len(instances) + 1}.png").exists()
        assert (out / f"{stem}_overlay.jpg").is_file()
    saved = json.loads((out / "run.json").read_text())["settings"]
    assert (saved["max_instances"], saved["overlap_iou"], saved["similarity_threshold"]) == (3, 0.9, -1.0)
    before = snapshot(out)
    assert run(data, tiny_sam_checkpoint, "--max-instances", "3", "--overlap-iou", "0.9",
               "--similarity-threshold", "-1") == 0  # resumes: everything complete
    assert snapshot(out) == before


def test_max_instances_equals_the_python_api(data, tiny_sam_checkpoint, tiny_sam_model):
    from persam_dreambooth import PerSAM

    assert run(data, tiny_sam_checkpoint, "--max-instances", "2") == 0
    persam = PerSAM(tiny_sam_model)
    persam.set_reference(str(data / "ref.jpg"), str(data / "ref_mask.png"))
    for row in rows(data / "out"):
        want = persam.segment(row["image"], max_instances=2)
        assert [i["points_xy"] for i in row["instances"]] == [w.points_xy.tolist() for w in want]
        for inst, w in zip(row["instances"], want, strict=True):
            assert np.array_equal(np.asarray(Image.open(data / "out" / inst["mask"])) > 0, w.mask)


def test_several_references_equal_the_python_api(data, tiny_sam_checkpoint, tiny_sam_model):
    from persam_dreambooth import PerSAM

    refs = ("--ref-image", "ref.jpg", "ref2.jpg", "--ref-mask", "ref_mask.png", "ref2_mask.png")
    assert run(data, tiny_sam_checkpoint, ref=refs) == 0
    persam = PerSAM(tiny_sam_model)
    persam.set_reference([str(data / "ref.jpg"), str(data / "ref2.jpg")],
                         [str(data / "ref_mask.png"), str(data / "ref2_mask.png")])
    for row in rows(data / "out"):
        want = persam.segment(row["image"])
        assert row["points_xy"] == want.points_xy.tolist()
        assert np.array_equal(np.asarray(Image.open(data / "out" / f"{row['stem']}.png")) > 0, want.mask)
    saved = json.loads((data / "out" / "run.json").read_text())
    assert len(saved["settings"]["references"]) == 2
    assert saved["info"]["reference_images"] == [str(data / "ref.jpg"), str(data / "ref2.jpg")]


@pytest.mark.filterwarnings("ignore:.*covers no whole embedding cell")  # SAM-made masks of a random tiny SAM
def test_several_boxes_make_one_reference_mask_each(data, tiny_sam_checkpoint):
    refs = ("--ref-image", "ref.jpg", "ref2.jpg", "--ref-box", "30,20,100,80", "--ref-box", "25,15,85,65")
    assert run(data, tiny_sam_checkpoint, ref=refs) == 0
    out = data / "out"
    assert Image.open(out / "reference_mask_1.png").size == (128, 96)
    assert Image.open(out / "reference_mask_2.png").size == (100, 80)
    assert (out / "reference_mask_2_overlay.jpg").is_file() and not (out / "reference_mask.png").exists()
    boxes = [r["box"] for r in json.loads((out / "run.json").read_text())["settings"]["references"]]
    assert boxes == [[30.0, 20.0, 100.0, 80.0], [25.0, 15.0, 85.0, 65.0]]


def test_persam_f_records_its_weights_and_equals_the_python_api(data, tiny_sam_checkpoint, tiny_sam_model):
    from persam_dreambooth import PerSAMF

    assert run(data, tiny_sam_checkpoint, "--method", "persam-f") == 0
    saved = json.loads((data / "out" / "run.json").read_text())
    assert saved["settings"]["method"] == "persam-f" and saved["settings"]["persam_f"] == {"steps": 1000, "lr": 1e-3}
    weights = saved["info"]["scale_weights"]
    assert len(weights) == 3 and sum(weights) == pytest.approx(1.0, abs=1e-5)
    persamf = PerSAMF(tiny_sam_model, steps=1000, lr=1e-3)
    persamf.set_reference(str(data / "ref.jpg"), str(data / "ref_mask.png"))
    np.testing.assert_allclose(weights, persamf.scale_weights, atol=1e-6)
    for row in rows(data / "out"):
        assert row["scale_weights"] == weights
        want = persamf.segment(row["image"])
        assert row["points_xy"] == want.points_xy.tolist() and row["point_labels"] == [1]
        assert np.array_equal(np.asarray(Image.open(data / "out" / f"{row['stem']}.png")) > 0, want.mask)


def test_instance_defaults_are_recorded(data, tiny_sam_checkpoint):
    from persam_dreambooth.segmentation.multi_instance import DEFAULT_OVERLAP_IOU, DEFAULT_SIMILARITY_THRESHOLD

    assert run(data, tiny_sam_checkpoint, "--max-instances", "2") == 0
    saved = json.loads((data / "out" / "run.json").read_text())["settings"]
    assert (saved["similarity_threshold"], saved["overlap_iou"]) == (DEFAULT_SIMILARITY_THRESHOLD, DEFAULT_OVERLAP_IOU)
    explicit = ("--max-instances", "2", "--similarity-threshold", str(DEFAULT_SIMILARITY_THRESHOLD))
    assert run(data, tiny_sam_checkpoint, *explicit) == 0  # the same settings: resumes, no refusal


def test_persam_f_with_two_references_instances_and_batches(data, tiny_sam_checkpoint, tiny_sam_model):
    from persam_dreambooth import PerSAMF

    refs = ("--ref-image", "ref.jpg", "ref2.jpg", "--ref-mask", "ref_mask.png", "ref2_mask.png")
    assert run(data, tiny_sam_checkpoint, "--method", "persam-f", "--max-instances", "2", "--batch-size", "2",
               ref=refs) == 0
    persamf = PerSAMF(tiny_sam_model)
    persamf.set_reference([str(data / "ref.jpg"), str(data / "ref2.jpg")],
                          [str(data / "ref_mask.png"), str(data / "ref2_mask.png")])  # fitted on both jointly
    for row in rows(data / "out"):
        np.testing.assert_allclose(row["scale_weights"], persamf.scale_weights, atol=1e-6)
        assert 1 <= row["num_instances"] <= 2 and row["point_labels"] == [1]


def test_config_file_holds_the_settings_and_flags_win(data, tiny_sam_checkpoint):
    import yaml

    config = data / "segment.yaml"
    config.write_text(yaml.safe_dump({
        "ref_image": [str(data / "ref.jpg")], "ref_mask": [str(data / "ref_mask.png")],
        "images": [str(data / "photos")], "output": str(data / "from_yaml"), "sam_model": "tiny",
        "sam_checkpoint": str(tiny_sam_checkpoint), "device": "cpu", "batch_size": 3, "method": "persam_f",
    }))
    assert cli.main(["segment", "--config", str(config), "--batch-size", "2"]) == 0
    saved = json.loads((data / "from_yaml" / "run.json").read_text())
    assert saved["settings"]["method"] == "persam-f"  # persam_f accepted; run.json keeps the command's spelling
    assert saved["info"]["batch_size"] == 2  # the flag wins over the file
    assert [r["stem"] for r in rows(data / "from_yaml")] == ["00", "01", "02"]


def test_config_file_errors_name_the_flag(data, tiny_sam_checkpoint, capsys):
    config = data / "bad.yaml"
    config.write_text(f"ref_image: [{data / 'ref.jpg'}]\nref_mask: [{data / 'ref_mask.png'}]\n"
                      f"images: [{data / 'photos'}]\noutput: {data / 'out'}\nbatch_size: 0\nsam_model: tiny\n"
                      f"sam_checkpoint: {tiny_sam_checkpoint}\n")
    assert cli.main(["segment", "--config", str(config)]) == 2
    assert "`--batch-size` must be an integer >= 1, got '0'" in capsys.readouterr().err
    assert not (data / "out").exists()
