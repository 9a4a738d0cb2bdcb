"""The DreamBooth evaluation prompts, and custom prompt-template files.

The two built-in sets are the 25 prompt templates of the DreamBooth paper's dataset for live subjects (10
recontextualization, 10 accessorization, 5 property) and for objects (20 recontextualization, 5 property).

Credit: the templates are copied from ``dataset/prompts_and_classes.txt`` of the DreamBooth dataset,
https://github.com/google/dreambooth (Ruiz, Li, Jampani, Pritch, Rubinstein, Aberman: "DreamBooth: Fine Tuning
Text-to-Image Diffusion Models for Subject-Driven Generation", CVPR 2023), licensed CC-BY 4.0. The paper writes them as
``'a {0} {1} in the jungle'.format(unique_token, class_token)``; here ``{}`` stands for "<identifier> <class noun>".

Template files (``--prompt-set FILE``): one template per line, each with exactly one ``{}`` where
"<identifier> <class noun>" goes, optionally prefixed with a group name and ``|``::

    # comments and blank lines are ignored
    recontextualization | a {} on the beach
    a {} wearing a red hat          <- group "custom"
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from persam_dreambooth.evaluation.compare_config import compare_flag

__all__ = ["LIVE_TEMPLATES", "OBJECT_TEMPLATES", "PROMPT_SETS", "PromptSpec", "load_templates", "build_prompts",
           "infer_identifier", "background_text"]

_RECON, _ACCESS, _PROP = "recontextualization", "accessorization", "property"

_RECONTEXT_COMMON = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
)
_PROPERTY = ("a red {}", "a purple {}", "a shiny {}", "a wet {}", "a cube shaped {}")

OBJECT_TEMPLATES: tuple[tuple[str, str], ...] = (
    *((t, _RECON) for t in _RECONTEXT_COMMON),
    *((t, _RECON) for t in (
        "a {} with a wheat field in the background",
        "a {} with a tree and autumn leaves in the background",
        "a {} with the Eiffel Tower in the background",
        "a {} floating on top of water",
        "a {} floating in an ocean of milk",
        "a {} on top of green grass with sunflowers around it",
        "a {} on top of a mirror",
        "a {} on top of the sidewalk in a crowded street",
        "a {} on top of a dirt road",
        "a {} on top of a white rug",
    )),
    *((t, _PROP) for t in _PROPERTY),
)
"""The paper's 25 object prompts as ``(template, group)``: 20 recontextualization, 5 property."""

LIVE_TEMPLATES: tuple[tuple[str, str], ...] = (
    *((t, _RECON) for t in _RECONTEXT_COMMON),
    *((t, _ACCESS) for t in (
        "a {} wearing a red hat",
        "a {} wearing a santa hat",
        "a {} wearing a rainbow scarf",
        "a {} wearing a black top hat and a monocle",
        "a {} in a chef outfit",
        "a {} in a firefighter outfit",
        "a {} in a police outfit",
        "a {} wearing pink glasses",
        "a {} wearing a yellow shirt",
        "a {} in a purple wizard outfit",
    )),
    *((t, _PROP) for t in _PROPERTY),
)
"""The paper's 25 live-subject prompts as ``(template, group)``: 10 recontextualization, 10 accessorization,
5 property."""

PROMPT_SETS = {"live": LIVE_TEMPLATES, "object": OBJECT_TEMPLATES}


@dataclass(frozen=True)
class PromptSpec:
    """One evaluation prompt.

    Attributes:
        index: position in the set (names the generated files).
        template: the template, with ``{}``.
        group: recontextualization / accessorization / property / custom / a file's own group.
        prompt: what the models are prompted with: ``{}`` -> "<identifier> <class noun>".
        clip_text: what CLIP-T compares the image with: ``{}`` -> "<class noun>" (the identifier is a rare token that
            means nothing to CLIP, so it is left out; the text describes what the image should show).
        background_text: what background CLIP-T compares the background-only image with: the context the prompt
            asks for, without the subject (:func:`background_text`); ``None`` when the prompt names no context.
    """

    index: int
    template: str
    group: str
    prompt: str
    clip_text: str
    background_text: str | None = None


_GROUP_RE = re.compile(r"^([A-Za-z0-9_\-]+)\s*\|\s*(.+)$")


def _check_template(template: str, where: str) -> None:
    if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
        raise ValueError(
            f"{where}: template {template!r} must contain exactly one `{{}}` placeholder (where "
            "'<identifier> <class noun>' goes) and no other braces, e.g. 'a {} on the beach'."
        )


def load_templates(prompt_set: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``(template, group)`` pairs of ``"live"``, ``"object"`` or a template file (format in the module doc).

    Raises:
        ValueError: an unknown set name, or a file without templates or with a template lacking ``{}``.
    """
    name = os.fspath(prompt_set)
    if name in PROMPT_SETS:
        return list(PROMPT_SETS[name])
    path = Path(name)
    if not path.is_file():
        raise ValueError(
            f"`{compare_flag('prompt_set')}` must be 'live', 'object' or an existing template file, got {name!r}"
            + (" (a folder)." if path.is_dir() else " (no such file).")
        )
    templates = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _GROUP_RE.match(line)
        group, template = (match.group(1), match.group(2).strip()) if match else ("custom", line)
        _check_template(template, f"`{compare_flag('prompt_set')}` file {str(path)!r} line {n}")
        templates.append((template, group))
    if not templates:
        raise ValueError(
            f"`{compare_flag('prompt_set')}` file {str(path)!r} holds no templates: write one per line with a `{{}}` "
            "placeholder, e.g. 'a {} on the beach'."
        )
    return templates


def build_prompts(prompt_set: str | os.PathLike[str], identifier: str, class_noun: str) -> list[PromptSpec]:
    """The prompts of ``prompt_set`` filled in with ``identifier`` and ``class_noun``.

    >>> build_prompts("live", "sks", "dog")[0].prompt
    'a sks dog in the jungle'
    """
    if not identifier.strip():
        raise ValueError(f"`{compare_flag('identifier')}` must be a non-empty word, got {identifier!r}.")
    if not class_noun.strip():
        raise ValueError(f"`{compare_flag('class_noun')}` must be a non-empty word, got {class_noun!r}.")
    subject = f"{identifier.strip()} {class_noun.strip()}"
    return [
        PromptSpec(i, t, g, t.replace("{}", subject), t.replace("{}", class_noun.strip()), background_text(t, g))
        for i, (t, g) in enumerate(load_templates(prompt_set))
    ]


# Groups whose prompts change the subject itself (a hat, a colour): nothing is asked of the background.
_SUBJECT_GROUPS = frozenset({"accessorization", "property"})
# A place or context after the subject: "on the beach", "with a city in the background", "floating in ...".
_CONTEXT_LEAD = re.compile(
    r"^(?:floating\s+)?(?:on top of|in front of|next to|on|in|at|with|under|near|beside|by|inside|against|among)\s+",
    re.IGNORECASE,
)


def background_text(template: str, group: str) -> str | None:
    """The context a template asks for, with the subject phrase removed: the text of background CLIP-T.

    The text after ``{}`` loses its leading preposition ("a {} on the beach" -> "the beach"; "a {} with a city in the
    background" -> "a city in the background"). ``None`` for the accessorization and property groups (they change
    the subject, which the background-only image hides) and for templates with no place after ``{}`` ("a {} wearing
    a crown", "a red {}").

    >>> background_text("a {} on top of pink fabric", "recontextualization")
    'pink fabric'
    """
    if group in _SUBJECT_GROUPS:
        return None
    after = template.split("{}", 1)[1].strip()
    match = _CONTEXT_LEAD.match(after)
    if match is None:
        return None
    rest = after[match.end():].strip(" ,.")
    return rest or None


_NOT_IDENTIFIERS = frozenset({"a", "an", "the", "of", "my", "our", "your", "photo", "picture", "image"})


def infer_identifier(instance_prompt: str, class_noun: str) -> str | None:
    """The word right before ``class_noun`` in a training prompt ("a photo of sks dog" -> "sks"), if any.

    An article or a word like "photo" there ("a photo of a dog") means the prompt has no identifier: ``None``.
    """
    words = instance_prompt.split()
    noun = class_noun.split()
    for i in range(1, len(words) - len(noun) + 1):
        if [w.lower() for w in words[i:i + len(noun)]] == [w.lower() for w in noun]:
            return None if words[i - 1].lower() in _NOT_IDENTIFIERS else words[i - 1]
    return None
