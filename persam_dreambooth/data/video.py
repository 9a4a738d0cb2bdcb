"""Reading videos as a stream of RGB frames, and writing the overlay video (PyAV).

* :func:`open_video` opens a video file (``.mp4``, ``.mov``, ``.webm``, ``.mkv``, ``.gif``, anything FFmpeg decodes)
  or a folder of frames (image files sorted by name, e.g. a DAVIS ``JPEGImages/480p/<seq>/`` folder) as a
  :class:`VideoSource`. :meth:`VideoSource.frames` decodes lazily: one frame is in memory at a time, so a long 1080p
  video is never held whole.
* **Rotation metadata is applied** (the display matrix phones write, as EXIF orientation is for photos): a portrait
  phone video comes out portrait.
* **Frame size changes** midway (rare: streams spliced from several recordings) are **resized** to the first frame's
  size (PIL bilinear) with one warning, so a long run never stops halfway on them.
* :func:`davis_sequence` finds a sequence's frames and first annotation in the DAVIS layout
  (``JPEGImages/480p/<seq>/``, palette ``Annotations/480p/<seq>/``).
* :func:`read_label_map` reads a label map (palette PNG: the palette *index* is the label; any other mask: 1 where
  nonzero); :func:`save_label_png` writes one as a palette PNG with the DAVIS colours.
* :class:`VideoWriter` writes ``(H, W, 3)`` frames into an H.264 ``.mp4`` atomically (the file appears complete or
  not at all).

Errors name the argument (``FileNotFoundError`` / ``ValueError``): a file that is not a video, a video with no
decodable frame, an empty frame folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from persam_dreambooth.data.images import IMAGE_EXTENSIONS, list_images, load_image, load_mask, open_image
from persam_dreambooth.utils.io import atomic_path, atomic_save_image

__all__ = [
    "VIDEO_EXTENSIONS",
    "VideoFrameData",
    "VideoSource",
    "VideoWriter",
    "davis_palette",
    "davis_sequence",
    "open_video",
    "read_label_map",
    "save_label_png",
]

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".gif", ".avi", ".m4v")


@dataclass
class VideoFrameData:
    """One decoded frame.

    Attributes:
        index: the frame's position in the video (0-based, counting every decoded frame).
        image: ``(H, W, 3)`` uint8 RGB, rotation applied, at the first frame's size.
    """

    index: int
    image: np.ndarray


def _rotate(image: np.ndarray, degrees: int) -> np.ndarray:
    """Rotate ``(H, W, 3)`` by ``degrees`` counter-clockwise (a multiple of 90; the display-matrix convention)."""
    turns = round(degrees / 90) % 4
    return np.ascontiguousarray(np.rot90(image, k=turns)) if turns else image


class VideoSource:
    """A video file or a frame folder, decoded lazily (see the module docstring).

    Use :func:`open_video`; do not construct directly.

    Attributes:
        path: the file or folder.
        arg_name: the argument named in errors (e.g. ``"--video"``).
        is_folder: True for a frame folder.
        fps: frames per second (the container's average rate; 24 for a folder of frames).
        size: ``(H, W)`` of the first frame as displayed (rotation applied).
        rotation: counter-clockwise degrees applied to every frame (0 for folders).
        frame_count: the number of frames if the container states it (or the folder's file count), else ``None``.
    """

    def __init__(self, path: Path, arg_name: str, is_folder: bool, fps: float, size: tuple[int, int],
                 rotation: int, frame_count: int | None, files: list[Path] | None = None) -> None:
        self.path = path
        self.arg_name = arg_name
        self.is_folder = is_folder
        self.fps = fps
        self.size = size
        self.rotation = rotation
        self.frame_count = frame_count
        self._files = files

    @property
    def files(self) -> list[Path] | None:
        """The frame files of a folder source (sorted), ``None`` for a video file."""
        return self._files

    def frame_name(self, index: int) -> str:
        """Output stem of frame ``index``: the file stem for a folder (DAVIS ``00000``), else ``index`` as 5 digits."""
        if self._files is not None:
            return self._files[index].stem
        return f"{index:05d}"

    def frames(self, every_nth: int = 1, max_frames: int | None = None, start: int = 0) -> Iterator[VideoFrameData]:
        """Decode frames ``start, start + every_nth, ...`` (at most ``max_frames`` of them), one at a time.

        Frames before ``start`` are decoded and dropped (no seeking: exact frame indices on every container).

        Raises:
            ValueError: a frame cannot be decoded (the message names the argument and the frame).
        """
        if every_nth < 1:
            raise ValueError(f"`every_nth` must be >= 1, got {every_nth}.")
        yielded = 0
        warned = False
        for index, image in self._decode():
            if max_frames is not None and yielded >= max_frames:
                return
            if index < start or (index - start) % every_nth:
                continue
            if image.shape[:2] != self.size:
                if not warned:
                    logger.warning("`%s` %s: frame %d has size (H, W) = %s but frame 0 has %s; frames of another "
                                   "size are resized to frame 0's size", self.arg_name, self.path, index,
                                   image.shape[:2], self.size)
                    warned = True
                image = np.asarray(Image.fromarray(image).resize(self.size[::-1], Image.Resampling.BILINEAR))
            yield VideoFrameData(index=index, image=image)
            yielded += 1

    def _decode(self) -> Iterator[tuple[int, np.ndarray]]:
        if self._files is not None:
            for index, file in enumerate(self._files):
                yield index, load_image(file, f"{self.arg_name} frame {file.name}")
            return
        import av

        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                index = 0
                for frame in container.decode(stream):
                    image = frame.to_ndarray(format="rgb24")  # (h, w, 3) uint8 as stored
                    yield index, _rotate(image, _frame_rotation(frame, self.rotation))
                    index += 1
        except av.error.FFmpegError as exc:
            raise ValueError(f"`{self.arg_name}` {str(self.path)!r}: decoding failed: {exc}") from exc


def _frame_rotation(frame: object, default: int) -> int:
    try:
        return int(round(getattr(frame, "rotation", default) or 0))
    except (TypeError, ValueError):
        return default


def open_video(source: str | os.PathLike[str], arg_name: str = "video") -> VideoSource:
    """Open a video file or a frame folder; decode the first frame to check it and learn its size.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: it is not a video (or an image folder), or it holds no decodable frame.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"`{arg_name}` {str(path)!r} does not exist.")
    if path.is_dir():
        files = list_images(path, arg_name)
        first = load_image(files[0], f"{arg_name} frame {files[0].name}")
        return VideoSource(path, arg_name, True, 24.0, (int(first.shape[0]), int(first.shape[1])), 0, len(files),
                           files)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        raise ValueError(f"`{arg_name}` {str(path)!r} is a single image, not a video; give a video file or a folder "
                         "of frames.")
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise ValueError(f"`{arg_name}` {str(path)!r} is not a video PyAV/FFmpeg can read: {exc}") from exc
    with container:
        if not container.streams.video:
            raise ValueError(f"`{arg_name}` {str(path)!r} has no video stream (is it an audio file?).")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 24.0
        count = int(stream.frames) or None
        first = None
        try:
            for frame in container.decode(stream):
                rotation = _frame_rotation(frame, 0)
                first = _rotate(frame.to_ndarray(format="rgb24"), rotation)
                break
        except av.error.FFmpegError as exc:
            raise ValueError(f"`{arg_name}` {str(path)!r}: no frame could be decoded: {exc}") from exc
    if first is None:
        raise ValueError(f"`{arg_name}` {str(path)!r} has zero decodable frames.")
    return VideoSource(path, arg_name, False, fps, (int(first.shape[0]), int(first.shape[1])), rotation, count)


# ---------------------------------------------------------------------------------------------------- DAVIS layout
def davis_sequence(davis_root: str | os.PathLike[str], sequence: str, resolution: str = "480p",
                   arg_name: str = "--data") -> tuple[Path, Path]:
    """``(frames folder, annotation folder)`` of ``sequence`` in a DAVIS root, both checked to exist.

    Raises:
        FileNotFoundError: a folder is missing (named with the root).
    """
    root = Path(davis_root)
    frames = root / "JPEGImages" / resolution / sequence
    annotations = root / "Annotations" / resolution / sequence
    for folder in (frames, annotations):
        if not folder.is_dir():
            raise FileNotFoundError(f"`{arg_name}` {str(root)!r}: sequence {sequence!r} has no folder {str(folder)!r}"
                                    " (expected the DAVIS layout JPEGImages/480p/<seq>/, Annotations/480p/<seq>/).")
    return frames, annotations


def davis_palette() -> list[int]:
    """The DAVIS / PASCAL-VOC colour palette (768 ints): label ``k`` gets the colour of ``k``'s bit pattern."""
    palette = []
    for label in range(256):
        r = g = b = 0
        value = label
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette += [r, g, b]
    return palette


_PALETTE = davis_palette()


def read_label_map(path: str | os.PathLike[str], arg_name: str = "--ref-mask") -> np.ndarray:
    """A label map from an image file: a palette PNG gives its indices (0 background, k object k); any other mask
    format gives 1 where the mask is nonzero (one object). Shapes: ``(H, W)`` uint8."""
    image = open_image(path, arg_name)
    if image.mode == "P":
        return np.array(image, dtype=np.uint8)
    return load_mask(path, arg_name).astype(np.uint8)


def save_label_png(labels: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Save an ``(H, W)`` label map (values 0..255) as a palette PNG with the DAVIS colours, atomically."""
    if labels.size and int(labels.max()) > 255:
        raise ValueError(f"label values must be <= 255 for a palette PNG, got {int(labels.max())}.")
    image = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    image.putpalette(_PALETTE)
    atomic_save_image(image, path)


# ---------------------------------------------------------------------------------------------------- writing
class VideoWriter:
    """Write RGB frames into an H.264 video (yuv420p, so odd sizes are padded by one black pixel), atomically.

    Example::

        with VideoWriter("overlay.mp4", fps=24) as writer:
            writer.write(frame)            # (H, W, 3) uint8, every frame the same size

    The frames go to a temporary file beside ``path``, renamed over ``path`` when the ``with`` block ends without an
    error (an error removes it).
    """

    def __init__(self, path: str | os.PathLike[str], fps: float, crf: int = 20) -> None:
        self.path = Path(path)
        self.fps = fps
        self.crf = crf
        self._atomic = None
        self._container = None
        self._stream = None
        self._size: tuple[int, int] | None = None
        self.frames_written = 0

    def __enter__(self) -> VideoWriter:
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        import av

        self._container = av.open(str(tmp), "w", format="mp4")
        return self

    def write(self, image: np.ndarray) -> None:
        """Append one ``(H, W, 3)`` uint8 RGB frame."""
        import av

        if self._container is None:
            raise RuntimeError("use VideoWriter in a `with` block")
        height, width = image.shape[:2]
        if self._stream is None:
            rate = Fraction(self.fps).limit_denominator(1001)
            self._stream = self._container.add_stream("libx264", rate=rate)
            self._stream.width, self._stream.height = width + width % 2, height + height % 2
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(self.crf), "preset": "veryfast"}
            self._size = (height, width)
        if (height, width) != self._size:
            raise ValueError(f"every frame must have size {self._size}, got {(height, width)}.")
        if height % 2 or width % 2:
            image = np.pad(image, ((0, height % 2), (0, width % 2), (0, 0)))
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image, dtype=np.uint8), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames_written += 1

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self._container is not None and self._atomic is not None
        try:
            if exc_type is None and self._stream is not None:
                for packet in self._stream.encode():
                    self._container.mux(packet)
        finally:
            self._container.close()
        self._atomic.__exit__(exc_type, exc, tb)  # renames into place, or removes the temporary file
