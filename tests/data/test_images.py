"""data.images: every image and mask format users have, EXIF orientation, and errors naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from persam_dreambooth.data.images import (
    check_same_size,
    check_unique_stems,
    find_mask_for,
    list_images,
    load_image,
    load_mask,
    open_image,
)


def _two_colour(h=10, w=20):
    """Left half red, right half blue, (h, w, 3) uint8."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2 :] = (0, 0, 255)
    return arr


# ------------------------------------------------------------------------------------------------------ images
def test_jpeg_path(tmp_path):
    Image.fromarray(_two_colour()).save(tmp_path / "a.jpg", quality=95)
    arr = load_image(tmp_path / "a.jpg")
    assert arr.shape == (10, 20, 3) and arr.dtype == np.uint8
    assert arr[5, 2, 0] > 200 and arr[5, 17, 2] > 200


@pytest.mark.parametrize("orientation,shape,top_left_is_red", [(1, (10, 20), True), (3, (10, 20), False),
                                                                (6, (20, 10), True), (8, (20, 10), False)])
def test_exif_orientation_is_applied(tmp_path, orientation, shape, top_left_is_red):
    img = Image.fromarray(_two_colour())
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    arr = load_image(str(tmp_path / "o.jpg"))
    assert arr.shape[:2] == shape
    # 6 = rotate 90 clockwise for display: the red left half ends up on top; 8 = counter-clockwise: on the bottom
    assert (arr[0, 0, 0] > 200) == top_left_is_red
    mask = load_mask(tmp_path / "o.jpg")  # masks get the same orientation as their photos
    assert mask.shape == shape


def test_grayscale_rgba_palette_cmyk_1bit(tmp_path):
    rgb = _two_colour()
    Image.fromarray(rgb).convert("L").save(tmp_path / "l.png")
    gray = load_image(tmp_path / "l.png")
    assert gray.shape == (10, 20, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    rgba = np.dstack([rgb, np.full((10, 20), 7, np.uint8)])  # almost transparent: colour is kept, alpha dropped
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert np.array_equal(load_image(tmp_path / "rgba.png"), rgb)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    assert np.array_equal(load_image(tmp_path / "p.png"), rgb)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    cmyk = load_image(tmp_path / "cmyk.jpg")
    assert cmyk.shape == (10, 20, 3) and cmyk[5, 2, 0] > 200 and cmyk[5, 17, 2] > 200
    Image.fromarray(rgb).convert("1").save(tmp_path / "one.png")
    assert set(np.unique(load_image(tmp_path / "one.png"))) <= {0, 255}


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    deep = np.array([[0, 257, 65535], [32896, 1000, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d16.png")
    assert Image.open(tmp_path / "d16.png").mode.startswith("I")
    arr = load_image(tmp_path / "d16.png")
    assert arr.shape == (2, 3, 3)
    assert arr[..., 0].tolist() == [[0, 1, 255], [128, 4, 255]]
    assert load_image(deep)[..., 1].tolist() == [[0, 1, 255], [128, 4, 255]]


def test_arrays_and_pil_inputs():
    rgb = _two_colour()
    assert load_image(rgb) is not None and np.array_equal(load_image(rgb), rgb)
    assert np.array_equal(load_image(Image.fromarray(rgb)), rgb)
    assert load_image(rgb[..., 0]).shape == (10, 20, 3)
    assert load_image(rgb[..., :1]).shape == (10, 20, 3)
    assert np.array_equal(load_image(np.dstack([rgb, np.zeros((10, 20), np.uint8)])), rgb)
    floats = load_image(rgb.astype(np.float32) / 255.0)
    assert np.array_equal(floats, rgb)
    assert load_image(np.ones((2, 2), dtype=bool)).max() == 255


def test_image_errors_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="`photo` file .*missing.jpg"):
        load_image(tmp_path / "missing.jpg", "photo")
    with pytest.raises(ValueError, match="`photo` must be an image file, but .* is a folder"):
        load_image(tmp_path, "photo")
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="`photo` file .*bad.jpg.* is not a readable image"):
        load_image(tmp_path / "bad.jpg", "photo")
    with pytest.raises(ValueError, match=r"`photo` must be an array of shape .* got \(4, 4, 5\)"):
        load_image(np.zeros((4, 4, 5), np.uint8), "photo")
    with pytest.raises(ValueError, match="`photo` is empty"):
        load_image(np.zeros((0, 4, 3), np.uint8), "photo")
    with pytest.raises(TypeError, match="`photo` must be a path, a PIL image or a numpy array, got list"):
        load_image([1, 2], "photo")


def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="safety limit"):
        open_image(tmp_path / "big.png", "photo")


# ------------------------------------------------------------------------------------------------------- masks
def _shape():
    m = np.zeros((6, 8), dtype=bool)
    m[1:4, 2:7] = True
    return m


@pytest.mark.parametrize("kind", ["bool", "uint8_01", "uint8_255", "uint8_128", "float01", "uint16", "int64",
                                  "rgb_array", "rgba_array_alpha", "la_array_alpha"])
def test_mask_arrays(kind):
    m = _shape()
    given = {
        "bool": m,
        "uint8_01": m.astype(np.uint8),
        "uint8_255": m.astype(np.uint8) * 255,
        "uint8_128": m.astype(np.uint8) * 128,
        "float01": m.astype(np.float32),
        "uint16": m.astype(np.uint16) * 65535,
        "int64": m.astype(np.int64),
        "rgb_array": np.dstack([m * 128, m * 0, m * 0]).astype(np.uint8),
        "rgba_array_alpha": np.dstack([np.full((6, 8, 3), 90, np.uint8), m.astype(np.uint8) * 255]),
        "la_array_alpha": np.dstack([np.full((6, 8), 90, np.uint8), m.astype(np.uint8) * 255]),
    }[kind]
    got = load_mask(given)
    assert got.dtype == bool and got.shape == (6, 8)
    assert np.array_equal(got, m)


def test_opaque_rgba_array_uses_colour():
    m = _shape()
    rgba = np.dstack([m * 255, m * 0, m * 0, np.full((6, 8), 255)]).astype(np.uint8)
    assert np.array_equal(load_mask(rgba), m)


@pytest.mark.parametrize("mode", ["L", "1", "P_index", "P_white_background", "RGB_128", "RGB_green", "RGBA_alpha",
                                  "RGBA_opaque", "LA_alpha", "I16", "jpeg_L"])
def test_mask_files_and_pil(tmp_path, mode):
    m = _shape()
    u8 = m.astype(np.uint8)
    if mode == "L":
        img = Image.fromarray(u8 * 255)
    elif mode == "1":
        img = Image.fromarray(u8 * 255).convert("1")
    elif mode == "P_index":  # PerSeg-style palette PNG: index 1 = (128, 0, 0)
        img = Image.fromarray(u8).convert("P")
        img.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    elif mode == "P_white_background":  # index 0 is background whatever its colour
        img = Image.fromarray(u8).convert("P")
        img.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    elif mode == "RGB_128":
        img = Image.fromarray(np.dstack([u8 * 128, u8 * 0, u8 * 0]))
    elif mode == "RGB_green":
        img = Image.fromarray(np.dstack([u8 * 0, u8 * 200, u8 * 0]))
    elif mode == "RGBA_alpha":  # cut-out PNG: colour everywhere, alpha = object
        img = Image.fromarray(np.dstack([np.full((6, 8, 3), 77, np.uint8), u8 * 255]))
    elif mode == "RGBA_opaque":  # alpha all 255: the colour decides
        img = Image.fromarray(np.dstack([u8 * 255, u8 * 255, u8 * 255, np.full((6, 8), 255, np.uint8)]))
    elif mode == "LA_alpha":
        img = Image.fromarray(np.dstack([np.full((6, 8, 3), 50, np.uint8), u8 * 255])).convert("LA")
    elif mode == "I16":
        img = Image.fromarray(m.astype(np.uint16) * 1000)
    else:  # a JPEG-compressed 0/255 mask is still a mask (with JPEG noise, nonzero = object)
        img = Image.fromarray(u8 * 255)
    path = tmp_path / ("m.jpg" if mode == "jpeg_L" else "m.png")
    img.save(path, **({"quality": 100} if mode == "jpeg_L" else {}))
    from_file = load_mask(path)
    assert from_file.dtype == bool and from_file.shape == (6, 8)
    if mode == "jpeg_L":
        assert from_file[m].all()  # the object is fully inside; the background may pick up JPEG ringing
        return
    assert np.array_equal(from_file, m), mode
    assert np.array_equal(load_mask(Image.open(path)), m)


def test_a_noisy_jpeg_mask_is_loaded_with_a_warning(tmp_path, caplog):
    m = np.zeros((64, 80), dtype=bool)
    m[10:50, 20:60] = True
    Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / "m.jpg", quality=75)
    Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / "m.png")
    with caplog.at_level("WARNING", logger="persam_dreambooth.data.images"):
        load_mask(tmp_path / "m.png", "--ref-mask")
        assert not caplog.records  # a clean PNG: no warning
        loaded = load_mask(tmp_path / "m.jpg", "--ref-mask")
    assert loaded[m].all() and loaded.sum() > m.sum()  # the rule stays "nonzero = object"; the noise is named
    assert "`--ref-mask`" in caplog.text and "is a JPEG" in caplog.text and "Save masks as PNG" in caplog.text


def test_mask_errors_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="`--ref-mask` file"):
        load_mask(tmp_path / "nope.png", "--ref-mask")
    with pytest.raises(ValueError, match=r"`--ref-mask` must be an array of shape"):
        load_mask(np.zeros((2, 2, 2, 2)), "--ref-mask")
    with pytest.raises(TypeError, match="`--ref-mask` must be a path"):
        load_mask(3, "--ref-mask")


def test_check_same_size_names_both_sizes():
    check_same_size((480, 640, 3), (480, 640))
    with pytest.raises(ValueError, match=r"`m` has size \(H, W\) = \(480, 641\) but `img` has \(480, 640\)"):
        check_same_size((480, 640, 3), (480, 641), "img", "m")


# ------------------------------------------------------------------------------------------------------ listing
def test_list_images(tmp_path, caplog):
    for name in ("b.jpg", "a.PNG", "c.webp", ".hidden.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    with caplog.at_level("INFO", logger="persam_dreambooth.data.images"):
        assert [p.name for p in list_images(tmp_path, "--images")] == ["a.PNG", "b.jpg", "c.webp"]
    assert "`--images`: skipped 1 file(s)" in caplog.text and "notes.txt" in caplog.text  # not silently
    with pytest.raises(FileNotFoundError, match="`--images`: .*missing"):
        list_images([tmp_path / "missing"], "--images")
    with pytest.raises(ValueError, match="holds no image"):
        list_images(tmp_path / "sub", "--images")
    with pytest.raises(ValueError, match="is empty"):
        list_images([], "--images")
    files = list_images([str(tmp_path / "c.webp"), str(tmp_path / "b.jpg")])
    assert [p.name for p in files] == ["c.webp", "b.jpg"]  # given files keep the user's order


def test_find_mask_for(tmp_path):
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "00.png").write_bytes(b"x")
    (tmp_path / "masks" / "01.JPG").write_bytes(b"x")
    assert find_mask_for(tmp_path / "00.jpg", tmp_path / "masks") == tmp_path / "masks" / "00.png"
    assert find_mask_for("photos/01.jpeg", tmp_path / "masks").name == "01.JPG"
    assert find_mask_for("02.jpg", tmp_path / "masks") is None


def test_check_unique_stems():
    assert check_unique_stems(["x/a.jpg", "y/b.png"]) == ["a", "b"]
    with pytest.raises(ValueError, match=r"`--images`: 'x/a.jpg' and 'y/a.png' have the same name stem 'a'"):
        check_unique_stems(["x/a.jpg", "y/a.png"], "--images")
    with pytest.raises(ValueError, match="same name stem"):
        check_unique_stems(["A.jpg", "a.jpg"])  # would collide on a case-insensitive disk
    with pytest.raises(ValueError, match="reference_mask"):
        check_unique_stems(["reference_mask.jpg"], reserved=("reference_mask",))
