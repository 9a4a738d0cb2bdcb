"""``persam-dreambooth ui``: the local web app (Gradio) on a project folder.

    persam-dreambooth ui [--project DIR] [--host 127.0.0.1] [--port 7860] [--auth USER:PASSWORD]
        [--sam-model vit_h] [--sam-checkpoint PATH] [--device cuda|cpu] [--base-model ID_OR_FOLDER]

Needs the optional extra: ``pip install "persam-dreambooth[ui]"``. See docs/ui.md.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``ui`` sub-command to ``subparsers``."""
    from persam_dreambooth.config import add_dataclass_arguments
    from persam_dreambooth.ui.config import UiConfig

    parser = subparsers.add_parser(
        "ui",
        help="local web app: mark the subject, check every mask, train, generate, compare",
        description="Serve the web app on a project folder (photos/, masks/, runs/ ...). It listens on 127.0.0.1 "
        "unless --host is given; any other address needs --auth.",
    )
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML/TOML file of these settings")
    add_dataclass_arguments(parser, UiConfig, dashes=True)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Validate the flags, then serve until Ctrl+C."""
    from persam_dreambooth.config import parse_config
    from persam_dreambooth.ui.config import UiConfig

    cfg = parse_config(UiConfig, args, args.config)
    try:
        import gradio  # noqa: F401
    except ImportError as exc:
        raise RuntimeError('the web app needs Gradio: pip install "persam-dreambooth[ui]"') from exc
    from persam_dreambooth.ui.server import parse_auth, serve

    cfg.check()
    defaults = {"base_model": cfg.base_model} if cfg.base_model else None
    serve(cfg.project, cfg.host, cfg.port, parse_auth(cfg.auth), cfg.sam_model, cfg.sam_checkpoint, cfg.device,
          defaults)
    return 0
