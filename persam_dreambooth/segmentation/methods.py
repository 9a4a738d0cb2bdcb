"""The two segmentation methods by name: one spelling in code (``persam``, ``persam_f``), one alias for the CLI.

``persam_f`` is the name in code, configs (``mask_method``) and mask sets; ``persam-f`` (the spelling the
``segment`` and ``eval-perseg`` commands show, and record in their ``run.json`` / ``metrics.json`` so that earlier
output folders still resume) is accepted everywhere as an alias. PerSAM-F's fit defaults live in
:mod:`~.persam_f` (``DEFAULT_STEPS``, ``DEFAULT_LR``) and nowhere else.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CLI_METHODS", "METHODS", "canonical_method", "cli_method_name", "make_segmenter", "segmenter_class"]

METHODS = ("persam", "persam_f")  #: the names in code
CLI_METHODS = ("persam", "persam-f")  #: the same methods as the commands spell them (``--method``)
_ALIASES = {"persam-f": "persam_f"}


def canonical_method(name: Any, arg_name: str = "method", cli: bool = False) -> str:
    """``name`` in code spelling (``"persam"`` or ``"persam_f"``; ``"persam-f"`` is accepted as an alias).

    Raises:
        ValueError: another name; the message names ``arg_name`` and lists the valid names (the command's spellings
            when ``cli``).
    """
    canonical = _ALIASES.get(name, name) if isinstance(name, str) else name
    if canonical not in METHODS:
        listed = f"one of {list(CLI_METHODS)}" if cli else " or ".join(repr(m) for m in METHODS)
        raise ValueError(f"`{arg_name}` must be {listed}, got {name!r}.")
    return canonical


def cli_method_name(method: str) -> str:
    """The command-line spelling of a method (``persam_f`` -> ``persam-f``)."""
    return CLI_METHODS[METHODS.index(canonical_method(method))]


def segmenter_class(method: str, arg_name: str = "method") -> Any:
    """``PerSAM`` or ``PerSAMF`` (same interface: ``set_reference`` / ``set_reference_embedding`` / ``segment``)."""
    if canonical_method(method, arg_name) == "persam":
        from persam_dreambooth.segmentation.persam import PerSAM

        return PerSAM
    from persam_dreambooth.segmentation.persam_f import PerSAMF

    return PerSAMF


def make_segmenter(method: str, sam: Any, arg_name: str = "method") -> Any:
    """A ``PerSAM`` or a ``PerSAMF`` (with its published fit defaults) on ``sam``."""
    return segmenter_class(method, arg_name)(sam)
