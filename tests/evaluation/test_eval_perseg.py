"""``persam-dreambooth eval-perseg`` end to end on a tiny PerSeg-layout folder, with the tiny SAM."""

from __future__ import annotations

import json
import logging
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from persam_dreambooth import cli
from persam_dreambooth import testing as tiny
from persam_dreambooth.data.images import load_mask
from persam_dreambooth.evaluation.perseg import discover_perseg
from persam_dreambooth.evaluation.segmentation_metrics import PooledIoU


@pytest.fixture(autouse=True)
def _register():
    tiny.register_tiny_sam()


def _palette_annotation(mask: np.ndarray) -> Image.Image:
    """PerSeg's annotation format: palette PNG, index 1 = RGB (128, 0, 0)."""
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    return img


@pytest.fixture
def perseg(tmp_path):
    root = tmp_path / "perseg"
    for k, obj in enumerate(("duck", "red_can")):
        (root / "Images" / obj).mkdir(parents=True)
        (root / "Annotations" / obj).mkdir(parents=True)
        for i in range(3):
            image, mask = tiny.synthetic_subject(64, 80, box_yx=(10 + 4 * i, 12 + 3 * i, 44 + 2 * i, 60),
                                                 seed=10 * k + i, color=(200, 60 + 80 * k, 40))
            Image.fromarray(image).save(root / "Images" / obj / f"{i:02d}.jpg", quality=95)
            _palette_annotation(mask).save(root / "Annotations" / obj / f"{i:02d}.png")
    return root


def _run(perseg, ckpt, out, *extra):
    return cli.main(["eval-perseg", "--data", str(perseg), "--output", str(out), "--sam-model", "tiny",
                     "--sam-checkpoint", str(ckpt), "--device", "cpu", *extra])


def test_end_to_end_metrics_match_the_written_masks(perseg, tiny_sam_checkpoint, tmp_path):
    out = tmp_path / "eval"
    assert _run(perseg, tiny_sam_checkpoint, out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "persam" and metrics["ref"] == "00"
    assert set(metrics["classes"]) == {"duck", "red_can"}
    # Recompute every number from the written masks and the annotations: the reference (00) is excluded.
    means = []
    for obj, c in metrics["classes"].items():
        assert c["images"] == 2
        acc = PooledIoU()
        for stem in ("01", "02"):
            pred = load_mask(out / "masks" / obj / f"{stem}.png")
            gt = load_mask(perseg / "Annotations" / obj / f"{stem}.png")
            acc.add(pred, gt)
            assert (out / "overlays" / obj / f"{stem}.jpg").is_file()
        assert not (out / "masks" / obj / "00.png").exists()
        assert c["iou"] == pytest.approx(100 * acc.iou)
        assert c["biou"] == pytest.approx(100 * acc.biou)
        means.append(100 * acc.iou)
    assert metrics["overall"]["mIoU"] == pytest.approx(sum(means) / 2)
    table = (out / "metrics.md").read_text()
    assert "| duck | 2 |" in table and "**mean**" in table


def test_reference_is_chosen_by_stem_not_substring(perseg, tiny_sam_checkpoint, tmp_path):
    # "100"-like stems must not be mistaken for the reference "00" (the published script's substring bug).
    for obj in ("duck", "red_can"):
        for folder, ext in (("Images", "jpg"), ("Annotations", "png")):
            (perseg / folder / obj / f"02.{ext}").rename(perseg / folder / obj / f"100.{ext}")
    objects = discover_perseg(perseg, "00")
    assert [t[0] for t in objects[0].tests] == ["01", "100"]
    out = tmp_path / "eval"
    assert _run(perseg, tiny_sam_checkpoint, out, "--ref", "01") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["name"] for r in metrics["classes"]["duck"]["per_image"]] == ["00", "100"]


def test_bad_inputs_fail_before_writing(perseg, tiny_sam_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    assert _run(perseg, tiny_sam_checkpoint, out, "--ref", "07") == 2
    assert "`--ref` '07'" in capsys.readouterr().err
    assert not out.exists()
    (perseg / "Annotations" / "duck" / "01.png").unlink()
    assert _run(perseg, tiny_sam_checkpoint, out) == 2
    assert "has no annotation with stem '01'" in capsys.readouterr().err
    assert not out.exists()
    assert _run(tmp_path / "nowhere", tiny_sam_checkpoint, out) == 2
    assert "`--data` folder" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("x")
    (perseg / "Annotations" / "duck" / "01.png").write_bytes(b"")  # restore a (broken) file for layout checks
    assert _run(perseg, tiny_sam_checkpoint, afile) == 2
    assert "`--output` must be a folder" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["corrupt_test_image", "annotation_size", "empty_reference", "bad_checkpoint"])
def test_bad_files_anywhere_fail_before_anything_is_written(perseg, tiny_sam_checkpoint, tmp_path, capsys, damage):
    # damage in the *last* object: a run that checked files lazily would already have written the first's masks
    ckpt = tiny_sam_checkpoint
    if damage == "corrupt_test_image":
        (perseg / "Images" / "red_can" / "02.jpg").write_bytes(b"not a jpeg")
        message = "02.jpg"
    elif damage == "annotation_size":
        _palette_annotation(np.ones((10, 10), dtype=bool)).save(perseg / "Annotations" / "red_can" / "01.png")
        message = "(10, 10)"
    elif damage == "empty_reference":
        _palette_annotation(np.zeros((64, 80), dtype=bool)).save(perseg / "Annotations" / "red_can" / "00.png")
        message = "is empty"
    else:
        ckpt = tmp_path / "other.pth"
        torch.save(tiny.tiny_sam(dim=16).state_dict(), ckpt)
        message = "does not fit"
    out = tmp_path / "eval"
    assert _run(perseg, ckpt, out) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_layout_folder_is_named(tmp_path, tiny_sam_checkpoint, capsys):
    (tmp_path / "d" / "Images" / "x").mkdir(parents=True)
    assert _run(tmp_path / "d", tiny_sam_checkpoint, tmp_path / "o") == 2
    assert "Annotations" in capsys.readouterr().err


def test_persam_f_end_to_end_records_the_weights(perseg, tiny_sam_checkpoint, tmp_path):
    out = tmp_path / "eval_f"
    assert _run(perseg, tiny_sam_checkpoint, out, "--method", "persam-f") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "persam-f"
    for obj, c in metrics["classes"].items():
        assert c["images"] == 2 and len(c["scale_weights"]) == 3
        assert sum(c["scale_weights"]) == pytest.approx(1.0, abs=1e-5)
        acc = PooledIoU()
        for stem in ("01", "02"):
            acc.add(load_mask(out / "masks" / obj / f"{stem}.png"),
                    load_mask(perseg / "Annotations" / obj / f"{stem}.png"))
        assert c["iou"] == pytest.approx(100 * acc.iou)
    assert metrics["classes"]["duck"]["scale_weights"] != metrics["classes"]["red_can"]["scale_weights"]


def test_method_spellings_and_bad_method(perseg, tiny_sam_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval_alias"
    assert _run(perseg, tiny_sam_checkpoint, out, "--method", "persam_f") == 0  # the code spelling is an alias
    assert json.loads((out / "metrics.json").read_text())["method"] == "persam-f"
    assert _run(perseg, tiny_sam_checkpoint, tmp_path / "bad", "--method", "sam") == 2
    assert "`--method` must be one of ['persam', 'persam-f'], got 'sam'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_settings_from_a_config_file(perseg, tiny_sam_checkpoint, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(f"data: {perseg}\noutput: {tmp_path / 'from_yaml'}\nsam_model: tiny\n"
                      f"sam_checkpoint: {tiny_sam_checkpoint}\ndevice: cpu\nref: '01'\n")
    assert cli.main(["eval-perseg", "--config", str(config)]) == 0
    metrics = json.loads((tmp_path / "from_yaml" / "metrics.json").read_text())
    assert metrics["ref"] == "01" and metrics["method"] == "persam"
    assert all((tmp_path / "from_yaml" / "masks" / obj / "00.png").is_file() for obj in metrics["classes"])


def test_bad_checkpoint_is_named_by_its_flag_and_writes_nothing(perseg, tmp_path, capsys):
    other = tmp_path / "other.pth"
    torch.save(tiny.tiny_sam(dim=48).state_dict(), other)
    out = tmp_path / "eval"
    assert _run(perseg, other, out) == 2
    err = capsys.readouterr().err
    assert f"`--sam-checkpoint` {str(other)!r} does not fit" in err and "`checkpoint`" not in err, err
    assert not out.exists(), "a failure before the work leaves no folder (nor lock file)"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_umask_modes(perseg, tiny_sam_checkpoint, tmp_path, umask):
    out = tmp_path / "eval"
    old = os.umask(umask)
    try:
        assert _run(perseg, tiny_sam_checkpoint, out) == 0
    finally:
        os.umask(old)
    paths = [out, *out.rglob("*")]
    assert {"masks", "overlays", "metrics.json", "metrics.md"} <= {p.name for p in paths}
    for path in paths:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_each_object_and_the_persam_f_fit_are_logged(perseg, tiny_sam_checkpoint, tmp_path, caplog):
    """A PerSAM-F fit per object can take minutes on a big reference: each object and each fit say so."""
    with caplog.at_level(logging.INFO):
        assert _run(perseg, tiny_sam_checkpoint, tmp_path / "eval", "--method", "persam-f") == 0
    text = caplog.text
    assert "object 1/2 'duck': setting the reference, then 2 test image(s)" in text
    assert "object 2/2 'red_can'" in text
    assert text.count("PerSAM-F: fitting the scale weights (1000 steps") == 2
    assert text.count("PerSAM-F: scale weights fitted in") == 2


def test_a_second_run_into_the_same_folder_is_refused(perseg, tiny_sam_checkpoint, tmp_path, capsys):
    from persam_dreambooth.utils.locks import lock_output_dir

    out = tmp_path / "eval"
    with lock_output_dir(out, "eval-perseg"):
        assert _run(perseg, tiny_sam_checkpoint, out) == 2
    err = capsys.readouterr().err
    assert f"`--output` {str(out)!r} is in use by another run (PID {os.getpid()}" in err, err
    assert sorted(p.name for p in out.iterdir()) == [".persam.lock"]
