"""load_sam: registry, user checkpoints, and the verified download (served from 127.0.0.1, never the internet)."""

from __future__ import annotations

import hashlib
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from persam_dreambooth import load_sam
from persam_dreambooth import testing as tiny
from persam_dreambooth.segmentation import sam as sam_module
from persam_dreambooth.segmentation.sam import (
    SAM_BUILDERS,
    CheckpointDownloadError,
    cache_dir,
    default_checkpoint_path,
    register_sam_builder,
)

OFFICIAL = {
    "vit_h": ("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
              "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    "vit_l": ("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
              "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_b": ("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
              "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
}


def test_official_registry_entries():
    for name, (url, sha) in OFFICIAL.items():
        assert SAM_BUILDERS[name].url == url
        assert SAM_BUILDERS[name].checksum == sha
    assert "tiny" not in {k for k, v in SAM_BUILDERS.items() if v.url}  # no test model with a download


def test_register_rejects_duplicates_and_half_specified_downloads():
    with pytest.raises(ValueError, match="already registered"):
        register_sam_builder("vit_h", tiny.tiny_sam)
    with pytest.raises(ValueError, match="together"):
        register_sam_builder("x_only_url", tiny.tiny_sam, url="http://127.0.0.1/x.pth")
    with pytest.raises(ValueError, match="SHA-256"):
        register_sam_builder("x_bad_sum", tiny.tiny_sam, checksum="abc", url="http://127.0.0.1/x.pth")
    assert "x_only_url" not in SAM_BUILDERS and "x_bad_sum" not in SAM_BUILDERS


def test_load_user_checkpoint(tiny_sam_checkpoint, tiny_sam_model):
    name = tiny.register_tiny_sam()
    sam = load_sam(name, checkpoint=tiny_sam_checkpoint, device="cpu")
    assert not sam.training and sam.device.type == "cpu"
    theirs = tiny_sam_model.state_dict()
    for key, value in sam.state_dict().items():
        assert torch.equal(value, theirs[key]), key


def test_unknown_model_type_lists_valid_ones():
    with pytest.raises(ValueError, match=r"`model_type` must be one of \[.*'vit_b'.*'vit_h'.*'vit_l'.*got 'vit_x'"):
        load_sam("vit_x", checkpoint="whatever.pth")


def test_checkpoint_errors_name_model_type_and_path(tmp_path, tiny_sam_checkpoint):
    name = tiny.register_tiny_sam()
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_sam(name, checkpoint=missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"garbage\.pth.*'tiny'"):
        load_sam(name, checkpoint=garbage)
    other = tmp_path / "other_arch.pth"
    torch.save(tiny.tiny_sam(dim=48).state_dict(), other)  # another architecture
    with pytest.raises(ValueError, match=r"other_arch\.pth.*does not fit the SAM 'tiny' architecture"):
        load_sam(name, checkpoint=other)
    pickled = tmp_path / "pickled_module.pth"
    torch.save(tiny.tiny_sam(), pickled)  # a whole pickled module: refused by weights_only=True
    with pytest.raises(ValueError, match=r"pickled_module\.pth"):
        load_sam(name, checkpoint=pickled)
    with pytest.raises(ValueError, match="folder"):
        load_sam(name, checkpoint=tmp_path)


@pytest.mark.parametrize("device", ["nonsense", "cuda:0"])
def test_bad_device(device, tiny_sam_checkpoint):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="`device`"):
        load_sam(tiny.register_tiny_sam(), checkpoint=tiny_sam_checkpoint, device=device)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSAM_DREAMBOOTH_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert default_checkpoint_path("vit_b") == tmp_path / "c" / "sam" / "sam_vit_b_01ec64.pth"
    monkeypatch.delenv("PERSAM_DREAMBOOTH_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "persam_dreambooth"
    with pytest.raises(ValueError, match="no default checkpoint"):
        default_checkpoint_path(tiny.register_tiny_sam())


# --------------------------------------------------------------------------------------------- download, offline
class _Server:
    """A loopback HTTP server: ``files[path] = (bytes, mode)``, mode "ok" | "truncate" | "404"."""

    def __init__(self):
        self.files: dict[str, tuple[bytes, str]] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                outer.requests.append(self.path)
                body, mode = outer.files.get(self.path, (b"", "404"))
                if mode == "404":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + (1000 if mode == "truncate" else 0)))
                self.end_headers()
                self.wfile.write(body if mode == "ok" else body[: len(body) // 2])
                self.wfile.flush()
                if mode == "truncate":
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSAM_DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "sam"


@pytest.fixture
def ckpt_bytes(tiny_sam_model):
    buf = io.BytesIO()
    torch.save(tiny_sam_model.state_dict(), buf)
    return buf.getvalue()


@pytest.fixture
def downloadable(server):
    """Register a tiny model type whose default checkpoint is served by ``server``; unregister afterwards."""
    names = []

    def make(name: str, body: bytes, mode: str = "ok", checksum: str | None = None):
        path = f"/{name}.pth"
        server.files[path] = (body, mode)
        register_sam_builder(name, tiny.tiny_sam, checksum=checksum or hashlib.sha256(body).hexdigest(),
                             url=server.url(path))
        names.append(name)
        return name

    yield make
    for name in names:
        SAM_BUILDERS.pop(name, None)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_verifies_and_caches(server, cache, ckpt_bytes, downloadable, tiny_sam_model):
    name = downloadable("tiny_dl_ok", ckpt_bytes)
    sam = load_sam(name, device="cpu")
    assert torch.equal(sam.mask_decoder.iou_token.weight, tiny_sam_model.mask_decoder.iou_token.weight)
    assert _leftovers(cache) == ["tiny_dl_ok.pth", "tiny_dl_ok.pth.sha256"]
    assert (cache / "tiny_dl_ok.pth").read_bytes() == ckpt_bytes
    load_sam(name, device="cpu")  # cached: no second request
    assert server.requests == ["/tiny_dl_ok.pth"]


def test_checksum_mismatch_keeps_nothing(server, cache, ckpt_bytes, downloadable):
    name = downloadable("tiny_dl_bad", ckpt_bytes, checksum="0" * 64)
    with pytest.raises(CheckpointDownloadError) as info:
        load_sam(name, device="cpu")
    message = str(info.value)
    assert server.url("/tiny_dl_bad.pth") in message
    assert "0" * 64 in message
    assert str(cache / "tiny_dl_bad.pth") in message
    assert hashlib.sha256(ckpt_bytes).hexdigest() in message  # what was actually received
    assert _leftovers(cache) == []


def test_partial_download_never_remains(server, cache, ckpt_bytes, downloadable):
    name = downloadable("tiny_dl_cut", ckpt_bytes, mode="truncate")
    with pytest.raises(CheckpointDownloadError, match="put it at"):
        load_sam(name, device="cpu")
    assert _leftovers(cache) == []


def test_offline_error_says_where_to_put_the_file(server, cache, ckpt_bytes, downloadable):
    name = downloadable("tiny_dl_404", ckpt_bytes, mode="404")
    server.files.pop("/tiny_dl_404.pth")
    with pytest.raises(CheckpointDownloadError) as info:
        load_sam(name, device="cpu")
    assert str(cache / "tiny_dl_404.pth") in str(info.value)
    assert hashlib.sha256(ckpt_bytes).hexdigest() in str(info.value)
    server.close()  # now nothing listens: connection refused, like being offline
    with pytest.raises(CheckpointDownloadError, match="could not download"):
        load_sam(name, device="cpu")
    assert _leftovers(cache) == []


def test_file_put_by_hand_is_verified_once(server, cache, ckpt_bytes, downloadable, monkeypatch):
    name = downloadable("tiny_dl_hand", ckpt_bytes, mode="404")
    cache.mkdir(parents=True)
    (cache / "tiny_dl_hand.pth").write_bytes(ckpt_bytes)
    hashed = []
    real = sam_module.file_sha256
    monkeypatch.setattr(sam_module, "file_sha256", lambda p: hashed.append(p) or real(p))
    load_sam(name, device="cpu")
    load_sam(name, device="cpu")
    assert len(hashed) == 1 and server.requests == []
    (cache / "tiny_dl_hand.pth").write_bytes(ckpt_bytes[:-10] + b"0123456789")  # replaced by a wrong file
    with pytest.raises(CheckpointDownloadError, match="cached SAM checkpoint"):
        load_sam(name, device="cpu")
