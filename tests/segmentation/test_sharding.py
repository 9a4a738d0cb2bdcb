"""Sharding photos across processes with accelerate's splitter, and gathering the rank logs in input order."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from accelerate import PartialState
from PIL import Image

from persam_dreambooth import PerSAM
from persam_dreambooth import testing as tiny
from persam_dreambooth.albums.segment_photos import AlbumOptions, segment_images
from persam_dreambooth.albums.sharding import (
    RESULTS_FILE,
    append_jsonl,
    gather_results,
    latest_rows,
    rank_log_files,
    rank_log_name,
    read_jsonl,
    shard,
)

ROOT = Path(__file__).resolve().parents[2]


class SimulatedProcess:
    """Process ``index`` of ``count``: accelerate's own ``split_between_processes`` code on these two numbers."""

    split_between_processes = PartialState.split_between_processes

    def __init__(self, count: int, index: int) -> None:
        self.num_processes, self.process_index = count, index
        self.is_main_process = index == 0


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 8])
def test_shards_cover_every_item_exactly_once_in_order(count, n):
    items = [f"img{i:02d}" for i in range(n)]
    parts = [shard(items, SimulatedProcess(count, r)) for r in range(count)]
    assert [x for part in parts for x in part] == items  # contiguous, in order, each once
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_single_process_state_gets_everything():
    assert shard([3, 1, 2], SimulatedProcess(1, 0)) == [3, 1, 2]
    assert shard([3, 1, 2], PartialState(cpu=True)) == [3, 1, 2]  # the real state, one process here


def test_two_simulated_processes_then_gather_restores_input_order(tiny_sam_model, tmp_path):
    persam = PerSAM(tiny_sam_model)
    persam.set_reference(*tiny.synthetic_subject())
    photos = tmp_path / "photos"
    tiny.write_instance_dir(photos, n=5)
    paths = sorted(photos.iterdir())
    stems = [p.stem for p in paths]
    out = tmp_path / "out"
    out.mkdir()
    for rank in (1, 0):  # the second process may finish first
        state = SimulatedProcess(2, rank)
        mine = shard(list(range(len(paths))), state)
        segment_images(persam, [paths[i] for i in mine], out, [stems[i] for i in mine],
                       options=AlbumOptions(progress=False), log_file=out / rank_log_name(rank))
    assert [r["stem"] for r in read_jsonl(out / "results.rank0.jsonl")] == ["00", "01", "02"]
    assert [r["stem"] for r in read_jsonl(out / "results.rank1.jsonl")] == ["03", "04"]
    rows = gather_results(out, stems)
    assert [r["stem"] for r in rows] == stems
    assert [json.loads(x)["stem"] for x in (out / RESULTS_FILE).read_text().splitlines()] == stems
    assert rank_log_files(out) == []
    (tmp_path / "one").mkdir()
    reference = segment_images(persam, paths, tmp_path / "one", progress=False)  # one process, same photos
    for a, b in zip(rows, reference, strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_gather_keeps_previous_rows_newest_wins_and_drops_unknown_stems(tmp_path, caplog):
    (tmp_path / RESULTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in (
        {"stem": "b", "v": "old"}, {"stem": "gone", "v": 0}, {"stem": "a", "v": "kept"})))
    append_jsonl(tmp_path / rank_log_name(1), {"stem": "b", "v": "new"})
    append_jsonl(tmp_path / rank_log_name(0), {"stem": "d", "v": 1})
    with open(tmp_path / rank_log_name(0), "a") as handle:
        handle.write('{"stem": "c", "v"')  # interrupted mid-append
    assert latest_rows(tmp_path)["b"]["v"] == "new"
    rows = gather_results(tmp_path, ["a", "b", "c", "d"])
    assert rows == [{"stem": "a", "v": "kept"}, {"stem": "b", "v": "new"}, {"stem": "d", "v": 1}]
    assert "have no result row" in caplog.text and "not valid JSON" in caplog.text
    assert rank_log_files(tmp_path) == []


def test_rank_log_name():
    assert rank_log_name(3) == "results.rank3.jsonl"
    with pytest.raises(ValueError, match="rank"):
        rank_log_name(-1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.launch
def test_accelerate_launch_two_cpu_processes(tmp_path, tiny_sam_checkpoint):
    """Two real processes (``accelerate launch --multi_gpu --num_processes 2`` on CPU: gloo) share one album."""
    image, mask = tiny.synthetic_subject()
    Image.fromarray(image).save(tmp_path / "ref.jpg", quality=95)
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "ref_mask.png")
    tiny.write_instance_dir(tmp_path / "photos", n=5)
    entry = tmp_path / "entry.py"  # registers the tiny SAM in each process, then runs the real command line
    entry.write_text("import sys\nfrom persam_dreambooth import testing as tiny\n"
                     "tiny.register_tiny_sam()\nfrom persam_dreambooth.cli import main\nsys.exit(main())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()), str(entry), "segment",
           "--ref-image", str(tmp_path / "ref.jpg"), "--ref-mask", str(tmp_path / "ref_mask.png"),
           "--images", str(tmp_path / "photos"), "--output", str(tmp_path / "out"), "--sam-model", "tiny",
           "--sam-checkpoint", str(tiny_sam_checkpoint), "--device", "cpu", "--batch-size", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 0/2: 3 of 5 photo(s) to do" in proc.stderr and "process 1/2: 2 of 5" in proc.stderr
    rows = [json.loads(x) for x in (tmp_path / "out" / RESULTS_FILE).read_text().splitlines()]
    assert [r["stem"] for r in rows] == ["00", "01", "02", "03", "04"]
    assert not list((tmp_path / "out").glob("results.rank*.jsonl"))
    assert json.loads((tmp_path / "out" / "run.json").read_text())["info"]["num_processes"] == 2
    assert all((tmp_path / "out" / f"{r['stem']}.png").is_file() for r in rows)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_result_rows_are_strict_json(tmp_path, bad):
    """A non-finite number is refused instead of written as ``NaN`` (not JSON); nothing is left half-written."""
    from persam_dreambooth.albums.sharding import append_jsonl, write_results

    with pytest.raises(ValueError, match="non-finite"):
        append_jsonl(tmp_path / "results.rank0.jsonl", {"stem": "a", "score": bad})
    with pytest.raises(ValueError, match="non-finite"):
        write_results(tmp_path, [{"stem": "a", "score": 0.5}, {"stem": "b", "score": bad}])
    assert sorted(p.name for p in tmp_path.iterdir()) == []
