"""Synthetic videos for the video tests: moving textured objects, written as arrays, frame folders or mp4."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def synthetic_video(num_frames: int = 6, height: int = 96, width: int = 128, tiny_object: bool = False,
                    seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Frames ``(H, W, 3)`` uint8 and label maps ``(H, W)`` uint8: object 1 (a red disc moving right), object 2 (a
    green square moving left), and with ``tiny_object`` a 5x5 blue object 3 (smaller than one SAM patch)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    frames, labels = [], []
    for t in range(num_frames):
        bg = np.stack([(np.sin(xx / 4.0 + t / 3) + 1) * 60 + 40, (np.cos(yy / 5.0) + 1) * 50 + 50,
                       np.full_like(xx, 90, dtype=np.float64)], axis=2)
        bg += rng.normal(0, 8, bg.shape)
        lab = np.zeros((height, width), np.uint8)
        cy, cx = height * 0.45, width * 0.3 + 4 * t
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (height * 0.22) ** 2
        sq_x0 = int(width * 0.55) - 3 * t
        square = (yy >= height // 3) & (yy < height // 3 + 36) & (xx >= sq_x0) & (xx < sq_x0 + 36)
        lab[square] = 2
        lab[disc] = 1
        bg[square] = (40, 200, 60)
        bg[disc] = (220, 40, 40)
        if tiny_object:
            ty, tx = height - 14, 8 + t
            lab[ty:ty + 5, tx:tx + 5] = 3
            bg[ty:ty + 5, tx:tx + 5] = (30, 30, 240)
        frames.append(np.clip(bg, 0, 255).astype(np.uint8))
        labels.append(lab)
    return frames, labels


def write_mp4(path: Path, frames: list[np.ndarray], fps: int = 10, codec: str = "libx264",
              rotate: int | None = None) -> Path:
    """Write ``frames`` as a video with PyAV (lossless-ish H.264, yuv444p to keep the colours)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv444p" if codec == "libx264" else "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "0"}
        if rotate is not None:
            stream.metadata["rotate"] = str(rotate)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
