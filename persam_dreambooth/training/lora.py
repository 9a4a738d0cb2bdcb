"""LoRA adapters via peft on the UNet (and optionally the text encoder), saved in diffusers' format.

* :func:`add_unet_lora` / :func:`add_text_encoder_lora` attach ``LoraConfig`` adapters named ``"default"``.
* :func:`save_lora` writes ``pytorch_lora_weights.safetensors`` with keys ``unet.*`` / ``text_encoder.*`` exactly as
  ``StableDiffusionLoraLoaderMixin.save_lora_weights`` does (it is what writes them), so
  ``pipe.load_lora_weights(folder)`` works unchanged. Rank and alpha travel in the file's metadata.
* :func:`load_lora` reads such a file back into the adapters (resume from a checkpoint).

The text encoder gets its adapter through ``peft.inject_adapter_in_model``: transformers' own ``add_adapter`` asks
for a newer peft than the one pinned here, and ``inject_adapter_in_model`` is what diffusers' loader uses too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

__all__ = [
    "LORA_WEIGHT_NAME", "make_lora_config", "check_targets", "add_unet_lora", "add_text_encoder_lora", "save_lora",
    "load_lora",
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


def add_unet_lora(
    unet: torch.nn.Module, rank: int, alpha: float, dropout: float, target_modules: Sequence[str]
) -> LoraConfig:
    """Attach LoRA to the UNet's ``target_modules`` (freezes nothing; call after ``requires_grad_(False)``)."""
    check_targets(unet, target_modules, "lora_target_modules")
    config = make_lora_config(rank, alpha, dropout, target_modules)
    unet.add_adapter(config)
    return config


def add_text_encoder_lora(
    text_encoder: torch.nn.Module, rank: int, alpha: float, dropout: float, target_modules: Sequence[str]
) -> LoraConfig:
    """Attach LoRA to the text encoder's attention projections."""
    check_targets(text_encoder, target_modules, "text_encoder_lora_target_modules")
    config = make_lora_config(rank, alpha, dropout, target_modules)
    inject_adapter_in_model(config, text_encoder, adapter_name=ADAPTER)
    return config


def lora_state_dicts(
    unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The adapters' weights in diffusers key format (no ``unet.`` / ``text_encoder.`` prefix yet)."""
    unet_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
    te_sd = None
    if text_encoder is not None:
        te_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder, adapter_name=ADAPTER))
    return unet_sd, te_sd


def save_lora(
    folder: str | os.PathLike[str],
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    unet_config: LoraConfig | None = None,
    text_encoder_config: LoraConfig | None = None,
) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` atomically (a temporary folder, then a rename).

    Returns:
        The path of the weights file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet_sd, te_sd = lora_state_dicts(unet, text_encoder)
    unet_sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in unet_sd.items()}
    if te_sd is not None:
        te_sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in te_sd.items()}
    tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=folder))
    try:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=unet_sd,
            text_encoder_lora_layers=te_sd,
            unet_lora_adapter_metadata=unet_config.to_dict() if unet_config is not None else None,
            text_encoder_lora_adapter_metadata=(
                text_encoder_config.to_dict() if text_encoder_config is not None and te_sd else None
            ),
            weight_name=LORA_WEIGHT_NAME,
        )
        target = folder / LORA_WEIGHT_NAME
        os.replace(tmp / LORA_WEIGHT_NAME, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_lora(
    folder: str | os.PathLike[str], unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None
) -> None:
    """Copy the weights of ``folder/pytorch_lora_weights.safetensors`` into the existing adapters (in place).

    Raises:
        FileNotFoundError: no weights file in ``folder``.
        ValueError: the file does not fit the adapters (other rank or target modules).
    """
    path = Path(folder) / LORA_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA weights {str(path)!r} to resume from.")
    state_dict, _ = StableDiffusionPipeline.lora_state_dict(str(folder), weight_name=LORA_WEIGHT_NAME)
    unet_sd = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_sd), adapter_name=ADAPTER)
    _check_load(result, "unet", path)
    if text_encoder is not None:
        te_sd = {k.removeprefix("text_encoder."): v for k, v in state_dict.items() if k.startswith("text_encoder.")}
        if not te_sd:
            raise ValueError(f"{str(path)!r} holds no text-encoder LoRA weights, but the text encoder is trained.")
        peft_sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te_sd))
        _check_load(set_peft_model_state_dict(text_encoder, peft_sd, adapter_name=ADAPTER), "text_encoder", path)


def _check_load(result, component: str, path: Path) -> None:
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise ValueError(
            f"{str(path)!r} does not fit the {component} adapters: unexpected keys {unexpected[:5]}, missing LoRA "
            f"keys {missing[:5]} (was it trained with another rank or other target modules?)."
        )
