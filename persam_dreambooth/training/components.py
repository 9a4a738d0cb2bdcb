"""The base model: detect its family and inspect its configs before training (cheap), then load its components.

The family comes from ``model_index.json``'s ``_class_name`` (:mod:`persam_dreambooth.training.families`); the
family reads the component configs (VAE scale factor, latent channels, prediction type) and loads the weights.
"""

from __future__ import annotations

import dataclasses

import torch

from persam_dreambooth.training.buckets import parse_buckets
from persam_dreambooth.training.config import TrainConfig
from persam_dreambooth.training.families import (
    BaseModelInfo,
    Components,
    ModelFamily,
    ModelFiles,
    family_for_class_name,
    get_family,
)

__all__ = ["BaseModelInfo", "Components", "inspect_base_model", "check_buckets", "check_lora_targets",
           "load_components", "family_of"]


def inspect_base_model(config: TrainConfig) -> BaseModelInfo:
    """Read ``model_index.json`` and the component configs (no weights); check ``resolution`` and the VAE.

    Raises:
        FileNotFoundError: the base model (or the replacement VAE) folder or Hub id does not exist.
        ValueError: an unsupported family (the message lists the supported ones), a missing component, a VAE that
            does not match, or a ``resolution`` the family cannot take.
    """
    files = ModelFiles(config.pretrained_model_name_or_path, config.revision)
    index = files.model_index()
    family = family_for_class_name(str(index.get("_class_name", "")), value=config.pretrained_model_name_or_path)
    info = family.inspect(files, index)
    if config.pretrained_vae_model_name_or_path:
        vae_files = ModelFiles(config.pretrained_vae_model_name_or_path, config.revision,
                               arg_name="pretrained_vae_model_name_or_path")
        family.check_vae(vae_files, info)
        info = dataclasses.replace(info, vae_config=vae_files.read_json("config.json"))
    family.check_resolution(config.resolution, info)
    if config.aspect_ratio_buckets:
        check_buckets(parse_buckets(config.aspect_ratio_buckets), info)
    family.check_config(config, info)
    return info


def check_buckets(buckets: list[tuple[int, int]], info: BaseModelInfo) -> None:
    """Both sides of every aspect-ratio bucket must be multiples of the family's latent x patch factor.

    Raises:
        ValueError: naming ``aspect_ratio_buckets``, the bucket, the factor and the nearest valid bucket.
    """
    m = info.resolution_multiple
    for h, w in buckets:
        if h % m or w % m or h < m or w < m:
            fix = f"{max(m, (h + m // 2) // m * m)},{max(m, (w + m // 2) // m * m)}"  # nearest, halves up
            raise ValueError(
                f"`aspect_ratio_buckets`: bucket {h},{w} (height,width) must have both sides multiples of "
                f"{m}, the latent x patch factor of {info.name_or_path!r} (try {fix})."
            )


def family_of(info: BaseModelInfo) -> ModelFamily:
    """The :class:`ModelFamily` that inspected ``info``."""
    return get_family(info.family)


def check_lora_targets(config: TrainConfig, info: BaseModelInfo) -> None:
    """``lora_target_modules`` (and the text encoders') must exist in the model, checked on models built from their
    configs without weights (``init_empty_weights``), so a typo fails here and not after the masks are made.

    Raises:
        ValueError: a target name matches no module (naming the flag).
    """
    if config.train_mode != "lora":
        return
    from accelerate import init_empty_weights

    from persam_dreambooth.training.lora import check_targets

    family = family_of(info)
    files = ModelFiles(config.pretrained_model_name_or_path, config.revision)
    denoiser_cls = family.component_class(info, family.denoiser_name)
    with init_empty_weights():
        denoiser = denoiser_cls.from_config(files.read_json("config.json", family.denoiser_name))
    check_targets(denoiser, family.resolved_lora_targets(config), "lora_target_modules")
    if config.train_text_encoder:
        for name in family.text_encoder_lora_kwargs:
            cls = family.component_class(info, name)
            te_config = cls.config_class.from_dict(files.read_json("config.json", name))
            with init_empty_weights():
                text_encoder = cls(te_config)
            check_targets(text_encoder, family.resolved_text_encoder_lora_targets(config),
                          "text_encoder_lora_target_modules")


def load_components(config: TrainConfig, info: BaseModelInfo, weight_dtype: torch.dtype = torch.float32) -> Components:
    """The family's components, frozen, on the CPU (:meth:`ModelFamily.load_components`)."""
    return family_of(info).load_components(config, info, weight_dtype)
