"""Mask sets made by PerSAM (tiny SAM) from a reference mask or box, and copied from a folder."""

import os
import stat

import numpy as np
import pytest
from PIL import Image

from persam_dreambooth import testing as tiny
from persam_dreambooth.masks import MaskSet
from persam_dreambooth.masks.make import copy_mask_set, make_mask_set, segmenter_class
from persam_dreambooth.utils.overlay import masks_grid, overlay_mask


@pytest.fixture
def album(tmp_path):
    masks = tiny.write_instance_dir(tmp_path / "img", n=2)
    ref_mask = tmp_path / "ref.png"
    Image.fromarray(masks["00"].astype(np.uint8) * 255).save(ref_mask)
    return sorted((tmp_path / "img").iterdir()), ref_mask, masks


def test_persam_from_reference_mask_writes_a_complete_set(tmp_path, album, tiny_sam_model):
    images, ref_mask, _ = album
    out = tmp_path / "run" / "masks"
    mask_set = make_mask_set(images, out, images[0], reference_mask=ref_mask, sam=tiny_sam_model,
                             sam_model_type="tiny", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["00.png", "01.png", "masks.json", "masks_grid.jpg"]
    record = MaskSet.read(out).record
    assert record == mask_set.record
    assert record["method"] == "persam" and record["sam_model_type"] == "tiny"
    assert record["reference"]["mask"] == str(ref_mask.resolve()) and record["reference"]["box"] is None
    assert set(record["images"]) == {"00", "01"}
    for stem, entry in record["images"].items():
        mask = mask_set.load_for(images[int(stem)])
        assert mask.shape == (48, 64) and mask.any()
        assert entry["coverage"] == pytest.approx(mask.mean(), abs=1e-6)
        assert {"score", "points_xy", "image"} <= set(entry)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_persam_from_a_box_and_bad_prompts(tmp_path, album, tiny_sam_model):
    images, _, _ = album
    mask_set = make_mask_set(images, tmp_path / "m", images[1], reference_box=[10, 8, 50, 40], sam=tiny_sam_model,
                             sam_model_type="tiny", progress=False)
    assert mask_set.record["reference"]["box"] == [10, 8, 50, 40]
    assert isinstance(mask_set.record["reference"]["reference_mask_score"], float)
    with pytest.raises(ValueError, match="exactly one of"):
        make_mask_set(images, tmp_path / "x", images[0], sam=tiny_sam_model, progress=False)
    with pytest.raises(ValueError, match="box_xyxy"):
        make_mask_set(images, tmp_path / "x", images[0], reference_box=[0, 0, 500, 10], sam=tiny_sam_model,
                      progress=False)
    assert not (tmp_path / "x").exists()


def test_segmenter_class_names_the_methods():
    from persam_dreambooth.segmentation.persam import PerSAM
    from persam_dreambooth.segmentation.persam_f import PerSAMF

    assert segmenter_class("persam") is PerSAM and segmenter_class("persam_f") is PerSAMF
    with pytest.raises(ValueError, match="`mask_method` must be 'persam' or 'persam_f', got 'sam'"):
        segmenter_class("sam")


def test_copy_mask_set_and_grid(tmp_path, album):
    images, _, masks = album
    MaskSet.write(tmp_path / "hand", masks)
    copied = copy_mask_set(images, MaskSet.read(tmp_path / "hand"), tmp_path / "run" / "masks")
    assert copied.record["source"] == "dir" and copied.record["mask_dir"] == str((tmp_path / "hand").resolve())
    assert np.array_equal(copied.load_for(images[1]), masks["01"])
    grid = Image.open(tmp_path / "run" / "masks" / "masks_grid.jpg")
    assert grid.size[0] >= 2 * 64


def test_overlay_tints_only_the_mask():
    image = np.full((10, 12, 3), 100, dtype=np.uint8)
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:8, 3:9] = True
    out = overlay_mask(image, mask)
    assert (out[~mask] == 100).all() and (out[mask][:, 0] > 100).all()
    sheet = masks_grid([image, image], [mask, mask], labels=["a", "b"], tile=32)
    # two 32-px tiles side by side, 4-px padding, one 12-px caption line (10-px font) under the row
    assert sheet.size == (2 * 32 + 3 * 4, 32 + 12 + 2 * 4)
    assert masks_grid([image, image], [mask, mask], tile=32).size == (2 * 32 + 3 * 4, 32 + 2 * 4)


@pytest.mark.filterwarnings("ignore:.*covers no whole embedding cell")  # SAM-made masks of a random tiny SAM
@pytest.mark.parametrize("prompt", ["mask", "box"])
def test_each_photo_is_encoded_once_when_the_reference_is_one_of_them(tmp_path, tiny_sam_model, monkeypatch, prompt):
    """3 photos, the reference among them: 3 image-encoder calls (the reference's embedding is reused)."""
    from segment_anything.modeling import ImageEncoderViT

    masks = tiny.write_instance_dir(tmp_path / "img", n=3)
    images = sorted((tmp_path / "img").iterdir())
    Image.fromarray(masks["00"].astype(np.uint8) * 255).save(tmp_path / "ref.png")
    calls = [0]
    real = ImageEncoderViT.forward

    def counting(self, x):
        calls[0] += 1
        return real(self, x)

    monkeypatch.setattr(ImageEncoderViT, "forward", counting)
    kwargs = {"reference_mask": tmp_path / "ref.png"} if prompt == "mask" else {"reference_box": [10, 8, 50, 40]}
    make_mask_set(images, tmp_path / "m", images[0], sam=tiny_sam_model, sam_model_type="tiny", progress=False,
                  **kwargs)
    assert calls[0] == 3


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_mask_set_gets_the_umask_modes_not_the_temporary_folders(tmp_path, album, tiny_sam_model, umask):
    """Built in a private temporary folder, the set still gets ``mkdir``/``open`` modes (issue 10: masks/ was 0700)."""
    images, ref_mask, _ = album
    out = tmp_path / "run" / "masks"
    old = os.umask(umask)
    try:
        make_mask_set(images, out, images[0], reference_mask=ref_mask, sam=tiny_sam_model, sam_model_type="tiny",
                      progress=False)
        copy_mask_set(images, MaskSet.read(out), tmp_path / "run" / "copy")
    finally:
        os.umask(old)
    for folder in (out, tmp_path / "run" / "copy"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder
        for path in folder.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
