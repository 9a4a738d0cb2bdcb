"""MaskSet: one mask per image (same stem) + masks.json; the checks training relies on."""

import numpy as np
import pytest
from PIL import Image

from persam_dreambooth.masks import MaskSet


def _images(folder, n=2, hw=(20, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"photo{i}.jpg"
        Image.fromarray(np.full((*hw, 3), 100 + i, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_write_read_round_trip(tmp_path):
    images = _images(tmp_path / "img")
    masks = {p.stem: np.zeros((20, 30), dtype=bool) for p in images}
    for m in masks.values():
        m[5:10, 5:20] = True
    written = MaskSet.write(tmp_path / "masks", masks, {"source": "test"})
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["masks.json", "photo0.png", "photo1.png"]
    again = MaskSet.read(tmp_path / "masks")
    assert again.record == written.record and again.record["source"] == "test"
    assert np.array_equal(again.load_for(images[1]), masks["photo1"])
    assert again.check_images(images) == {p: tmp_path / "masks" / f"{p.stem}.png" for p in images}
    png = np.asarray(Image.open(tmp_path / "masks" / "photo0.png"))
    assert png.dtype == np.uint8 and set(np.unique(png)) == {0, 255}


def test_hand_made_folder_without_record_any_format(tmp_path):
    images = _images(tmp_path / "img", n=1)
    (tmp_path / "m").mkdir()
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[2:6, 2:6, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "m" / "photo0.webp", lossless=True)
    mask_set = MaskSet.read(tmp_path / "m")
    assert mask_set.record == {}
    assert mask_set.load_for(images[0]).sum() == 16


def test_check_images_names_each_problem(tmp_path):
    images = _images(tmp_path / "img")
    folder = tmp_path / "masks"
    good = np.zeros((20, 30), dtype=bool)
    good[1:3, 1:3] = True
    MaskSet.write(folder, {"photo0": good})
    with pytest.raises(FileNotFoundError, match=r"no mask for instance image .*photo1\.jpg.*'photo1\.png'"):
        MaskSet.read(folder).check_images(images)
    MaskSet.write(folder, {"photo1": np.ones((21, 30), dtype=bool)})
    with pytest.raises(ValueError, match=r"\(21, 30\) but `image .*photo1\.jpg'` has \(20, 30\)"):
        MaskSet.read(folder).check_images(images)
    MaskSet.write(folder, {"photo1": np.zeros((20, 30), dtype=bool)})
    with pytest.raises(ValueError, match=r"photo1\.png' for image .* is empty"):
        MaskSet.read(folder).check_images(images)
    with pytest.raises(FileNotFoundError, match="`mask_dir` folder .* does not exist"):
        MaskSet.read(tmp_path / "nope")
    (folder / "masks.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MaskSet.read(folder)
