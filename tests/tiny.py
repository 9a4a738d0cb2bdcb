"""Tiny models built from the real classes, for offline CPU tests (house style §8).

Nothing here downloads: the CLIP tokenizer is written to a folder from a 78-entry vocabulary, SAM is built from
segment_anything's own modules with a 4x4 embedding grid, and Stable Diffusion from diffusers' UNet/VAE plus a
transformers CLIP text encoder.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import torch

TINY_SAM_IMG_SIZE = 64
TINY_SAM_PATCH = 16


def tiny_sam(img_size: int = TINY_SAM_IMG_SIZE, patch_size: int = TINY_SAM_PATCH, dim: int = 32, seed: int = 0):
    """A ~94k-parameter SAM: grid ``img_size // patch_size`` (4x4), low-res masks 16x16."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = img_size // patch_size
    torch.manual_seed(seed)
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size, patch_size=patch_size, embed_dim=dim, depth=2, num_heads=2, mlp_ratio=2.0,
            out_chans=dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True, window_size=2, global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size), mask_in_chans=8
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3, transformer_dim=dim,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
            iou_head_depth=3, iou_head_hidden_dim=32,
        ),
    ).eval()


def synthetic_subject(
    height: int = 96, width: int = 128, box_yx: tuple[int, int, int, int] = (30, 40, 70, 90), seed: int = 0,
    color: tuple[int, int, int] = (220, 40, 40),
) -> tuple[np.ndarray, np.ndarray]:
    """A coloured ellipse-ish subject on a textured background. Returns ``(image (H, W, 3) uint8, mask (H, W) bool)``.

    ``box_yx`` = (y0, x0, y1, x1), the subject's bounding box (exclusive end).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    stripes = ((np.sin(xx / 3.0) + np.cos(yy / 5.0)) * 30 + 100).astype(np.float64)
    image = np.stack([stripes, stripes * 0.8 + 20, 255 - stripes], axis=2)
    image += rng.normal(0, 12, size=image.shape)
    y0, x0, y1, x1 = box_yx
    cy, cx = (y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2
    ry, rx = (y1 - y0) / 2, (x1 - x0) / 2
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    image[mask] = np.asarray(color, dtype=np.float64) + rng.normal(0, 6, size=(int(mask.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8), mask


# ----------------------------------------------------------------------------------------------- Stable Diffusion
_CHARS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
_MERGES = [("s", "k"), ("sk", "s</w>"), ("d", "o"), ("do", "g</w>")]


def write_tiny_clip_tokenizer(folder: str | Path) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` of a 78-token CLIP BPE tokenizer into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", *_CHARS, *[c + "</w>" for c in _CHARS], "sk", "sks</w>", "do", "dog</w>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in _MERGES) + "\n",
                                       encoding="utf-8")
    return folder


def tiny_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer

    write_tiny_clip_tokenizer(folder)
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    ids = tok("a photo of sks dog").input_ids
    assert tok.unk_token_id not in ids[1:-1], "tiny tokenizer maps words to <unk>"
    return tok


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(4, 8), norm_num_groups=2, attention_head_dim=2, cross_attention_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )


def tiny_vae():
    """vae_scale_factor = 2: 32x32 images give 16x16 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 8), layers_per_block=1,
        norm_num_groups=2, sample_size=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )


def tiny_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def save_tiny_sd(folder: str | Path) -> Path:
    """Build a tiny StableDiffusionPipeline and ``save_pretrained`` it into ``folder`` (about 0.2 MB)."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

    import tempfile

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = tiny_tokenizer(tok_dir)
    train_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear", clip_sample=False)
    scheduler = DDIMScheduler.from_config(train_scheduler.config, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer, unet=tiny_unet(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder
