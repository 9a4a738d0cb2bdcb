"""The one ``resolve_device``: a device flag or argument (or nothing) to a checked ``torch.device``."""

from __future__ import annotations

from typing import Any

__all__ = ["resolve_device"]


def resolve_device(device: Any = None, arg_name: str = "device", *, prefer_mps: bool = False) -> Any:
    """``None`` (or ``""``) -> ``cuda`` when available, else ``mps`` when ``prefer_mps`` and available, else ``cpu``;
    otherwise check that ``device`` names a device this machine has.

    Returns:
        A ``torch.device`` (``str(...)`` of it gives the spelling diffusers and accelerate accept).

    Raises:
        ValueError: ``device`` is not a torch device, or names CUDA/MPS that this machine does not have; the message
            names ``arg_name`` (e.g. ``"--device"``) and the value.
    """
    import torch

    if device is None or device == "":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if prefer_mps and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"`{arg_name}` must be a torch device such as 'cpu' or 'cuda', got {device!r}.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`{arg_name}` is {device!r} but CUDA is not available on this machine; use 'cpu'.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"`{arg_name}` is {device!r} but MPS is not available on this machine; use 'cpu'.")
    return dev
