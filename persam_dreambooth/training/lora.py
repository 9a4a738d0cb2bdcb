"""LoRA adapters via peft on the denoiser (and optionally text encoders), saved in the family pipeline's format.

* :func:`add_denoiser_lora` / :func:`add_text_encoder_lora` attach ``LoraConfig`` adapters named ``"default"``.
* :func:`save_lora` writes ``pytorch_lora_weights.safetensors`` through the family pipeline's own
  ``save_lora_weights`` (keys ``unet.*`` / ``transformer.*`` / ``text_encoder.*``...), so
  ``Pipeline.load_lora_weights(folder)`` works unchanged. Rank and alpha travel in the file's metadata.
* :func:`load_lora` reads such a file back into the adapters (resume from a checkpoint).

Text encoders get their adapter through ``peft.inject_adapter_in_model``: transformers' own ``add_adapter`` asks
for a newer peft than the one pinned here, and ``inject_adapter_in_model`` is what diffusers' loader uses too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from persam_dreambooth.training.families.base import ModelFamily
from persam_dreambooth.utils.io import fix_permissions

__all__ = [
    "LORA_WEIGHT_NAME", "make_lora_config", "check_targets", "add_denoiser_lora", "add_text_encoder_lora",
    "save_lora", "load_lora",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER = "default"


def make_lora_config(rank: int, alpha: float, dropout: float, target_modules: Sequence[str]) -> LoraConfig:
    """A peft ``LoraConfig`` with gaussian-initialised A and zero B (the adapter starts as the identity)."""
    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )


def check_targets(model: torch.nn.Module, targets: Sequence[str], arg_name: str) -> None:
    """Every name in ``targets`` must be a module of ``model`` (or end one's dotted path); else a ValueError."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(
            f"`{arg_name}` names modules the {type(model).__name__} does not have: {missing}. Linear layer names "
            f"in this model: {leaves[:30]}."
        )


def add_denoiser_lora(
    denoiser: torch.nn.Module, rank: int, alpha: float, dropout: float, target_modules: Sequence[str]
) -> LoraConfig:
    """Attach LoRA to the UNet's / transformer's ``target_modules`` (call after ``requires_grad_(False)``)."""
    check_targets(denoiser, target_modules, "lora_target_modules")
    config = make_lora_config(rank, alpha, dropout, target_modules)
    denoiser.add_adapter(config)
    return config


def add_text_encoder_lora(
    text_encoder: torch.nn.Module, rank: int, alpha: float, dropout: float, target_modules: Sequence[str]
) -> LoraConfig:
    """Attach LoRA to a text encoder's ``target_modules`` (CLIP's attention projections by default)."""
    check_targets(text_encoder, target_modules, "text_encoder_lora_target_modules")
    config = make_lora_config(rank, alpha, dropout, target_modules)
    inject_adapter_in_model(config, text_encoder, adapter_name=ADAPTER)
    return config


def _cpu_f32(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}


def save_lora(
    folder: str | os.PathLike[str],
    family: ModelFamily,
    denoiser: torch.nn.Module,
    text_encoders: Mapping[str, torch.nn.Module] | None = None,
    denoiser_config: LoraConfig | None = None,
    text_encoder_configs: Mapping[str, LoraConfig] | None = None,
) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` atomically (a temporary folder, then a rename).

    Args:
        family: whose pipeline's ``save_lora_weights`` writes the file.
        denoiser: the UNet / transformer with its adapter. text_encoders: trained text encoders with adapters, by
            component name. denoiser_config / text_encoder_configs: their ``LoraConfig`` (rank and alpha travel in
            the file's metadata).

    Returns:
        The path of the weights file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    denoiser_sd = get_peft_model_state_dict(denoiser, adapter_name=ADAPTER)
    if family.denoiser_lora_in_diffusers_format:
        denoiser_sd = convert_state_dict_to_diffusers(denoiser_sd)
    te_sds = {name: _cpu_f32(convert_state_dict_to_diffusers(get_peft_model_state_dict(te, adapter_name=ADAPTER)))
              for name, te in (text_encoders or {}).items()}
    metadata = {name: cfg.to_dict() for name, cfg in (text_encoder_configs or {}).items() if name in te_sds}
    if denoiser_config is not None:
        metadata[family.denoiser_name] = denoiser_config.to_dict()
    tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=folder))
    try:
        family.save_lora(tmp, _cpu_f32(denoiser_sd), te_sds, metadata, LORA_WEIGHT_NAME)
        target = folder / LORA_WEIGHT_NAME
        fix_permissions(tmp / LORA_WEIGHT_NAME)  # a deliverable: the umask's mode, not the temporary folder's
        os.replace(tmp / LORA_WEIGHT_NAME, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_lora(
    folder: str | os.PathLike[str],
    family: ModelFamily,
    denoiser: torch.nn.Module,
    text_encoders: Mapping[str, torch.nn.Module] | None = None,
) -> None:
    """Copy the weights of ``folder/pytorch_lora_weights.safetensors`` into the existing adapters (in place).

    Raises:
        FileNotFoundError: no weights file in ``folder``.
        ValueError: the file does not fit the adapters (other rank or target modules).
    """
    path = Path(folder) / LORA_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA weights {str(path)!r} to resume from.")
    state_dict = family.read_lora(folder, LORA_WEIGHT_NAME)
    prefix = family.denoiser_name + "."
    denoiser_sd = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    result = set_peft_model_state_dict(denoiser, convert_unet_state_dict_to_peft(denoiser_sd), adapter_name=ADAPTER)
    _check_load(result, family.denoiser_name, path)
    for name, text_encoder in (text_encoders or {}).items():
        te_sd = {k.removeprefix(name + "."): v for k, v in state_dict.items() if k.startswith(name + ".")}
        if not te_sd:
            raise ValueError(f"{str(path)!r} holds no {name} LoRA weights, but {name} is trained.")
        peft_sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te_sd))
        _check_load(set_peft_model_state_dict(text_encoder, peft_sd, adapter_name=ADAPTER), name, path)


def _check_load(result, component: str, path: Path) -> None:
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise ValueError(
            f"{str(path)!r} does not fit the {component} adapters: unexpected keys {unexpected[:5]}, missing LoRA "
            f"keys {missing[:5]} (was it trained with another rank or other target modules?)."
        )
