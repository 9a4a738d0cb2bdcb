"""Tiny models built from the real classes, for offline CPU tests, docs examples and benchmarks.

A public module (as ``diffusers.utils.testing_utils``) so that tests, the docs and the benchmarks use one set of
builders. The product never imports it.

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
    merged = ["sk", "sks</w>", "do", "dog</w>"]  # every merge result must be in the vocab (transformers 5)
    tokens = ["<|startoftext|>", "<|endoftext|>", *_CHARS, *[c + "</w>" for c in _CHARS], *merged]
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
    import tempfile

    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

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


# ------------------------------------------------------------------------- generation and evaluation (issue 5)
# Tiny metric models (CLIP for CLIP-I / CLIP-T, a ViT for DINO) and a tiny LoRA training-output folder, all saved
# with save_pretrained / save_lora_weights so the code under test loads them exactly as it loads real ones.


def save_tiny_clip(folder: str | Path) -> Path:
    """A tiny ``CLIPModel`` (32-px images, 8-d projections) + ``CLIPProcessor`` (tiny tokenizer) in ``folder``."""
    import tempfile

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = tiny_tokenizer(tok_dir)
    config = CLIPConfig(
        text_config={"vocab_size": 1000, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=8,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_dino(folder: str | Path) -> Path:
    """A tiny ``ViTModel`` (32-px images, 8-px patches, 16-d CLS) + ``ViTImageProcessor`` in ``folder``."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = Path(folder)
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                               num_hidden_layers=2, num_attention_heads=2), add_pooling_layer=False).eval()
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def save_tiny_lora_run(
    folder: str | Path,
    base_dir: str | Path,
    *,
    seed: int = 1,
    rank: int = 2,
    config: dict | None = None,
    masks: dict[str, np.ndarray] | None = None,
) -> Path:
    """A training-output folder as the trainer writes it: a random (non-zero) LoRA on the tiny UNet saved as
    ``pytorch_lora_weights.safetensors``, ``config.resolved.yaml`` naming ``base_dir``, and optionally ``masks/``.

    Args:
        folder: the output folder.
        base_dir: the tiny SD pipeline folder the LoRA belongs to.
        seed: seed of the LoRA weights (different seeds give different LoRAs).
        rank: LoRA rank.
        config: extra entries for ``config.resolved.yaml``.
        masks: ``{image stem: (H, W) bool}`` written as ``masks/<stem>.png`` + ``masks.json`` + ``masks_grid.jpg``.
    """
    import yaml
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    resolved = {"pretrained_model_name_or_path": str(base_dir), "seed": 0, "max_train_steps": 2,
                "mask_source": "dir" if masks else "none", **(config or {})}
    (folder / "config.resolved.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    if masks:
        mdir = folder / "masks"
        mdir.mkdir(exist_ok=True)
        for stem, mask in masks.items():
            Image.fromarray(mask.astype(np.uint8) * 255).save(mdir / f"{stem}.png")
        (mdir / "masks.json").write_text(json.dumps({"version": 1, "method": "dir"}), encoding="utf-8")
        tiles = [Image.fromarray(m.astype(np.uint8) * 255).convert("RGB").resize((64, 48)) for m in masks.values()]
        grid = Image.new("RGB", (64 * len(tiles), 48))
        for i, t in enumerate(tiles):
            grid.paste(t, (64 * i, 0))
        grid.save(mdir / "masks_grid.jpg")
    return folder


def write_instance_dir(folder: str | Path, n: int = 3, size_hw: tuple[int, int] = (48, 64)) -> dict[str, np.ndarray]:
    """Write ``n`` synthetic subject photos (``00.jpg`` ...) into ``folder``; return their masks by stem."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    masks = {}
    h, w = size_hw
    for i in range(n):
        y0, x0 = 8 + 2 * i, 12 + 3 * i
        image, mask = synthetic_subject(h, w, box_yx=(y0, x0, y0 + h // 2, x0 + w // 2), seed=i)
        Image.fromarray(image).save(folder / f"{i:02d}.jpg", quality=95)
        masks[f"{i:02d}"] = mask
    return masks


# ------------------------------------------------------------------------- segmentation (issue 2)
TINY_SAM_MODEL_TYPE = "tiny"


def register_tiny_sam() -> str:
    """Register :func:`tiny_sam` as SAM model type ``"tiny"`` (idempotent; test-only, never in the product).

    Then ``load_sam("tiny", checkpoint=path)`` and ``--sam-model tiny --sam-checkpoint PATH`` work in-process.
    """
    from persam_dreambooth.segmentation.sam import SAM_BUILDERS, register_sam_builder

    if TINY_SAM_MODEL_TYPE not in SAM_BUILDERS:
        register_sam_builder(TINY_SAM_MODEL_TYPE, tiny_sam)
    return TINY_SAM_MODEL_TYPE


# ------------------------------------------------------------------------- generation and evaluation (issue 5, 2)
TINY_PROMPT_TEMPLATES = "recontextualization | a {} on the beach\nrecontextualization | a {} in the snow\n" \
                        "property | a red {}\n"


def tiny_compare_workspace(root: str | Path) -> dict[str, Path]:
    """Everything ``compare`` needs, on tiny models, built once into ``root`` (reused when already there).

    Returns paths by role: ``sd`` (tiny pipeline), ``instance`` (3 synthetic photos), ``masked`` (LoRA run with
    ``masks/``, instance_prompt "a photo of sks dog"), ``vanilla`` (another LoRA, no masks), ``clip``, ``dino``,
    ``sam`` (tiny SAM checkpoint; model type "tiny" is registered), ``prompts`` (3 templates in 2 groups).
    """
    root = Path(root)
    paths = {k: root / k for k in ("sd", "instance", "masked", "vanilla", "clip", "dino")}
    paths["sam"] = root / "tiny_sam.pth"
    paths["prompts"] = root / "prompts.txt"
    register_tiny_sam()
    if (root / ".done").is_file():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    save_tiny_sd(paths["sd"])
    masks = write_instance_dir(paths["instance"], n=3)
    save_tiny_lora_run(paths["masked"], paths["sd"], seed=1, masks=masks,
                       config={"instance_prompt": "a photo of sks dog", "mask_source": "persam"})
    save_tiny_lora_run(paths["vanilla"], paths["sd"], seed=2,
                       config={"instance_prompt": "a photo of sks dog", "mask_source": "none"})
    save_tiny_clip(paths["clip"])
    save_tiny_dino(paths["dino"])
    torch.save(tiny_sam().state_dict(), paths["sam"])
    paths["prompts"].write_text(TINY_PROMPT_TEMPLATES, encoding="utf-8")
    (root / ".done").write_text("ok", encoding="utf-8")
    return paths


def tiny_compare_kwargs(ws: dict[str, Path], output_dir: str | Path, **overrides) -> dict:
    """Keyword arguments of ``persam_dreambooth.evaluation.compare.compare`` for :func:`tiny_compare_workspace`."""
    kwargs = {
        "runs": {"masked": str(ws["masked"]), "vanilla": str(ws["vanilla"])},
        "instance_data_dir": str(ws["instance"]), "class_noun": "dog", "output_dir": str(output_dir),
        "prompt_set": str(ws["prompts"]), "num_images_per_prompt": 2, "num_inference_steps": 2,
        "dino_model": str(ws["dino"]), "clip_model": str(ws["clip"]), "sam_model_type": TINY_SAM_MODEL_TYPE,
        "sam_checkpoint": str(ws["sam"]), "device": "cpu",
    }
    kwargs.update(overrides)
    return kwargs


def tiny_compare_report(root: str | Path) -> Path:
    """Run ``compare`` once on :func:`tiny_compare_workspace` into ``root/report`` (reused when already there)."""
    from persam_dreambooth.evaluation.compare import compare

    root = Path(root)
    ws = tiny_compare_workspace(root / "workspace")
    out = root / "report"
    if not (out / "report.html").is_file():
        compare(progress=False, **tiny_compare_kwargs(ws, out))
    return out


# ------------------------------------------------------------------------- generation and evaluation (issue 5, 3)
LONG_RUN_NAME = "masked_rank8_lr1e-4_persam_f_dilate4"


def tiny_compare_report_many_runs(root: str | Path) -> Path:
    """``compare`` with 4 runs, one of them with a long name (:data:`LONG_RUN_NAME`), into ``root/report-many``: how
    the page looks with more runs than the usual two. Reuses :func:`tiny_compare_workspace` in ``root/workspace``."""
    from persam_dreambooth.evaluation.compare import compare

    root = Path(root)
    ws = tiny_compare_workspace(root / "workspace")
    out = root / "report-many"
    if not (out / "report.html").is_file():
        extra = {}
        for name, seed in ((LONG_RUN_NAME, 5), ("masked_lr5e-5", 6)):
            folder = root / "extra-runs" / name
            if not (folder / "pytorch_lora_weights.safetensors").is_file():
                save_tiny_lora_run(folder, ws["sd"], seed=seed,
                                   config={"instance_prompt": "a photo of sks dog", "mask_source": "persam_f"})
            extra[name] = str(folder)
        runs = {"masked": str(ws["masked"]), "vanilla": str(ws["vanilla"]), **extra}
        compare(progress=False, **tiny_compare_kwargs(ws, out, runs=runs))
    return out
