"""``persam-dreambooth segment`` end to end, in-process, with the tiny SAM registered as ``--sam-model tiny``."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from persam_dreambooth import cli
from persam_dreambooth import testing as tiny


@pytest.fixture(autouse=True)
def _only_segment(monkeypatch):
    # test this command on its own, independent of the other sub-command modules
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("segment",))
    tiny.register_tiny_sam()


@pytest.fixture
def data(tmp_path):
    image, mask = tiny.synthetic_subject()
    Image.fromarray(image).save(tmp_path / "ref.jpg", quality=95)
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "ref_mask.png")
    photos = tmp_path / "photos"
    tiny.write_instance_dir(photos, n=2)
    return tmp_path


def run(data, ckpt, *extra, prompt=("--ref-mask",), images=None, output="out"):
    args = ["segment", "--ref-image", str(data / "ref.jpg")]
    if prompt == ("--ref-mask",):
        args += ["--ref-mask", str(data / "ref_mask.png")]
    else:
        args += list(prompt)
    args += ["--images", *(images or [str(data / "photos")]), "--output", str(data / output),
             "--sam-model", "tiny", "--sam-checkpoint", str(ckpt), "--device", "cpu", *extra]
    return cli.main(args)


def test_mask_reference_end_to_end(data, tiny_sam_checkpoint):
    assert run(data, tiny_sam_checkpoint) == 0
    out = data / "out"
    assert sorted(p.name for p in out.iterdir()) == [".persam.lock", "00.png", "00_overlay.jpg", "01.png",
                                                     "01_overlay.jpg", "results.jsonl", "run.json"]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["stem"] for r in rows] == ["00", "01"]
    for row in rows:
        mask = Image.open(out / f"{row['stem']}.png")
        assert mask.mode == "L" and mask.size == (64, 48)
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
        assert row["mask_area"] == int((np.asarray(mask) > 0).sum())
        assert len(row["points_xy"]) == 2 and row["point_labels"] == [1, 0]
        assert isinstance(row["score"], float) and row["seconds"] > 0
        assert Image.open(out / f"{row['stem']}_overlay.jpg").size == (64, 48)


def test_cli_result_equals_python_api(data, tiny_sam_checkpoint, tiny_sam_model):
    from persam_dreambooth import PerSAM

    assert run(data, tiny_sam_checkpoint, images=[str(data / "photos" / "01.jpg")]) == 0
    persam = PerSAM(tiny_sam_model)
    persam.set_reference(str(data / "ref.jpg"), str(data / "ref_mask.png"))
    want = persam.segment(str(data / "photos" / "01.jpg"))
    got = np.asarray(Image.open(data / "out" / "01.png")) > 0
    assert np.array_equal(got, want.mask)
    row = json.loads((data / "out" / "results.jsonl").read_text())
    assert row["points_xy"] == want.points_xy.tolist()
    assert row["score"] == pytest.approx(want.score, abs=1e-6)


@pytest.mark.parametrize("prompt", [("--ref-box", "30,20,100,80"), ("--ref-point", "64,48")])
def test_box_or_point_makes_the_reference_mask_with_sam(data, tiny_sam_checkpoint, prompt):
    assert run(data, tiny_sam_checkpoint, prompt=prompt) == 0
    out = data / "out"
    ref = Image.open(out / "reference_mask.png")
    assert ref.mode == "L" and ref.size == (128, 96) and np.asarray(ref).any()
    assert (out / "reference_mask_overlay.jpg").is_file()
    assert (out / "00.png").is_file() and (out / "results.jsonl").is_file()


def test_file_list_and_odd_formats(data, tiny_sam_checkpoint):
    image, _ = tiny.synthetic_subject(40, 30, box_yx=(10, 5, 30, 25), seed=7)
    Image.fromarray(image).convert("L").save(data / "gray.png")
    Image.fromarray(image).convert("RGBA").save(data / "rgba.png")
    Image.fromarray(image).convert("P").save(data / "pal.png")
    Image.fromarray(image[..., 0].astype(np.uint16) * 257).save(data / "deep16.png")
    files = [str(data / n) for n in ("gray.png", "rgba.png", "pal.png", "deep16.png")]
    assert run(data, tiny_sam_checkpoint, images=files) == 0
    for stem in ("gray", "rgba", "pal", "deep16"):
        assert Image.open(data / "out" / f"{stem}.png").size == (30, 40)


# ------------------------------------------------------------------------------------------------ bad input
def expect_error(capsys, data, ckpt, pattern, **kwargs):
    code = run(data, ckpt, **kwargs)
    err = capsys.readouterr().err
    assert code == 2, err
    assert pattern in err, err
    assert not (data / kwargs.get("output", "out")).exists(), "output folder created despite the error"
    return err


def test_missing_reference_image(data, tiny_sam_checkpoint, capsys):
    (data / "ref.jpg").unlink()
    expect_error(capsys, data, tiny_sam_checkpoint, "`--ref-image` file")


def test_unreadable_reference_image(data, tiny_sam_checkpoint, capsys):
    (data / "ref.jpg").write_text("this is not a jpeg")
    expect_error(capsys, data, tiny_sam_checkpoint, "`--ref-image` file")


def test_mask_size_mismatch_names_both_sizes(data, tiny_sam_checkpoint, capsys):
    Image.new("L", (127, 96), 255).save(data / "ref_mask.png")
    err = expect_error(capsys, data, tiny_sam_checkpoint, "`--ref-mask`")
    assert "(96, 127)" in err and "(96, 128)" in err


def test_empty_reference_mask(data, tiny_sam_checkpoint, capsys):
    Image.new("L", (128, 96), 0).save(data / "ref_mask.png")
    expect_error(capsys, data, tiny_sam_checkpoint, "`--ref-mask`")


def test_unknown_model_type_lists_valid_ones(data, tiny_sam_checkpoint, capsys):
    code = cli.main(["segment", "--ref-image", str(data / "ref.jpg"), "--ref-mask", str(data / "ref_mask.png"),
                     "--images", str(data / "photos"), "--output", str(data / "out"), "--sam-model", "vit_x"])
    err = capsys.readouterr().err
    assert code == 2 and "`--sam-model` must be one of" in err and "vit_h" in err and "'vit_x'" in err
    assert not (data / "out").exists()


def test_output_is_a_file(data, tiny_sam_checkpoint, capsys):
    (data / "taken").write_text("x")
    code = run(data, tiny_sam_checkpoint, output="taken")
    err = capsys.readouterr().err
    assert code == 2 and "`--output` must be a folder" in err
    assert (data / "taken").read_text() == "x"


@pytest.mark.parametrize("box", ["1,2,3", "a,b,c,d", "10,10,5,50", "nan,1,2,3"])
def test_malformed_box(data, tiny_sam_checkpoint, capsys, box):
    expect_error(capsys, data, tiny_sam_checkpoint, "`--ref-box`", prompt=("--ref-box", box))


def test_box_outside_image(data, tiny_sam_checkpoint, capsys):
    err = expect_error(capsys, data, tiny_sam_checkpoint, "`--ref-box`", prompt=("--ref-box", "10,10,200,50"))
    assert "128 x 96" in err and "swapped" not in err


def test_reversed_box_says_the_corners_look_swapped(data, tiny_sam_checkpoint, capsys):
    err = expect_error(capsys, data, tiny_sam_checkpoint, "`--ref-box`", prompt=("--ref-box", "100,80,30,20"))
    assert "'100,80,30,20' (the corners look swapped" in err


@pytest.mark.parametrize("point", ["5", "128,10", "-1,3", "x,y"])
def test_bad_point(data, tiny_sam_checkpoint, capsys, point):
    expect_error(capsys, data, tiny_sam_checkpoint, "`--ref-point`", prompt=(f"--ref-point={point}",))


def test_duplicate_stems(data, tiny_sam_checkpoint, capsys):
    image, _ = tiny.synthetic_subject(40, 30, box_yx=(10, 5, 30, 25))
    Image.fromarray(image).save(data / "photos" / "00.png")  # 00.jpg exists too
    expect_error(capsys, data, tiny_sam_checkpoint, "same name stem '00'")


def test_reserved_stem_with_box(data, tiny_sam_checkpoint, capsys):
    image, _ = tiny.synthetic_subject(40, 30, box_yx=(10, 5, 30, 25))
    Image.fromarray(image).save(data / "photos" / "reference_mask.jpg")
    expect_error(capsys, data, tiny_sam_checkpoint, "reference_mask", prompt=("--ref-point", "60,50"))


def test_unreadable_photo(data, tiny_sam_checkpoint, capsys):
    (data / "photos" / "02.jpg").write_bytes(b"\xff\xd8\xff garbage")
    expect_error(capsys, data, tiny_sam_checkpoint, "`--images` file")


def test_missing_photo_and_empty_folder(data, tiny_sam_checkpoint, capsys):
    expect_error(capsys, data, tiny_sam_checkpoint, "`--images`", images=[str(data / "nope.jpg")])
    (data / "empty").mkdir()
    expect_error(capsys, data, tiny_sam_checkpoint, "holds no image", images=[str(data / "empty")])


def test_missing_checkpoint(data, capsys):
    expect_error(capsys, data, data / "missing.pth", "`--sam-checkpoint` file")


def test_wrong_architecture_checkpoint_writes_nothing(data, tmp_path, capsys):
    other = tmp_path / "other.pth"
    torch.save(tiny.tiny_sam(dim=48).state_dict(), other)
    expect_error(capsys, data, other, "does not fit the SAM 'tiny' architecture")


@pytest.mark.parametrize("damage", ["other architecture", "not a checkpoint"])
def test_bad_checkpoint_errors_name_the_flag_not_the_parameter(data, tmp_path, capsys, damage):
    bad = tmp_path / "bad.pth"
    if damage == "other architecture":
        torch.save(tiny.tiny_sam(dim=48).state_dict(), bad)
    else:
        bad.write_bytes(b"not a pickle")
    err = expect_error(capsys, data, bad, f"`--sam-checkpoint` {str(bad)!r}")
    assert "`checkpoint`" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_umask_modes(data, tiny_sam_checkpoint, umask):
    """Masks, overlays, results.jsonl, run.json and the folder: the modes ``open``/``mkdir`` give (issue 10)."""
    old = os.umask(umask)
    try:
        assert run(data, tiny_sam_checkpoint, prompt=("--ref-box", "30,20,100,80")) == 0
    finally:
        os.umask(old)
    out = data / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    names = sorted(p.name for p in out.iterdir())
    assert {"00.png", "00_overlay.jpg", "reference_mask.png", "results.jsonl", "run.json"} <= set(names)
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_unavailable_device(data, tiny_sam_checkpoint, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code = cli.main(["segment", "--ref-image", str(data / "ref.jpg"), "--ref-mask", str(data / "ref_mask.png"),
                     "--images", str(data / "photos"), "--output", str(data / "out"), "--sam-model", "tiny",
                     "--sam-checkpoint", str(tiny_sam_checkpoint), "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "`--device`" in err and "CUDA is not available" in err
    assert not (data / "out").exists()


def test_segment_is_registered_in_the_full_command_line(monkeypatch, capsys):
    monkeypatch.undo()  # the real COMMAND_MODULES, with every sub-command
    with pytest.raises(SystemExit) as info:
        cli.main(["segment", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--ref-image", "--ref-mask", "--ref-box", "--ref-point", "--images",
                                        "--output", "--sam-model", "--sam-checkpoint", "--device"))


def test_prompt_is_required_and_exclusive(data, tiny_sam_checkpoint):
    with pytest.raises(SystemExit):
        cli.main(["segment", "--ref-image", "r.jpg", "--images", "d", "--output", "o"])
    with pytest.raises(SystemExit):
        cli.main(["segment", "--ref-image", "r.jpg", "--ref-mask", "m.png", "--ref-point", "1,2", "--images", "d",
                  "--output", "o"])
