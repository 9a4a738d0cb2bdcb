"""Offline guard and shared fixtures: every test runs on CPU with tiny models built from the real classes."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

# Before any Hugging Face import: never reach the Hub, and never read a user's cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Tiny models: one thread avoids OpenMP spin-waiting on small ops (10-50x slower with 2 threads on 2 busy cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")
_SESSION_TMP = tempfile.mkdtemp(prefix="persam-test-")
os.environ["HF_HOME"] = os.path.join(_SESSION_TMP, "hf")
os.environ["PERSAM_DREAMBOOTH_CACHE"] = os.path.join(_SESSION_TMP, "cache")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from persam_dreambooth import testing as tiny  # noqa: E402


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)


def pytest_unconfigure(config):
    import shutil

    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Fail loudly on any connection that is not to this machine."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("/"):
            raise RuntimeError(f"test tried to reach the network: {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="session")
def tiny_sam_model():
    """A tiny random SAM (4x4 embedding grid, 64-px frame). Treat as read-only."""
    return tiny.tiny_sam()


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory, tiny_sam_model):
    """The tiny SAM's state dict saved with ``torch.save`` (as a user's checkpoint file)."""
    import torch

    path = tmp_path_factory.mktemp("sam") / "tiny_sam.pth"
    torch.save(tiny_sam_model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny Stable Diffusion pipeline folder (``save_pretrained``), to pass as ``pretrained_model_name_or_path``."""
    return tiny.save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture
def subject():
    """``(image (96, 128, 3) uint8, mask (96, 128) bool)``: a red ellipse on a striped, noisy background."""
    return tiny.synthetic_subject()
