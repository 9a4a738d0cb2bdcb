"""Resumable album runs: ``run.json`` settings, skipping complete photos, redoing incomplete ones."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from persam_dreambooth import testing as tiny
from persam_dreambooth.albums.batch_encoder import BatchEncoder
from persam_dreambooth.albums.outputs import (
    instance_name,
    output_complete,
    remove_stale_instances,
    save_instances,
)
from persam_dreambooth.albums.run import (
    RUN_FILE,
    AlbumJob,
    RunSettingsMismatch,
    finish_complete_album,
    prepare_album,
    run_album,
)
from persam_dreambooth.albums.segment_photos import AlbumOptions, segment_images
from persam_dreambooth.albums.sharding import RESULTS_FILE, rank_log_name

SETTINGS = {"method": "persam", "sam_model": "tiny", "dtype": "float32", "max_instances": None}


@pytest.fixture
def album(tmp_path):
    folder = tmp_path / "photos"
    tiny.write_instance_dir(folder, n=4)
    return sorted(folder.iterdir())


def job_for(album, out, **kw):
    return AlbumJob(images=list(album), stems=[p.stem for p in album], output=out,
                    settings=kw.pop("settings", SETTINGS), **kw)


def full_run(persam, job):
    plan = prepare_album(job)
    encoder = BatchEncoder(persam.predictor)
    rows = run_album(persam, job, plan, encoder, AlbumOptions(progress=False, max_instances=job.max_instances))
    return plan, encoder, rows


def rows_of(out):
    return [json.loads(line) for line in (out / RESULTS_FILE).read_text().splitlines()]


def test_first_run_writes_everything_then_a_rerun_does_nothing(persam, album, tmp_path):
    out = tmp_path / "out"
    plan, encoder, rows = full_run(persam, job_for(album, out))
    assert plan.todo == [0, 1, 2, 3] and encoder.encoder_calls == 4
    assert [r["stem"] for r in rows_of(out)] == ["00", "01", "02", "03"] == [r["stem"] for r in rows]
    saved = json.loads((out / RUN_FILE).read_text())
    assert saved["settings"] == SETTINGS and saved["format"] == 1
    assert sorted(p.name for p in out.iterdir() if "rank" in p.name) == []  # rank logs gathered and removed

    again = prepare_album(job_for(album, out))
    assert again.todo == [] and list(again.kept) == ["00", "01", "02", "03"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert [r["stem"] for r in finish_complete_album(job_for(album, out), again)] == ["00", "01", "02", "03"]
    assert rows_of(out) == rows
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert {k for k in after if after[k] != before[k]} <= {RESULTS_FILE}


def test_incomplete_photos_are_redone_and_only_they(persam, album, tmp_path):
    out = tmp_path / "out"
    _, _, first = full_run(persam, job_for(album, out))
    (out / "00.png").unlink()  # missing mask
    (out / "01_overlay.jpg").write_bytes(b"")  # empty overlay
    data = (out / "02.png").read_bytes()
    (out / "02.png").write_bytes(data[: len(data) // 2])  # truncated PNG
    plan = prepare_album(job_for(album, out))
    assert plan.todo == [0, 1, 2] and list(plan.kept) == ["03"]

    os.utime(album[3], ns=(1, 1))  # the photo changed since (size/mtime): its row is stale
    plan, encoder, rows = full_run(persam, job_for(album, out))
    assert plan.todo == [0, 1, 2, 3] and encoder.encoder_calls == 4
    final = rows_of(out)
    assert [r["stem"] for r in final] == ["00", "01", "02", "03"]
    for old, new in zip(first, final, strict=True):
        assert old["points_xy"] == new["points_xy"] and old["mask_area"] == new["mask_area"]
    assert all(output_complete(out, r, p) for r, p in zip(final, album, strict=True))


def test_interrupted_run_resumes_from_its_rank_log(persam, album, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    job = job_for(album, out)
    (out / RUN_FILE).write_text(json.dumps({"format": 1, "settings": SETTINGS, "info": {}}))
    log = out / rank_log_name(0)
    segment_images(persam, album[:2], out, options=AlbumOptions(progress=False), log_file=log)  # then "crash"
    with open(log, "a") as handle:
        handle.write('{"stem": "02", "image": "trunc')  # a row cut short mid-write
    (out / "02.png").write_bytes(b"\x89PNG partial")  # no row: redone anyway
    plan = prepare_album(job)
    assert plan.todo == [2, 3] and sorted(plan.kept) == ["00", "01"]
    _, encoder, _ = full_run(persam, job)
    assert encoder.encoder_calls == 2
    final = rows_of(out)
    assert [r["stem"] for r in final] == ["00", "01", "02", "03"]  # input order, no duplicate
    assert not log.exists()


def test_other_settings_are_refused_naming_them(persam, album, tmp_path):
    out = tmp_path / "out"
    full_run(persam, job_for(album, out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    changed = {**SETTINGS, "method": "persam-f", "dtype": "bfloat16"}
    with pytest.raises(RunSettingsMismatch) as info:
        prepare_album(job_for(album, out, settings=changed, output_arg="--output", overwrite_arg="--overwrite"))
    msg = str(info.value)
    assert 'method: "persam" before, "persam-f" now' in msg and 'dtype: "float32" before, "bfloat16" now' in msg
    assert "sam_model" not in msg and "--overwrite" in msg and "--output" in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the refused run touched the folder"

    plan, encoder, _ = full_run(persam, job_for(album, out, settings=changed, overwrite=True))
    assert plan.todo == [0, 1, 2, 3] and encoder.encoder_calls == 4
    assert json.loads((out / RUN_FILE).read_text())["settings"] == changed


def test_long_settings_are_shown_old_and_new_not_as_placeholders(persam, album, tmp_path):
    """A differing reference (hashes in a list of dicts) names the leaf that differs and shows both values."""
    out = tmp_path / "out"
    ref = {"image_sha256": "a" * 64, "mask_sha256": "b" * 64, "box": None, "point": None}
    full_run(persam, job_for(album, out, settings={**SETTINGS, "references": [ref]}))
    other = {**ref, "mask_sha256": "c" * 64}
    long_path = "/data/" + "x" * 100 + "/weights.pth"
    changed = {**SETTINGS, "references": [other], "sam_weights": long_path}
    with pytest.raises(RunSettingsMismatch) as info:
        prepare_album(job_for(album, out, settings=changed))
    msg = str(info.value)
    assert "(differs)" not in msg and "\n" not in msg
    assert f'references[0].mask_sha256: "{"b" * 64}" before, "{"c" * 64}" now' in msg
    assert "image_sha256" not in msg, "only the leaves that differ are named"
    assert 'sam_weights: null before, "/data/xxx' in msg and 'weights.pth" now' in msg  # long: shortened in the middle
    with pytest.raises(RunSettingsMismatch, match=r"references: list of 1 item\(s\) before, list of 2 item\(s\) now"):
        prepare_album(job_for(album, out, settings={**SETTINGS, "references": [ref, ref]}))


def test_results_without_run_json_or_unreadable_run_json_are_refused(persam, album, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / RESULTS_FILE).write_text('{"stem": "00"}\n')
    with pytest.raises(RunSettingsMismatch, match="no run.json"):
        prepare_album(job_for(album, out))
    (out / RUN_FILE).write_text("{not json")
    with pytest.raises(RunSettingsMismatch, match="unreadable"):
        prepare_album(job_for(album, out))
    assert prepare_album(job_for(album, out, overwrite=True)).todo == [0, 1, 2, 3]
    empty = tmp_path / "unrelated"
    empty.mkdir()
    (empty / "notes.txt").write_text("mine")
    assert prepare_album(job_for(album, empty)).todo == [0, 1, 2, 3]  # a folder without results is fine


def test_unreadable_photo_stops_before_anything_is_written(persam, album, tmp_path):
    album[2].write_bytes(b"\xff\xd8 broken")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="`images` file .*02.jpg.* is not a readable image"):
        prepare_album(job_for(album, out))
    assert not out.exists()


def test_instances_outputs_and_completeness(persam, album, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    image = np.asarray(Image.open(album[0]))
    results = [persam.segment(album[0]), persam.segment(album[1])]  # two masks of the same size stand in
    (out / instance_name("00", 3)).write_bytes(b"stale")  # from an earlier run with more instances
    names = save_instances(out, "00", image, results)
    assert names == ["00_inst1.png", "00_inst2.png"] and not (out / "00_inst3.png").exists()
    union = np.asarray(Image.open(out / "00.png")) > 0
    assert np.array_equal(union, results[0].mask | results[1].mask)
    from persam_dreambooth.albums.outputs import instance_record, source_info

    row = {**instance_record("00", album[0], results), "source": source_info(album[0])}
    assert row["num_instances"] == 2 and [i["mask"] for i in row["instances"]] == names
    assert row["mask_area"] == int(union.sum())
    assert output_complete(out, row, album[0], max_instances=2)
    assert not output_complete(out, row, album[0], max_instances=None)  # single-instance run: redo
    assert not output_complete(out, row, album[0], max_instances=1)  # more instances than allowed now
    (out / "00_inst2.png").unlink()
    assert not output_complete(out, row, album[0], max_instances=2)
    remove_stale_instances(out, "00")
    assert not (out / "00_inst1.png").exists()


def test_a_failure_mid_album_keeps_finished_photos_logged(persam, album, tmp_path):
    album[2].write_bytes(b"\xff\xd8 corrupted after validation")
    out = tmp_path / "out"
    out.mkdir()
    log = out / rank_log_name(0)
    with pytest.raises(ValueError, match="not a readable image"):
        segment_images(persam, album, out, options=AlbumOptions(progress=False, prefetch=0), log_file=log)
    logged = [json.loads(x)["stem"] for x in log.read_text().splitlines()]
    assert logged == ["00", "01"]
    assert all(output_complete(out, json.loads(x), p) for x, p in zip(log.read_text().splitlines(), album,
                                                                      strict=False))


def test_background_writes_change_nothing_but_speed(persam, album, tmp_path):
    got = {}
    for flag in (False, True):
        out = tmp_path / str(flag)
        out.mkdir()
        rows = segment_images(persam, album, out, options=AlbumOptions(progress=False, background_writes=flag,
                                                                       prefetch=2 if flag else 0))
        got[flag] = ([{k: v for k, v in r.items() if k != "seconds"} for r in rows],
                     {p.name: p.read_bytes() for p in out.iterdir() if p.name != RESULTS_FILE})
    assert got[False] == got[True]
