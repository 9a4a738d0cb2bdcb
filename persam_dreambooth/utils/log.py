"""Console logging for the command lines: Python warnings as one clean log line each."""

from __future__ import annotations

import logging
import warnings

__all__ = ["warnings_as_log_lines"]


def warnings_as_log_lines() -> None:
    """Show each Python warning as one log line (``WARNING persam_dreambooth: <message>``), without the
    ``file.py:388: SmallReferenceWarning:`` prefix and source line that ``warnings`` prints by default."""
    log = logging.getLogger("persam_dreambooth")

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' signature
        log.warning("%s", message)

    warnings.showwarning = show
