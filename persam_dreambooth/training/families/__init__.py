"""Model families: one module per family, found from ``model_index.json``'s ``_class_name``.

To add a family, write ``families/<family>.py`` with a :class:`~.base.ModelFamily` subclass and add one line to
:data:`FAMILIES` (``docs/design/model_families.md``). Nothing else in the trainer changes.

    family = detect_family("stable-diffusion-v1-5/stable-diffusion-v1-5")   # reads model_index.json only
    family.name  # "sd"
"""

from __future__ import annotations

from importlib import import_module

from persam_dreambooth.training.families.base import (
    BaseModelInfo,
    Components,
    ModelFamily,
    ModelFiles,
    NoisedLatents,
    TextConditioning,
)

__all__ = [
    "FAMILIES", "BaseModelInfo", "Components", "ModelFamily", "ModelFiles", "NoisedLatents", "TextConditioning",
    "UnsupportedModelError", "detect_family", "family_for_class_name", "get_family", "supported_families",
]

#: ``family name -> (module:class, model_index.json _class_name values)``, in the order of the docs table.
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "sd": ("persam_dreambooth.training.families.stable_diffusion:StableDiffusionFamily",
           ("StableDiffusionPipeline",)),
    "sdxl": ("persam_dreambooth.training.families.sdxl:StableDiffusionXLFamily",
             ("StableDiffusionXLPipeline",)),
    "sd3": ("persam_dreambooth.training.families.sd3:StableDiffusion3Family", ("StableDiffusion3Pipeline",)),
    "flux": ("persam_dreambooth.training.families.flux:FluxFamily", ("FluxPipeline",)),
    "flux2_klein": ("persam_dreambooth.training.families.flux2_klein:Flux2KleinFamily", ("Flux2KleinPipeline",)),
    "z_image": ("persam_dreambooth.training.families.z_image:ZImageFamily", ("ZImagePipeline",)),
    "qwen_image": ("persam_dreambooth.training.families.qwen_image:QwenImageFamily", ("QwenImagePipeline",)),
}


class UnsupportedModelError(ValueError):
    """The base model's pipeline class belongs to no supported family (raised before anything is written)."""


def supported_families() -> str:
    """``"sd (StableDiffusionPipeline), sdxl (StableDiffusionXLPipeline), ..."`` for messages and docs."""
    return ", ".join(f"{name} ({', '.join(classes)})" for name, (_, classes) in FAMILIES.items())


def get_family(name: str) -> ModelFamily:
    """A fresh instance of family ``name`` (a key of :data:`FAMILIES`)."""
    if name not in FAMILIES:
        raise UnsupportedModelError(f"unknown model family {name!r}; supported: {supported_families()}.")
    target = FAMILIES[name][0]
    module, _, cls = target.partition(":")
    return getattr(import_module(module), cls)()


def family_for_class_name(class_name: str, arg_name: str = "pretrained_model_name_or_path",
                          value: str | None = None) -> ModelFamily:
    """The family training pipelines of class ``class_name`` (``_class_name`` of ``model_index.json``).

    Raises:
        UnsupportedModelError: naming the argument, its value, the class and the supported families.
    """
    for name, (_, classes) in FAMILIES.items():
        if class_name in classes:
            return get_family(name)
    what = f"`{arg_name}` {value!r}" if value is not None else f"`{arg_name}`"
    raise UnsupportedModelError(
        f"{what} is a {class_name or 'pipeline without _class_name'} model, which no model family trains; "
        f"supported families (model_index.json _class_name): {supported_families()}."
    )


def detect_family(model_path_or_id: str, revision: str | None = None) -> ModelFamily:
    """The family of a diffusers model folder or Hub id, from its ``model_index.json`` (nothing else is read).

    Raises:
        FileNotFoundError: no such folder / reachable Hub model, or no ``model_index.json``.
        UnsupportedModelError: the ``_class_name`` belongs to no family (the message lists the supported ones).
    """
    index = ModelFiles(model_path_or_id, revision).model_index()
    return family_for_class_name(str(index.get("_class_name", "")), value=model_path_or_id)
