"""Tiny pipelines of the UNet model families beyond SD 1.x/2.x (SDXL), built from the real classes, offline.

SDXL: two CLIP text encoders (``CLIPTextModel`` and ``CLIPTextModelWithProjection``, hidden 8 each, so the UNet's
cross-attention sees 16 channels), their tokenizers written on the spot from the 78-token vocabulary of
:func:`persam_dreambooth.testing.write_tiny_clip_tokenizer`, a ``text_time`` UNet (``addition_time_embed_dim`` 4:
``6 * 4 + 8 = 32`` added-embedding inputs) and the tiny 2-block VAE (scale factor 2).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

__all__ = ["save_tiny_sdxl", "tiny_sdxl_unet", "save_tiny_vae"]

_TE_HIDDEN = 8
_PROJECTION = 8
_TIME_DIM = 4


def _clip_config(tokenizer, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection_dim} if projection_dim is not None else {}
    return CLIPTextConfig(
        vocab_size=1000, hidden_size=_TE_HIDDEN, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def tiny_sdxl_unet():
    """A ``text_time`` UNet: cross-attention 16 (= 8 + 8), added embedding ``6 * 4 + 8``; 16x16 latents."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(4, 8),
        norm_num_groups=2, attention_head_dim=2, cross_attention_dim=2 * _TE_HIDDEN, use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=_TIME_DIM,
        projection_class_embeddings_input_dim=6 * _TIME_DIM + _PROJECTION,
    )


def save_tiny_sdxl(folder: str | Path) -> Path:
    """Build a tiny ``StableDiffusionXLPipeline`` and ``save_pretrained`` it into ``folder`` (about 0.2 MB)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from persam_dreambooth.testing import tiny_tokenizer, tiny_vae

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = tiny_tokenizer(Path(tok_dir) / "one")
        tokenizer_2 = tiny_tokenizer(Path(tok_dir) / "two")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, _PROJECTION))
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=tiny_sdxl_unet(), scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(folder)
    return folder


def save_tiny_vae(folder: str | Path, latent_channels: int = 4, blocks: int = 2, seed: int = 1) -> Path:
    """A standalone tiny ``AutoencoderKL`` folder (``config.json`` at its root), as a replacement VAE is published
    (``--pretrained_vae_model_name_or_path``). Another seed than the pipeline's, so its latents differ."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(4, 8, 8)[:blocks],
        layers_per_block=1, norm_num_groups=2, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
    )
    vae.save_pretrained(folder)
    return Path(folder)
