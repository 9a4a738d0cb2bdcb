"""Splitting an album across processes and gathering their ``results.jsonl`` rows (accelerate, no home-made engine).

Under ``accelerate launch`` every process holds an ``accelerate.PartialState``. :func:`shard` gives each process its
contiguous part of the list with ``PartialState.split_between_processes`` (sizes differ by at most one). While it
works, process ``r`` appends one JSON line per finished photo to ``results.rank{r}.jsonl`` (its resume log); after
``wait_for_everyone()`` the main process merges the previous ``results.jsonl`` and every rank log into one
``results.jsonl`` in input order (:func:`gather_results`), written atomically, and removes the rank logs.

Rows are keyed by ``"stem"``; when a stem appears several times, the newest wins (rank logs are newer than
``results.jsonl``; among rank logs, the later-modified file and the later line win).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from persam_dreambooth.utils.io import atomic_write_text, dumps_json

__all__ = [
    "RESULTS_FILE",
    "ProcessState",
    "append_jsonl",
    "gather_results",
    "latest_rows",
    "rank_log_files",
    "rank_log_name",
    "read_jsonl",
    "shard",
    "write_results",
]

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
_RANK_LOG = "results.rank{}.jsonl"
_RANK_GLOB = "results.rank*.jsonl"

T = TypeVar("T")


class ProcessState(Protocol):
    """What this module needs from ``accelerate.PartialState`` (which satisfies it)."""

    num_processes: int
    process_index: int

    def split_between_processes(self, inputs: Any, apply_padding: bool = False) -> Any: ...


def shard(items: Sequence[T], state: ProcessState) -> list[T]:
    """This process's part of ``items``: ``state.split_between_processes`` (contiguous, in order, no padding).

    Every item goes to exactly one process; processes beyond the number of items get an empty list.
    """
    with state.split_between_processes(list(items)) as part:
        return list(part)


def rank_log_name(rank: int) -> str:
    """The file name of process ``rank``'s resume log (``results.rank{rank}.jsonl``)."""
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"`rank` must be an int >= 0, got {rank!r}.")
    return _RANK_LOG.format(rank)


def rank_log_files(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The rank logs in ``output_dir``, oldest first (modification time, then name)."""
    files = [p for p in Path(output_dir).glob(_RANK_GLOB) if p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; a line that does not parse (a crash mid-append) is skipped with a
    warning. A missing file gives ``[]``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s line %d is not valid JSON (an interrupted write?); ignored", path, number)
            continue
        if isinstance(row, dict) and isinstance(row.get("stem"), str):
            rows.append(row)
        else:
            logger.warning("%s line %d is not a result row; ignored", path, number)
    return rows


def append_jsonl(path: str | os.PathLike[str], row: Mapping[str, Any]) -> None:
    """Append one JSON line to ``path`` and flush it to disk (one ``write`` call per row)."""
    line = dumps_json(dict(row)) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def latest_rows(output_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Every row in ``results.jsonl`` and the rank logs of ``output_dir``, by stem, the newest winning."""
    output_dir = Path(output_dir)
    rows: dict[str, dict[str, Any]] = {}
    for path in [output_dir / RESULTS_FILE, *rank_log_files(output_dir)]:
        for row in read_jsonl(path):
            rows[row["stem"]] = row
    return rows


def write_results(output_dir: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` (in the given order) as ``output_dir/results.jsonl``, atomically."""
    path = Path(output_dir) / RESULTS_FILE
    atomic_write_text(path, "".join(dumps_json(dict(r)) + "\n" for r in rows))
    return path


def gather_results(
    output_dir: str | os.PathLike[str],
    stems: Sequence[str],
    previous: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Merge rows into ``results.jsonl`` in the order of ``stems`` and delete the rank logs (main process only).

    Args:
        output_dir: the album's output folder.
        stems: every photo's stem, in input order; rows of other stems are dropped.
        previous: rows to start from (default: the current ``results.jsonl``); rank-log rows override them.

    Returns:
        The rows written. A stem without a row is left out, with a warning (its photo is redone on the next run).
    """
    output_dir = Path(output_dir)
    rows: dict[str, dict[str, Any]] = (
        {k: dict(v) for k, v in previous.items()} if previous is not None
        else {r["stem"]: r for r in read_jsonl(output_dir / RESULTS_FILE)}
    )
    logs = rank_log_files(output_dir)
    for path in logs:
        for row in read_jsonl(path):
            rows[row["stem"]] = row
    ordered = [rows[s] for s in stems if s in rows]
    missing = [s for s in stems if s not in rows]
    if missing:
        logger.warning("%d photo(s) have no result row (e.g. %s); rerun the same command to finish them",
                       len(missing), ", ".join(missing[:5]))
    write_results(output_dir, ordered)
    for path in logs:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return ordered
