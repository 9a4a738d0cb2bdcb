"""The page's actions without a browser: clicks make masks on cached embeddings, propagation writes masks/ in the
trainer's format with scores and flags, a fix click changes one mask, and every refusal is a message."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
from ui_server import write_photos

from persam_dreambooth.ui.app import Controller, build_app, guard
from persam_dreambooth.ui.engine import Engine, Prompt, is_probably_absent
from persam_dreambooth.ui.project import Project, ProjectError


@pytest.fixture
def ctl(project_dir, ui_models) -> Controller:
    project = Project(project_dir)
    write_photos(project.photos, 3)
    return Controller(project, Engine("tiny", str(ui_models["sam"]), "cpu"))


def test_click_makes_the_reference_mask_and_encodes_once(ctl):
    picture, text = ctl.click("photo_0.jpg", "positive click", [150, 120])
    assert picture.size == (320, 256) and "reference; mask:" in text and "click→mask" in text
    first = ctl.project.load_mask("photo_0.jpg")
    assert first is not None and first.any()
    ctl.click("photo_0.jpg", "negative click", [10, 10])
    ctl.click("photo_0.jpg", "positive click", [170, 130])
    assert ctl.engine.encoder_calls == 1  # three clicks, one image-encoder call
    state = ctl.project.read_state()
    assert state["reference"]["photo"] == "photo_0.jpg"
    assert [p[2] for p in state["reference"]["points"]] == [1, 0, 1]


def test_box_takes_two_clicks(ctl):
    _, text = ctl.click("photo_0.jpg", "box (2 corners)", [80, 60])
    assert "First corner set" in text and ctl.project.load_mask("photo_0.jpg") is None
    _, text = ctl.click("photo_0.jpg", "box (2 corners)", [230, 180])
    assert "mask:" in text
    assert ctl.project.read_state()["reference"]["box"] == [80.0, 60.0, 231.0, 181.0]


def test_propagate_writes_every_mask_with_scores_and_flags(ctl):
    ctl.click("photo_0.jpg", "positive click", [150, 120])
    items = ctl.propagate("PerSAM", -1.0, 0.0)  # thresholds that flag nothing
    captions = [c for _, c in items]
    assert captions[0] == "photo_0.jpg · reference" and all("score" in c for c in captions[1:])
    assert not any(c.startswith("⚠") for c in captions) and "0 flagged as probably absent" in ctl.summary()
    masks = {p.name: ctl.project.load_mask(p.name) for p in ctl.project.list_photos()}
    assert all(m is not None and m.shape == (256, 320) for m in masks.values())
    state = ctl.project.read_state()
    entry = state["photos"]["photo_1.jpg"]
    assert -1 <= entry["peak_similarity"] <= 1 and entry["persam"]["points"]
    items = ctl.propagate("PerSAM", 1.0, 1.0)  # thresholds that flag everything
    assert all(c.startswith("⚠ photo_") for _, c in items[1:])
    table = ctl.summary()
    assert "2 flagged as probably absent" in table and table.count("**probably absent**") == 2
    assert f"| photo_1.jpg | {state['photos']['photo_1.jpg']['score']:.3f} |" in table


def test_persam_f_propagates_too(ctl):
    ctl.click("photo_0.jpg", "positive click", [150, 120])
    items = ctl.propagate("PerSAM-F", -1.0, 0.0)
    assert len(items) == 3 and ctl.project.read_state()["method"] == "persam-f"


def test_a_fix_click_changes_that_photo_only(ctl):
    ctl.click("photo_0.jpg", "positive click", [150, 120])
    ctl.propagate("PerSAM", 0.65, 0.7)
    before = {p.name: ctl.project.load_mask(p.name) for p in ctl.project.list_photos()}
    ys, xs = np.nonzero(before["photo_1.jpg"])
    i = len(xs) // 2
    _, text = ctl.click("photo_1.jpg", "negative click", [int(xs[i]), int(ys[i])])
    assert "propagated" in text
    after = {p.name: ctl.project.load_mask(p.name) for p in ctl.project.list_photos()}
    assert not np.array_equal(after["photo_1.jpg"], before["photo_1.jpg"])
    assert np.array_equal(after["photo_2.jpg"], before["photo_2.jpg"])
    entry = ctl.project.read_state()["photos"]["photo_1.jpg"]
    assert entry["edited"] and not entry["flagged"] and entry["clicks"]["points"][0][2] == 0
    ctl.clear("photo_1.jpg")  # back to PerSAM's own mask
    assert np.array_equal(ctl.project.load_mask("photo_1.jpg"), before["photo_1.jpg"])


def test_click_coordinates_map_back_from_the_display(ctl, tmp_path):
    big = np.full((1200, 2048, 3), 90, np.uint8)
    from PIL import Image

    Image.fromarray(big).save(ctl.project.photos / "big.png")
    ctl.click("big.png", "positive click", [512, 300])  # displayed at 1024 px wide: scale 0.5
    assert ctl.project.read_state()["reference"]["points"][0][:2] == [1024.0, 600.0]


@pytest.mark.parametrize("name", ["../photos/photo_0.jpg", "/etc/passwd", "..", "photo_9.jpg"])
def test_photo_fields_refuse_traversal_and_unknown_names(ctl, name):
    for call in (lambda: ctl.click(name, "positive click", [1, 1]), lambda: ctl.clear(name),
                 lambda: ctl.make_reference(name), lambda: ctl.view(name)):
        with pytest.raises(ProjectError):
            call()


def test_refusals_become_page_messages(ctl):
    with pytest.raises(gr.Error) as info:
        guard(ctl.propagate)("PerSAM", 0.65, 0.7)
    assert "Mark the subject first" in info.value.message
    with pytest.raises(gr.Error) as info:
        guard(ctl.click)("photo_0.jpg", "teleport", [1, 1])
    assert "click mode must be one of" in info.value.message
    with pytest.raises(gr.Error) as info:
        guard(ctl.click)("photo_0.jpg", "positive click", None)
    assert info.value.message == "Click inside the photo."

    def boom():
        raise KeyError("internal detail")

    with pytest.raises(gr.Error) as info:
        guard(boom)()
    assert info.value.message.startswith("Unexpected error (KeyError)") and "Traceback" not in info.value.message


def test_flag_rule():
    assert is_probably_absent(0.5, 0.9) and is_probably_absent(0.9, 0.5) and not is_probably_absent(0.9, 0.9)
    assert not is_probably_absent(0.5, 0.5, similarity_threshold=0.4, score_threshold=0.4)


def test_preview_needs_a_prompt(ctl):
    with pytest.raises(ValueError, match="Click on the photo"):
        ctl.engine.preview(ctl.project.photos / "photo_0.jpg", Prompt([]))


def test_the_page_builds(ctl):
    assert isinstance(build_app(ctl.project, ctl.engine), gr.Blocks)


def test_a_refused_upload_leaves_nothing_behind(ctl, tmp_path):
    cache = ctl.project.scratch / "gradio" / "abc"
    good = write_photos(cache, 2)
    bad = cache / "notes.png"
    bad.write_text("not an image")
    before = sorted(p.name for p in ctl.project.photos.iterdir())
    with pytest.raises(gr.Error) as info:
        guard(ctl.upload)([str(p) for p in [*good, bad]])
    assert "'notes.png' is not a readable image" in info.value.message and "nothing was added" in info.value.message
    assert sorted(p.name for p in ctl.project.photos.iterdir()) == before
    assert not list(cache.iterdir())  # Gradio's uploaded copies are removed too
    good = write_photos(cache, 1)
    assert ctl.upload([str(good[0])]) == ["photo_0-2.jpg"] and not good[0].exists()


def test_display_copy_follows_exif_orientation_and_size(ctl):
    from PIL import Image

    from persam_dreambooth.ui.render import display_copy

    pixels = np.zeros((300, 2400, 3), np.uint8)
    pixels[:, :1200] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display: 2400x300 stored, 300x2400 shown
    image.save(ctl.project.photos / "turned.jpg", exif=exif, quality=95)
    small, (height, width) = display_copy(str(ctl.project.photos / "turned.jpg"), 1024)
    assert (height, width) == ctl.project.load_photo("turned.jpg").shape[:2] == (2400, 300)
    assert max(small.shape[:2]) <= 1024 and small.shape[0] > small.shape[1]
    _, text = ctl.view("turned.jpg")
    assert "(300x2400)" in text
