"""segment-video, eval-davis and frames end to end on the tiny SAM (in-process CLI)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import synthetic_video, write_mp4
from PIL import Image

from persam_dreambooth import PerSAMVideo
from persam_dreambooth import testing as tiny
from persam_dreambooth.cli import main
from persam_dreambooth.data.video import open_video, read_label_map, save_label_png
from persam_dreambooth.segmentation.reference_mask import SmallReferenceWarning

SAMPLE = Path("/work/shared/data/davis_sample")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    frames, labels = synthetic_video(num_frames=6)
    folder = tmp_path_factory.mktemp("clip")
    video = write_mp4(folder / "clip.mp4", frames)
    save_label_png(labels[0], folder / "ref.png")
    return video, folder / "ref.png", labels


def _sam_flags(checkpoint: Path) -> list[str]:
    return ["--sam-model", "tiny", "--sam-checkpoint", str(checkpoint), "--device", "cpu"]


def test_segment_video_outputs_match_the_library_and_resume(clip, tiny_sam_checkpoint, tmp_path):
    video, ref, _ = clip
    out = tmp_path / "out"
    args = ["segment-video", "--video", str(video), "--ref-mask", str(ref), "--output", str(out),
            *_sam_flags(tiny_sam_checkpoint)]
    assert main(args) == 0
    pngs = sorted(p.name for p in (out / "labels").iterdir())
    assert pngs == [f"{i:05d}.png" for i in range(6)]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(6))
    assert {o["label"] for o in rows[1]["objects"]} == {1, 2}
    assert all({"score", "box", "area"} <= set(o) for r in rows for o in r["objects"])
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    overlay = open_video(out / "overlay.mp4")
    assert overlay.size == (96, 128) and len(list(overlay.frames())) == 6

    frames = [f.image for f in open_video(video).frames()]
    expected = PerSAMVideo(tiny.tiny_sam()).track(frames, read_label_map(ref))
    for i in range(6):
        np.testing.assert_array_equal(read_label_map(out / "labels" / f"{i:05d}.png"), expected[i])

    # interrupted after frame 3: the rerun redoes 4 and 5 with the same state as an uninterrupted run
    first_pngs = {i: (out / "labels" / f"{i:05d}.png").read_bytes() for i in range(6)}
    for i in (4, 5):
        (out / "labels" / f"{i:05d}.png").unlink()
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])  # a torn last line
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["frames_this_run"] == 2 and run["frames_done"] == 6
    assert {i: (out / "labels" / f"{i:05d}.png").read_bytes() for i in range(6)} == first_pngs
    assert len((out / "results.jsonl").read_text().splitlines()) == 6
    assert main(args) == 0 and json.loads((out / "run.json").read_text())["frames_this_run"] == 0


def test_segment_video_box_every_nth_and_persam_f(clip, tiny_sam_checkpoint, tmp_path):
    video, _, _ = clip
    out = tmp_path / "out"
    folder = tmp_path / "frames"
    folder.mkdir()
    for data in open_video(video).frames():
        Image.fromarray(data.image).save(folder / f"img_{data.index}.png")
    assert main(["segment-video", "--frames", str(folder), "--ref-box", "20,20,70,70",
                 "--ref-frame", "1", "--every-nth", "2", "--method", "persam-f", "--max-frames", "2",
                 "--output", str(out), "--no-overlay", *_sam_flags(tiny_sam_checkpoint)]) == 0
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["img_1.png", "img_3.png"]
    assert not (out / "overlay.mp4").exists()
    # other settings in the same folder: refused without --overwrite
    code = main(["segment-video", "--frames", str(folder), "--ref-box", "20,20,70,70", "--output", str(out),
                 *_sam_flags(tiny_sam_checkpoint)])
    assert code == 2 and sorted(p.name for p in (out / "labels").iterdir()) == ["img_1.png", "img_3.png"]
    assert main(["segment-video", "--frames", str(folder), "--ref-point", "45,45", "--output", str(out),
                 "--overwrite", "--no-overlay", *_sam_flags(tiny_sam_checkpoint)]) == 0
    assert len(list((out / "labels").iterdir())) == 6
    assert json.loads((out / "run.json").read_text())["settings"]["reference"]["point"] == "45,45"


@pytest.mark.parametrize("case", ["not_video", "zero_frames", "ref_frame", "mask_size", "empty_mask", "two_refs"])
def test_segment_video_bad_input_one_line_error_and_nothing_written(clip, tiny_sam_checkpoint, tmp_path, capsys,
                                                                     case):
    video, ref, labels = clip
    out = tmp_path / "out"
    source, mask, extra, flag = str(video), str(ref), [], "--video"
    if case == "not_video":
        (tmp_path / "notes.mp4").write_text("hello")
        source = str(tmp_path / "notes.mp4")
    elif case == "zero_frames":
        import av

        source = str(tmp_path / "empty.mp4")
        with av.open(source, "w") as container:
            stream = container.add_stream("libx264", rate=10)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            container.start_encoding()
    elif case == "ref_frame":
        extra, flag = ["--ref-frame", "6"], "--ref-frame"
    elif case == "mask_size":
        save_label_png(labels[0][:-1], tmp_path / "small.png")
        mask, flag = str(tmp_path / "small.png"), "--ref-mask"
    elif case == "empty_mask":
        save_label_png(np.zeros_like(labels[0]), tmp_path / "empty.png")
        mask, flag = str(tmp_path / "empty.png"), "--ref-mask"
    else:
        extra, flag = ["--ref-point", "3,3"], "--ref-mask"
    code = main(["segment-video", "--video", source, "--ref-mask", mask, "--output", str(out), *extra,
                 *_sam_flags(tiny_sam_checkpoint)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and f"`{flag}`" in err[0]
    assert not out.exists()


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="shared DAVIS sample not available")
def test_eval_davis_on_the_shared_sample(tiny_sam_checkpoint, tmp_path):
    out = tmp_path / "eval"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallReferenceWarning)  # synth-exit's duck is below one patch (Fix C)
        assert main(["eval-davis", "--data", str(SAMPLE), "--output", str(out), *_sam_flags(tiny_sam_checkpoint)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["J&F-Mean"] <= 1.0
    assert sorted(metrics["per_object"]) == ["synth-exit_1", "synth-exit_2", "synth-occlude_1", "synth-occlude_2"]
    assert (out / "metrics.md").read_text().startswith("# DAVIS-2017")
    assert len(list((out / "predictions" / "synth-exit").glob("*.png"))) == 8
    assert json.loads((out / "run.json").read_text())["sequences_this_run"] == 2
    assert main(["eval-davis", "--data", str(SAMPLE), "--output", str(out), *_sam_flags(tiny_sam_checkpoint)]) == 0
    assert json.loads((out / "run.json").read_text())["sequences_this_run"] == 0
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_frames_command_picks_sharp_diverse_present_frames(clip, tiny_sam_checkpoint, tmp_path):
    video, ref, _ = clip
    out = tmp_path / "sel"
    assert main(["frames", "--video", str(video), "--ref-mask", str(ref), "--output", str(out), "--num-frames", "3",
                 "--min-score", "-1", *_sam_flags(tiny_sam_checkpoint)]) == 0
    chosen = sorted(p.stem for p in (out / "instance_frames").iterdir())
    assert len(chosen) == 3
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == chosen
    assert (out / "masks" / "masks.json").is_file() and (out / "masks_grid.jpg").is_file()
    selection = json.loads((out / "frame_selection.json").read_text())
    candidates = selection["candidates"]
    assert len(candidates) == 6 and sorted(c["name"] for c in candidates if c["chosen"]) == chosen
    present = [c for c in candidates if c["present"]]
    median = float(np.median([c["sharpness"] for c in present]))
    assert all(c["present"] and c["sharpness"] >= median for c in candidates if c["chosen"])
    assert max(present, key=lambda c: c["sharpness"])["chosen"]  # farthest-point sampling starts at the sharpest
    with Image.open(out / "instance_frames" / f"{chosen[0]}.jpg") as image:
        assert image.size == (128, 96)
    assert not list(out.glob(".frames.*"))
    # nobody reaches a predicted IoU of 2: only the marked frame counts as present
    assert main(["frames", "--video", str(video), "--ref-mask", str(ref), "--output", str(tmp_path / "x"),
                 "--min-score", "2", *_sam_flags(tiny_sam_checkpoint)]) == 0
    assert [p.stem for p in (tmp_path / "x" / "instance_frames").iterdir()] == ["frame_00000"]
    code = main(["frames", "--video", str(video), "--ref-box", "1,2,3", "--output", str(tmp_path / "y"),
                 *_sam_flags(tiny_sam_checkpoint)])
    assert code == 2 and not (tmp_path / "y").exists()


def test_flag_values_are_checked_and_a_config_file_works(clip, tiny_sam_checkpoint, tmp_path, capsys):
    video, ref, _ = clip
    code = main(["segment-video", "--video", str(video), "--ref-mask", str(ref), "--output", str(tmp_path / "o"),
                 "--every-nth", "0", *_sam_flags(tiny_sam_checkpoint)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "`--every-nth`" in err[0]
    config = tmp_path / "run.yaml"
    config.write_text(f"video: {video}\nref_mask: {ref}\nmax_frames: 2\nmethod: persam\n", encoding="utf-8")
    assert main(["segment-video", "--config", str(config), "--output", str(tmp_path / "c"), "--no-overlay",
                 *_sam_flags(tiny_sam_checkpoint)]) == 0
    assert sorted(p.name for p in (tmp_path / "c" / "labels").iterdir()) == ["00000.png", "00001.png"]
