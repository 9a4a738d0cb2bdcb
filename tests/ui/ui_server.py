"""Helpers of the web-app tests: synthetic photos, and the app served by a real subprocess (tiny SAM registered)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from persam_dreambooth import testing as tiny

ROOT = Path(__file__).resolve().parents[2]
TINY_PHOTO_HW = (256, 320)  # above the app's 256-px "tiny photo" warning


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_photos(folder: Path, n: int = 3) -> list[Path]:
    """``n`` synthetic subject photos (the subject moves a little between them)."""
    folder.mkdir(parents=True, exist_ok=True)
    height, width = TINY_PHOTO_HW
    paths = []
    for i in range(n):
        y0, x0 = 60 + 10 * i, 80 + 12 * i
        image, _ = tiny.synthetic_subject(height, width, box_yx=(y0, x0, y0 + 120, x0 + 150), seed=i)
        path = folder / f"photo_{i}.jpg"
        Image.fromarray(image).save(path, quality=95)
        paths.append(path)
    return paths


class ServedApp:
    """``serve()`` in a subprocess (tiny SAM registered there), with its log."""

    def __init__(self, project: Path, sam: Path, log: Path, train_defaults: dict | None = None,
                 auth: tuple[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        entry = project.parent / "serve_entry.py"
        entry.write_text(
            "import logging, sys\nlogging.basicConfig(level=logging.INFO)\n"
            "from persam_dreambooth import testing as tiny\ntiny.register_tiny_sam()\n"
            "from persam_dreambooth.ui.server import serve\n"
            f"serve({str(project)!r}, port={self.port}, sam_model='tiny', sam_checkpoint={str(sam)!r}, "
            f"device='cpu', train_defaults={train_defaults!r}, auth={auth!r})\n", encoding="utf-8")
        # its temp dir and working folder hold neither the project nor anything it returns: Gradio serves those two
        # folders' files, so this catches a page that would hand Gradio a project path instead of a picture
        elsewhere = project.parent / "server-cwd"
        elsewhere.mkdir(exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "TMPDIR": str(elsewhere)}
        self.log = log
        self._log_handle = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, str(entry)], stdout=self._log_handle,
                                     stderr=subprocess.STDOUT, env=env, cwd=elsewhere)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited: {log.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the app did not answer within 90 s: {log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_handle.close()


def masks_of(project: Path) -> dict[str, np.ndarray]:
    from persam_dreambooth.data.images import load_mask

    return {p.stem: load_mask(p) for p in sorted((project / "masks").glob("*.png"))}
