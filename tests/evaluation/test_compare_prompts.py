"""The DreamBooth prompt sets and custom template files."""

from __future__ import annotations

import pytest

from persam_dreambooth.evaluation.prompts import (
    LIVE_TEMPLATES,
    OBJECT_TEMPLATES,
    background_text,
    build_prompts,
    infer_identifier,
    load_templates,
)


def test_paper_sets_have_25_prompts_in_the_papers_groups():
    assert len(LIVE_TEMPLATES) == len(OBJECT_TEMPLATES) == 25
    count = lambda ts, g: sum(1 for _, grp in ts if grp == g)  # noqa: E731
    assert (count(LIVE_TEMPLATES, "recontextualization"), count(LIVE_TEMPLATES, "accessorization"),
            count(LIVE_TEMPLATES, "property")) == (10, 10, 5)
    assert (count(OBJECT_TEMPLATES, "recontextualization"), count(OBJECT_TEMPLATES, "property")) == (20, 5)
    assert len({t for t, _ in LIVE_TEMPLATES}) == 25 and len({t for t, _ in OBJECT_TEMPLATES}) == 25
    assert all(t.count("{}") == 1 for t, _ in (*LIVE_TEMPLATES, *OBJECT_TEMPLATES))


def test_build_prompts_fills_identifier_and_class():
    live = build_prompts("live", "sks", "dog")
    assert live[0].prompt == "a sks dog in the jungle" and live[0].clip_text == "a dog in the jungle"
    assert live[13].prompt == "a sks dog wearing a black top hat and a monocle"
    assert live[24].prompt == "a cube shaped sks dog" and live[24].group == "property"
    assert [p.index for p in live] == list(range(25))
    obj = build_prompts("object", "zwx", "stuffed animal")
    assert obj[12].prompt == "a zwx stuffed animal with the Eiffel Tower in the background"
    assert obj[12].clip_text == "a stuffed animal with the Eiffel Tower in the background"


def test_template_file_with_groups_and_comments(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("# mine\nscenes | a {} on the moon\n\na {} wearing a crown\n", encoding="utf-8")
    assert load_templates(path) == [("a {} on the moon", "scenes"), ("a {} wearing a crown", "custom")]
    assert build_prompts(str(path), "sks", "cat")[0].prompt == "a sks cat on the moon"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a dog on the beach\n", r"line 1: template 'a dog on the beach' must contain exactly one `\{\}`"),
        ("ok | a {} here\na {0} {1} there\n", r"line 2: .*'a \{0\} \{1\} there'"),
        ("a {} and a {}\n", r"exactly one"),
        ("# only comments\n\n", r"holds no templates"),
    ],
)
def test_bad_template_files(tmp_path, text, match):
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_templates(path)


def test_unknown_prompt_set():
    with pytest.raises(ValueError, match=r"`--prompt-set` must be 'live', 'object' or an existing template file, "
                                         r"got 'animals' \(no such file\)"):
        load_templates("animals")


def test_infer_identifier():
    assert infer_identifier("a photo of sks dog", "dog") == "sks"
    assert infer_identifier("a photo of zwx stuffed animal", "stuffed animal") == "zwx"
    assert infer_identifier("a photo of sks", "dog") is None
    assert infer_identifier("dog", "dog") is None
    assert infer_identifier("a photo of a dog", "dog") is None


def test_background_text_is_the_context_without_the_subject():
    live = build_prompts("live", "sks", "dog")
    assert live[2].prompt == "a sks dog on the beach" and live[2].background_text == "the beach"
    assert live[6].background_text == "a city in the background"
    assert live[9].background_text == "a purple rug in a forest"  # "on top of" goes as a whole
    assert all(p.background_text is None for p in live if p.group in ("accessorization", "property"))
    assert all(p.background_text for p in live if p.group == "recontextualization")
    obj = build_prompts("object", "sks", "teapot")
    assert [p.background_text for p in obj if "floating" in p.template] == ["water", "an ocean of milk"]
    assert background_text("a {} at the zoo", "custom") == "the zoo"
    assert background_text("a {} wearing a crown", "custom") is None  # no place after the subject
    assert background_text("a {} on", "custom") is None and background_text("{}", "custom") is None
