"""Video input through PyAV (mp4, gif, frame folders, rotation, size changes), label PNGs and the overlay writer."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from helpers import synthetic_video, write_mp4
from PIL import Image

from persam_dreambooth.data.video import (
    VideoWriter,
    davis_palette,
    davis_sequence,
    open_video,
    read_label_map,
    save_label_png,
)


@pytest.fixture(scope="module")
def clip():
    return synthetic_video(num_frames=5)


def test_mp4_frames_stream_back_with_their_pixels(clip, tmp_path):
    frames, _ = clip
    source = open_video(write_mp4(tmp_path / "a.mp4", frames), "--video")
    assert source.size == (96, 128) and source.fps == pytest.approx(10) and source.frame_count == 5
    got = list(source.frames())
    assert [f.index for f in got] == [0, 1, 2, 3, 4]
    for data, frame in zip(got, frames, strict=True):
        assert data.image.dtype == np.uint8 and data.image.shape == frame.shape
        assert np.abs(data.image.astype(int) - frame).max() <= 3  # crf 0, yuv444p: only rounding of the conversion
    assert [f.index for f in source.frames(every_nth=2, start=1)] == [1, 3]
    assert [f.index for f in source.frames(every_nth=1, max_frames=2, start=2)] == [2, 3]


@pytest.mark.parametrize("suffix,codec", [(".mkv", "libx264"), (".webm", "libvpx-vp9"), (".mov", "mpeg4")])
def test_other_containers(clip, tmp_path, suffix, codec):
    frames, _ = clip
    source = open_video(write_mp4(tmp_path / f"a{suffix}", frames, codec=codec), "--video")
    assert source.size == (96, 128) and len(list(source.frames())) == 5


def test_gif_and_frame_folder(clip, tmp_path):
    frames, _ = clip
    images = [Image.fromarray(f) for f in frames]
    images[0].save(tmp_path / "a.gif", save_all=True, append_images=images[1:], duration=100)
    gif = open_video(tmp_path / "a.gif")
    assert gif.size == (96, 128) and len(list(gif.frames())) == 5
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:05d}.png")
    source = open_video(folder, "--frames")
    got = list(source.frames())
    assert source.is_folder and source.frame_count == 5 and source.frame_name(3) == "00003"
    np.testing.assert_array_equal(got[2].image, frames[2])


def test_rotation_metadata_is_applied(clip, tmp_path):
    frames, _ = clip
    path = tmp_path / "portrait.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt, stream.options = 128, 96, "yuv444p", {"crf": "0"}
        stream.set_display_rotation(-90)  # a phone held upright: display = stored frame turned 90 deg clockwise
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    source = open_video(path)
    assert source.size == (128, 96) and source.rotation == -90
    first = next(source.frames()).image
    assert np.abs(first.astype(int) - np.rot90(frames[0], k=-1)).max() <= 3


def test_frame_size_change_is_resized_to_the_first_frame(clip, tmp_path, caplog):
    frames, _ = clip
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, f in enumerate(frames[:3]):
        image = Image.fromarray(f)
        (image.resize((64, 48)) if i == 1 else image).save(folder / f"{i}.png")
    got = list(open_video(folder).frames())
    assert all(g.image.shape == (96, 128, 3) for g in got)
    assert "resized to frame 0's size" in caplog.text


def test_bad_inputs_name_the_argument(tmp_path):
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(ValueError, match="`--video` .*not a video"):
        open_video(tmp_path / "notes.mp4", "--video")
    with pytest.raises(FileNotFoundError, match="`--video`"):
        open_video(tmp_path / "missing.mp4", "--video")
    empty = tmp_path / "empty.mp4"
    with av.open(str(empty), "w") as out:  # a header and no frame at all
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()
    with pytest.raises(ValueError, match="`--video` .*no video stream"):
        open_video(empty, "--video")
    garbage = tmp_path / "garbage.mkv"
    with av.open(str(garbage), "w") as out:  # a video stream whose packets decode to nothing
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()
        for i in range(3):
            packet = av.Packet(b"\x00" * 64)
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, Fraction(1, 10)
            out.mux(packet)
    with pytest.raises(ValueError, match="`--video` .*(zero decodable frames|no frame could be decoded)"):
        open_video(garbage, "--video")
    Image.new("RGB", (8, 8)).save(tmp_path / "one.png")
    with pytest.raises(ValueError, match="single image"):
        open_video(tmp_path / "one.png", "--video")


def test_label_png_round_trip_and_palette(tmp_path):
    labels = np.zeros((6, 7), np.uint8)
    labels[1:3, 1:3] = 1
    labels[4:, 4:] = 2
    save_label_png(labels, tmp_path / "l.png")
    with Image.open(tmp_path / "l.png") as image:
        assert image.mode == "P" and image.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    np.testing.assert_array_equal(read_label_map(tmp_path / "l.png"), labels)
    Image.fromarray(labels * 100).save(tmp_path / "gray.png")  # not a palette: one object where nonzero
    np.testing.assert_array_equal(read_label_map(tmp_path / "gray.png"), (labels > 0).astype(np.uint8))
    assert davis_palette()[3 * 3:3 * 4] == [128, 128, 0]


def test_video_writer_is_atomic_and_pads_odd_sizes(clip, tmp_path):
    frames, _ = clip
    with VideoWriter(tmp_path / "o.mp4", fps=12) as writer:
        for f in frames:
            writer.write(f[:95, :127])
    source = open_video(tmp_path / "o.mp4")
    assert source.size == (96, 128) and len(list(source.frames())) == 5
    with pytest.raises(RuntimeError), VideoWriter(tmp_path / "broken.mp4", fps=12) as writer:
        writer.write(frames[0])
        raise RuntimeError("interrupted")
    assert not (tmp_path / "broken.mp4").exists() and not list(tmp_path.glob(".broken*"))


def test_davis_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="`--data`"):
        davis_sequence(tmp_path, "cows")
    (tmp_path / "JPEGImages/480p/cows").mkdir(parents=True)
    (tmp_path / "Annotations/480p/cows").mkdir(parents=True)
    frames, ann = davis_sequence(tmp_path, "cows")
    assert frames.name == ann.name == "cows"
