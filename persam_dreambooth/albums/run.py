"""A whole album, resumable and sharded across processes: ``run.json``, resume planning, the run itself.

    plan = prepare_album(job, state)            # read-only: settings check, resume plan, photos decoded
    ...load SAM, set the reference...
    rows = run_album(persam, job, plan, encoder, options, state)

**Settings** (``job.settings``: method, model, weights, references, dtype, instances...) are recorded in
``<output>/run.json``. Segmenting into a folder whose ``run.json`` holds other settings is refused with an error naming
every differing setting (mixing two methods' masks in one ``results.jsonl`` would be silent corruption); use another
output folder, or ``overwrite=True`` to redo every photo. Batch size, device, cache and process count are not
settings: they do not change the result beyond float rounding, so a run may resume with other values.

**Resume**: a photo is skipped when its row (in ``results.jsonl`` or a rank log) describes complete outputs
(:func:`~.outputs.output_complete`); every other photo is redone. The final ``results.jsonl`` lists every photo once,
in input order, and is written atomically.

**Processes**: ``state`` is an ``accelerate.PartialState`` (``None``: this process alone). Every process plans the
same to-do list (then ``wait_for_everyone``), decodes its share of the photos to validate them (errors are exchanged,
so all processes stop with the same message before anything is written), the main process writes ``run.json`` and
consolidates ``results.jsonl``, each process segments its :func:`~.sharding.shard` into its rank log, and after
``wait_for_everyone`` the main process gathers.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persam_dreambooth.albums.batch_encoder import BatchEncoder
from persam_dreambooth.albums.outputs import output_complete
from persam_dreambooth.albums.segment_photos import AlbumOptions, segment_images
from persam_dreambooth.albums.sharding import (
    RESULTS_FILE,
    gather_results,
    latest_rows,
    rank_log_files,
    rank_log_name,
    shard,
    write_results,
)
from persam_dreambooth.data.images import open_image
from persam_dreambooth.utils.io import atomic_write_json, dumps_json, ensure_output_dir

__all__ = ["RUN_FILE", "AlbumJob", "AlbumPlan", "RunSettingsMismatch", "check_run_settings", "finish_complete_album",
           "prepare_album", "run_album"]

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
RUN_FORMAT = 1


class RunSettingsMismatch(ValueError):
    """The output folder holds results made with other settings."""


@dataclass(kw_only=True)
class AlbumJob:
    """One album run.

    Attributes:
        images: the photos, in order. stems: their output names (distinct). output: the output folder.
        settings: JSON-able dict of everything that decides the result (compared with ``run.json``).
        info: JSON-able dict recorded in ``run.json`` but not compared (batch size, device, learned weights...).
        max_instances: as in :class:`~.segment_photos.AlbumOptions` (decides what "complete" means).
        overwrite: ignore earlier results in ``output`` and redo every photo.
        output_arg, overwrite_arg, images_arg: names used in error messages (the CLI passes its flags).
    """

    images: list[Path]
    stems: list[str]
    output: Path
    settings: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    max_instances: int | None = None
    overwrite: bool = False
    output_arg: str = "output"
    overwrite_arg: str = "overwrite"
    images_arg: str = "images"


@dataclass(kw_only=True)
class AlbumPlan:
    """What :func:`prepare_album` found: ``todo`` photo indices (input order) and the rows kept, by stem."""

    todo: list[int]
    kept: dict[str, dict[str, Any]]


class _OneProcess:
    """The ``PartialState`` surface used here, for a plain single-process run (no accelerate needed)."""

    num_processes = 1
    process_index = 0
    is_main_process = True

    def wait_for_everyone(self) -> None:
        return None

    @contextlib.contextmanager
    def split_between_processes(self, inputs: Any, apply_padding: bool = False) -> Iterator[Any]:
        yield inputs


def _normalised(obj: Any) -> Any:
    return json.loads(dumps_json(obj))  # tuples -> lists, keys -> str: the form run.json holds


_SHOWN_CHARS = 72  # a value longer than this (as JSON) is shortened in the refusal message


def _show(value: Any) -> str:
    """``value`` as JSON, shortened in the middle when long (hashes, paths), so a message stays one readable line."""
    text = json.dumps(value)
    if len(text) <= _SHOWN_CHARS:
        return text
    if isinstance(value, list | dict):
        return f"{type(value).__name__} of {len(value)} item(s)"
    return f"{text[:_SHOWN_CHARS // 2 - 1]}...{text[-(_SHOWN_CHARS // 2 - 2):]}"


def _differences(old: Any, new: Any, where: str) -> Iterator[tuple[str, Any, Any]]:
    """``(key path, old value, new value)`` of every leaf that differs (``references[0].mask_sha256``), missing keys
    as ``None``; lists of different lengths count as one difference."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for index, (a, b) in enumerate(zip(old, new, strict=True)):
            yield from _differences(a, b, f"{where}[{index}]")
    elif old != new:
        yield where, old, new


def check_run_settings(job: AlbumJob) -> None:
    """Refuse to add to an output folder made with other settings (read-only; see the module docstring).

    Raises:
        RunSettingsMismatch: ``run.json`` differs (every differing setting is named), is unreadable, or is missing
            while results are present.
    """
    if job.overwrite or not job.output.is_dir():
        return
    run_file = job.output / RUN_FILE
    advice = (f"Segmenting into it would mix results: choose another `{job.output_arg}`, or add "
              f"`{job.overwrite_arg}` to redo every photo there.")
    if not run_file.is_file():
        if (job.output / RESULTS_FILE).is_file() or rank_log_files(job.output):
            raise RunSettingsMismatch(
                f"`{job.output_arg}` {str(job.output)!r} holds results but no {RUN_FILE} (made by an older version "
                f"or another tool), so their settings are unknown. {advice}"
            )
        return
    try:
        old = json.loads(run_file.read_text(encoding="utf-8"))["settings"]
        if not isinstance(old, dict):
            raise TypeError("settings is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunSettingsMismatch(f"`{job.output_arg}`: {str(run_file)!r} is unreadable ({exc}). {advice}") from exc
    diffs = list(_differences(old, _normalised(job.settings), ""))
    if diffs:
        shown = "; ".join(f"{key}: {_show(before)} before, {_show(now)} now" for key, before, now in diffs)
        raise RunSettingsMismatch(
            f"`{job.output_arg}` {str(job.output)!r} holds results made with other settings ({shown}). {advice}"
        )


def _plan(job: AlbumJob) -> AlbumPlan:
    if job.overwrite or not job.output.is_dir():
        return AlbumPlan(todo=list(range(len(job.images))), kept={})
    rows = latest_rows(job.output)
    kept: dict[str, dict[str, Any]] = {}
    todo = []
    for index, (path, stem) in enumerate(zip(job.images, job.stems, strict=True)):
        row = rows.get(stem)
        if row is not None and output_complete(job.output, row, path, job.max_instances):
            kept[stem] = row
        else:
            todo.append(index)
    if kept:
        logger.info("resuming in %s: %d photo(s) already complete, %d to do", job.output, len(kept), len(todo))
    return AlbumPlan(todo=todo, kept=kept)


def _exchange(state: Any, items: list[Any]) -> list[Any]:
    if state.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return list(gather_object(items))


def _validate_photos(job: AlbumJob, todo: Sequence[int], state: Any) -> None:
    errors = []
    for index in shard(todo, state):
        try:
            open_image(job.images[index], job.images_arg).close()  # decodes the pixels
        except (FileNotFoundError, ValueError) as exc:
            errors.append((index, type(exc).__name__, str(exc)))
    errors = sorted(_exchange(state, errors))
    if errors:
        _, kind, message = errors[0]
        raise (FileNotFoundError if kind == "FileNotFoundError" else ValueError)(message)


def prepare_album(job: AlbumJob, state: Any = None) -> AlbumPlan:
    """Check the settings, plan the resume and decode every photo still to do. Writes nothing.

    Raises:
        RunSettingsMismatch: see :func:`check_run_settings`.
        FileNotFoundError, ValueError: a photo to do is missing or unreadable (same error on every process).
    """
    state = state if state is not None else _OneProcess()
    if len(job.images) != len(job.stems):
        raise ValueError(f"`stems` must have one entry per image ({len(job.images)}), got {len(job.stems)}.")
    check_run_settings(job)
    plan = _plan(job)
    state.wait_for_everyone()  # nobody writes before every process has read the folder
    _validate_photos(job, plan.todo, state)
    return plan


def run_album(
    segmenter: Any,
    job: AlbumJob,
    plan: AlbumPlan,
    encoder: BatchEncoder,
    options: AlbumOptions,
    state: Any = None,
    before_segmenting: Callable[[Path], None] | None = None,
    extra_fields: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Segment the photos of ``plan.todo`` (this process's share) and gather ``results.jsonl``.

    Args:
        segmenter: PerSAM / PerSAM-F with the reference set.
        job, plan: from :func:`prepare_album` (same ``job``).
        encoder: the :class:`~.batch_encoder.BatchEncoder` (dtype, cache) of ``segmenter.predictor``.
        options: batch size, instances; ``options.max_instances`` must equal ``job.max_instances``.
        state: ``accelerate.PartialState`` or None (single process).
        before_segmenting: called by the main process with the output folder once it exists (e.g. to save the
            reference masks), before ``run.json`` is written.
        extra_fields: added to every row.

    Returns:
        On the main process, every row of ``results.jsonl`` (input order); on the others, their own rows.
    """
    state = state if state is not None else _OneProcess()
    if options.max_instances != job.max_instances:
        raise ValueError(f"`options.max_instances` ({options.max_instances}) must equal `job.max_instances` "
                         f"({job.max_instances}).")
    if state.is_main_process:
        output = ensure_output_dir(job.output, job.output_arg)
        if job.overwrite:
            for path in [output / RESULTS_FILE, output / RUN_FILE, *rank_log_files(output)]:
                path.unlink(missing_ok=True)
        if before_segmenting is not None:
            before_segmenting(output)
        atomic_write_json(output / RUN_FILE, {"format": RUN_FORMAT, "command": "persam-dreambooth segment",
                                              "settings": _normalised(job.settings), "info": _normalised(job.info)})
        write_results(output, [plan.kept[s] for s in job.stems if s in plan.kept])
        for path in rank_log_files(output):
            path.unlink(missing_ok=True)
    state.wait_for_everyone()
    mine = shard(plan.todo, state)
    log = job.output / rank_log_name(state.process_index)
    if state.num_processes > 1:
        logger.info("process %d/%d: %d of %d photo(s) to do", state.process_index, state.num_processes, len(mine),
                    len(plan.todo))
    rows = segment_images(
        segmenter, [job.images[i] for i in mine], job.output, [job.stems[i] for i in mine],
        options=options, encoder=encoder, log_file=log, extra_fields=extra_fields,
    )
    state.wait_for_everyone()
    if state.is_main_process:
        return gather_results(job.output, job.stems)
    return rows


def finish_complete_album(job: AlbumJob, plan: AlbumPlan, state: Any = None) -> list[dict[str, Any]]:
    """When every photo is already complete (``plan.todo`` empty): rewrite ``results.jsonl`` from the kept rows in
    input order and drop the rank logs (main process), without loading any model. Returns the rows."""
    state = state if state is not None else _OneProcess()
    if plan.todo:
        raise ValueError(f"{len(plan.todo)} photo(s) are still to do; call `run_album`.")
    rows = [plan.kept[s] for s in job.stems]
    if state.is_main_process:
        write_results(job.output, rows)
        for path in rank_log_files(job.output):
            path.unlink(missing_ok=True)
    state.wait_for_everyone()
    return rows
