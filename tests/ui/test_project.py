"""The project folder: path traversal refused in every name/path field, uploads all-or-nothing with size/type limits,
and concurrent writers (two tabs, two processes) never corrupt project.json or a mask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ui_server import ROOT, write_photos

from persam_dreambooth.ui import project as project_module
from persam_dreambooth.ui.project import Project, ProjectError, check_name

TRAVERSALS = ["../x", "../../etc/passwd", "/etc/passwd", "a/../../b", "..", ".", "", "a/b", "~/x", "x\x00y"]


@pytest.fixture
def project(tmp_path) -> Project:
    return Project(tmp_path / "proj")


def test_layout_is_created(project):
    for sub in ("photos", "masks", "excluded", "runs", "models", ".ui"):
        assert (project.root / sub).is_dir()


@pytest.mark.parametrize("value", TRAVERSALS)
def test_plain_names_refuse_paths(value):
    with pytest.raises(ProjectError, match="plain name"):
        check_name(value, "run name")


@pytest.mark.parametrize("value", ["../outside", "/etc", "/", "photos/../../outside", "~"])
def test_paths_outside_the_project_are_refused(project, value):
    with pytest.raises(ProjectError, match="outside the project folder|must be a path inside"):
        project.child(value, "folder")


def test_a_symlink_leading_outside_is_refused(project, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    write_photos(outside, 1)
    (project.root / "incoming").symlink_to(outside)
    with pytest.raises(ProjectError, match="outside the project folder"):
        project.import_folder("incoming")
    inside = project.root / "inbox"
    inside.mkdir()
    (inside / "evil.jpg").symlink_to(outside / "photo_0.jpg")  # a link to a file outside, in an inside folder
    with pytest.raises(ProjectError, match="outside the project folder"):
        project.import_folder("inbox")
    assert list(project.photos.iterdir()) == []


@pytest.mark.parametrize("value", TRAVERSALS)
def test_photo_fields_refuse_traversal(project, value):
    write_photos(project.photos, 1)
    for call in (project.photo_path, project.load_photo, project.exclude, project.include):
        with pytest.raises(ProjectError):
            call(value)
    with pytest.raises(ProjectError):
        project.run_dir(value)
    with pytest.raises(ProjectError):
        project.save_mask(value, np.ones((4, 4), bool))


def test_photo_names_of_another_folder_are_not_photos(project):
    (project.root / "secret.jpg").write_bytes(b"x")
    with pytest.raises(ProjectError, match="not a photo of this project"):
        project.photo_path("secret.jpg")


def test_folder_import_copies_photos_inside(project):
    incoming = project.root / "incoming"
    write_photos(incoming, 2)
    assert project.import_folder("incoming") == ["photo_0.jpg", "photo_1.jpg"]
    assert project.import_folder(str(incoming)) == ["photo_0-2.jpg", "photo_1-2.jpg"]  # never overwrites
    infos = project.list_photos()
    assert [(i.width, i.height, i.warnings) for i in infos][0] == (320, 256, [])


def test_upload_names_are_made_plain(project, tmp_path):
    src = write_photos(tmp_path / "up", 1)[0]
    odd = tmp_path / "up" / "..%2F..%2Fevil name!.JPG"
    src.rename(odd)
    names = project.import_files([odd])
    assert names == ["2F_2Fevil_name.jpg"] and (project.photos / names[0]).is_file()
    assert {p.name for p in project.root.parent.iterdir()} == {"proj", "up"}  # nothing written beside the project


def test_upload_refuses_wrong_type_and_leaves_nothing(project, tmp_path):
    good = write_photos(tmp_path / "up", 2)
    script = tmp_path / "up" / "run.sh"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(ProjectError, match="only image files"):
        project.import_files([*good, script])
    fake = tmp_path / "up" / "fake.png"
    fake.write_bytes(b"not a png at all")
    with pytest.raises(ProjectError, match="not a readable image"):
        project.import_files([*good, fake])
    assert list(project.photos.iterdir()) == []


def test_upload_refuses_big_files_and_leaves_nothing(project, tmp_path, monkeypatch):
    good = write_photos(tmp_path / "up", 2)
    monkeypatch.setattr(project_module, "MAX_UPLOAD_BYTES", good[1].stat().st_size - 1)
    with pytest.raises(ProjectError, match="over the limit"):
        project.import_files(good)
    assert list(project.photos.iterdir()) == []


def test_failed_copy_midway_removes_what_was_written(project, tmp_path, monkeypatch):
    good = write_photos(tmp_path / "up", 3)
    real_copy, calls = project_module.shutil.copyfile, {"n": 0}

    def copy_then_fail(src, dst):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_copy(src, dst)

    monkeypatch.setattr(project_module.shutil, "copyfile", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        project.import_files(good)
    assert list(project.photos.iterdir()) == []  # neither the two copied files nor a temporary one


def test_unreadable_and_tiny_photos_get_warnings(project):
    (project.photos / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(project.photos / "small.png")
    infos = {i.name: i for i in project.list_photos()}
    assert not infos["broken.jpg"].readable and "unreadable" in infos["broken.jpg"].warnings[0]
    assert infos["small.png"].warnings == ["tiny: shorter side 40 px < 256 px"]
    assert "60x40" in infos["small.png"].caption()


def test_masks_are_the_trainers_format(project):
    write_photos(project.photos, 1)
    mask = np.zeros((256, 320), bool)
    mask[10:20, 30:40] = True
    path = project.save_mask("photo_0.jpg", mask)
    assert path == project.masks / "photo_0.png"
    pixels = np.asarray(Image.open(path))
    assert pixels.dtype == np.uint8 and set(np.unique(pixels)) == {0, 255}
    np.testing.assert_array_equal(project.load_mask("photo_0.jpg"), mask)


def test_exclude_and_include_move_photo_and_mask(project):
    write_photos(project.photos, 2)
    project.save_mask("photo_1.jpg", np.ones((256, 320), bool))
    project.exclude("photo_1.jpg")
    assert [p.name for p in project.list_photos()] == ["photo_0.jpg"] and project.excluded() == ["photo_1.jpg"]
    assert not (project.masks / "photo_1.png").exists()
    project.include("photo_1.jpg")
    assert (project.masks / "photo_1.png").is_file() and len(project.list_photos()) == 2


def test_two_tabs_writing_state_at_once_lose_nothing(tmp_path):
    root = tmp_path / "proj"
    tabs = [Project(root), Project(root)]  # two tabs = two handlers on the same folder

    def writer(tab: Project, prefix: str) -> None:
        for i in range(40):
            tab.update_state(lambda s, k=f"{prefix}{i}": s["photos"].__setitem__(k, {"score": 1.0}))

    threads = [threading.Thread(target=writer, args=(tab, f"t{n}-")) for n, tab in enumerate(tabs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = json.loads((root / "project.json").read_text())
    assert len(state["photos"]) == 80


def test_two_processes_writing_state_at_once_lose_nothing(tmp_path):
    root = tmp_path / "proj"
    Project(root)
    code = ("import sys\nfrom persam_dreambooth.ui.project import Project\np = Project(sys.argv[1])\n"
            "for i in range(30):\n"
            "    p.update_state(lambda s, k=f'{sys.argv[2]}{i}': s['photos'].__setitem__(k, 1))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root), f"p{n}-"], env=env) for n in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(json.loads((root / "project.json").read_text())["photos"]) == 60
    assert not [p for p in root.iterdir() if p.name.startswith(".project.json")]  # no temporary file left


def test_project_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ProjectError, match="must be a folder"):
        Project(tmp_path / "file")


def test_unused_path_helpers_stay_inside(project):
    assert project.child("photos", "folder") == project.photos
    assert project.child(str(project.root / "runs"), "folder") == project.runs
    assert isinstance(project.child("new/sub", "folder"), Path)
