"""The local web app (``persam-dreambooth ui``): a Gradio page on a project folder. Needs ``pip install ".[ui]"``.

Modules: :mod:`.project` (the folder, path checks, locking, uploads), :mod:`.engine` (SAM clicks and PerSAM
propagation), :mod:`.training` (the train command as a subprocess), :mod:`.generation` (generate / compare as
subprocesses), :mod:`.render` (overlays), :mod:`.app` (the page), :mod:`.server` (host/auth checks, launch).
See docs/ui.md.
"""

__all__ = ["serve"]


def serve(*args, **kwargs):
    """Start the app; see :func:`persam_dreambooth.ui.server.serve`."""
    from persam_dreambooth.ui.server import serve as _serve

    return _serve(*args, **kwargs)
