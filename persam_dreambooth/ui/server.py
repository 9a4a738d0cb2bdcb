"""Starting the app safely: loopback by default, a password required for any other address, Gradio kept inside the
project folder (its upload cache goes to ``PROJECT/.ui/gradio``; no other folder is served)."""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import Any

from persam_dreambooth.ui.project import MAX_UPLOAD_BYTES, Project

__all__ = ["check_host", "is_loopback", "parse_auth", "serve"]

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``"user:password"`` -> ``(user, password)``; both non-empty.

    Raises:
        ValueError: naming ``--auth`` and the rule (the password is never echoed).
    """
    if text is None:
        return None
    user, sep, password = str(text).partition(":")
    if not sep or not user.strip() or not password:
        raise ValueError("`--auth` must be USER:PASSWORD with both parts non-empty (e.g. --auth alice:s3cret).")
    return user.strip(), password


def check_host(host: str, auth: tuple[str, str] | None) -> None:
    """Refuse a non-loopback ``--host`` without ``--auth``.

    Raises:
        ValueError: with the reason and the fix.
    """
    if not host or not host.strip():
        raise ValueError("`--host` must be an address such as 127.0.0.1, got an empty value.")
    if not is_loopback(host) and auth is None:
        raise ValueError(
            f"`--host` {host!r} makes the app reachable from other machines, and it can read your photos and start "
            "GPU jobs: refusing to start without a password. Add `--auth USER:PASSWORD` (and prefer an SSH tunnel "
            "to a 127.0.0.1 app), or leave `--host` out to listen on 127.0.0.1 only."
        )


def serve(project_dir: str, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None,
          sam_model: str = "vit_h", sam_checkpoint: str | None = None, device: str | None = None,
          train_defaults: dict[str, Any] | None = None, block: bool = True) -> Any:
    """Open the project, build the page and serve it (blocks until Ctrl+C unless ``block=False``)."""
    check_host(host, auth)
    project = Project(project_dir)
    cache = project.scratch / "gradio"
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(cache)  # uploads and served copies stay inside the project
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from persam_dreambooth.ui.app import CSS, build_app
    from persam_dreambooth.ui.engine import Engine

    engine = Engine(sam_model, sam_checkpoint, device)
    demo = build_app(project, engine, train_defaults)
    demo.queue(default_concurrency_limit=4)
    logger.info("serving %s on http://%s:%d", project.root, host, port)
    return demo.launch(
        server_name=host, server_port=port, auth=auth, share=False, show_error=False, inbrowser=False,
        max_file_size=MAX_UPLOAD_BYTES, allowed_paths=[], blocked_paths=[], prevent_thread_lock=not block,
        footer_links=[], ssr_mode=False, css=CSS, quiet=False, enable_monitoring=False, mcp_server=False,
    )
