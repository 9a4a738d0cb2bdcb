"""Seconds per step and peak memory of the masked DreamBooth step: plain MSE vs vanilla vs masked, cached or not.

Everything runs in one process on the same model and data, through the library's own pieces (LoRA setup, dataset,
latent cache, ``training_step``, accelerate's backward / optimizer step), with the variants interleaved in rounds
so drift in a shared machine hits them alike. Variants:

* ``mse``: the diffusers baseline, ``F.mse_loss`` on an unmasked batch (the masked loss is swapped out);
* ``vanilla``: ``mask_source: none``, i.e. our code path with all-ones masks;
* ``masked``: real subject masks (dilated by 2 px) through ``masked_diffusion_loss``.

Models (random weights, nothing downloaded): ``tiny`` (the test pipeline of ``--family``: sd, sdxl, sd3, flux,
flux2_klein, z_image, built with ``persam_dreambooth.testing`` and loaded through the family module exactly as the
trainer loads a real one; also qwen_image), ``sd15-random`` (the Stable Diffusion 1.5 UNet / VAE / CLIP text encoder
architectures, ``--family sd``), ``sdxl-random`` (SDXL 1.0 base, ``--family sdxl``), ``sd35m-random`` (SD 3.5 medium
transformer and VAE, ``--family sd3``) or ``flux-dev-random`` (FLUX.1 [dev] transformer and VAE, ``--family flux``);
the two flow models get text encoders with the real output widths but one layer (their prompts are encoded once,
before the timed steps; ``--offload`` then moves them off the device, as the trainer does). Examples::

    python benchmarks/train_step.py --model tiny --resolution 32 --steps 30
    python benchmarks/train_step.py --family flux --resolution 32 --steps 30   # masked-loss overhead on FLUX
    python benchmarks/train_step.py --family sdxl --model sdxl-random --resolution 1024 --device cuda \
        --mixed_precision fp16 --gradient_checkpointing --steps 10 --json sdxl.json
    python benchmarks/train_step.py --model sd15-random --resolution 64 --steps 2 --warmup 1 --rounds 1
    python benchmarks/train_step.py --family flux --model flux-dev-random --resolution 512 --device cuda \
        --mixed_precision bf16 --gradient_checkpointing --offload --steps 5 --json flux.json
    python benchmarks/train_step.py --family sd3 --model sd35m-random --layers 1 --resolution 32 --steps 1 \
        --warmup 1 --rounds 1   # plumbing on a CPU: one block of each kind, real widths
    python benchmarks/train_step.py --model sd15-random --resolution 512 --device cuda --mixed_precision fp16 \
        --gradient_checkpointing --steps 20 --json out.json

Peak memory is ``torch.cuda.max_memory_allocated`` per variant on CUDA; on CPU it is the process's peak RSS
(monotonic, so only the first variant's figure is its own).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import persam_dreambooth.training.step as step_module  # noqa: E402
from persam_dreambooth.training import TrainConfig  # noqa: E402
from persam_dreambooth.training.components import inspect_base_model, load_components  # noqa: E402
from persam_dreambooth.training.dataset import build_dataset, cache_latents, collate_examples  # noqa: E402
from persam_dreambooth.training.families import BaseModelInfo, Components  # noqa: E402
from persam_dreambooth.training.families.sdxl import StableDiffusionXLFamily  # noqa: E402
from persam_dreambooth.training.families.stable_diffusion import StableDiffusionFamily  # noqa: E402
from persam_dreambooth.training.optim import make_optimizer  # noqa: E402
from persam_dreambooth.training.step import build_step_models, training_step  # noqa: E402
from persam_dreambooth.training.trainable import prepare_models  # noqa: E402
from persam_dreambooth.utils.io import atomic_write_json  # noqa: E402

#: ``--family`` -> the tiny pipeline builder (``persam_dreambooth.testing``) and extra TrainConfig fields.
FAMILY_BUILDERS = {
    "sd": ("persam_dreambooth.testing:save_tiny_sd", {}),
    "sdxl": ("persam_dreambooth.testing.families:save_tiny_sdxl", {}),
    "sd3": ("persam_dreambooth.testing.flow_families:save_tiny_sd3", {"max_sequence_length": 16}),
    "flux": ("persam_dreambooth.testing.flow_families:save_tiny_flux", {"max_sequence_length": 16}),
    "flux2_klein": ("persam_dreambooth.testing.flow_families:save_tiny_flux2_klein", {"max_sequence_length": 16}),
    "z_image": ("persam_dreambooth.testing.flow_families:save_tiny_z_image", {"max_sequence_length": 16}),
    "qwen_image": ("persam_dreambooth.testing.flow_families:save_tiny_qwen_image", {"max_sequence_length": 16}),
}

# Stable Diffusion 1.5 architectures (stable-diffusion-v1-5/stable-diffusion-v1-5 configs), random weights.
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_scale_factor": 1.0,
    "center_input_sample": False,
}
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 32, "sample_size": 512,
    "scaling_factor": 0.18215, "act_fn": "silu",
}
SD15_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}
# Stable Diffusion XL 1.0 base architectures (stabilityai/stable-diffusion-xl-base-1.0 configs), random weights:
# 2,567,463,684 UNet parameters; the second text encoder is OpenCLIP ViT-bigG's text tower (694,659,840).
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32, "flip_sin_to_cos": True, "freq_shift": 0,
}
SDXL_TEXT_2 = {
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280,
}


# Stable Diffusion 3.5 medium (stabilityai/stable-diffusion-3.5-medium transformer/config.json): 2.47B parameters,
# MMDiT-X with dual attention in the first 13 blocks.
SD35M_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
# FLUX.1 [dev] (black-forest-labs/FLUX.1-dev transformer/config.json): 11.9B parameters, guidance embedding.
FLUX_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
# The 16-channel VAE of SD3.5 and FLUX.1 (scaling / shift factors differ).
FLOW_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "norm_num_groups": 32, "sample_size": 1024, "use_quant_conv": False, "use_post_quant_conv": False,
    "act_fn": "silu",
}
FLOW_VAE_FACTORS = {"sd35m-random": (1.5305, 0.0609), "flux-dev-random": (0.3611, 0.1159)}


def write_tokenizer(folder: Path):
    """A character-level CLIP BPE tokenizer (no download): enough to tokenize ``a photo of sks dog``."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *[c + "</w>" for c in chars]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def build_family_components(family: str, workdir: Path, config_fields: dict) -> tuple[dict, Components]:
    """Save the tiny pipeline of ``family`` and load it through the family module, as ``train`` does."""
    from importlib import import_module

    target, extra = FAMILY_BUILDERS[family]
    module, _, name = target.partition(":")
    folder = getattr(import_module(module), name)(workdir / "model")
    fields = {**config_fields, **extra, "pretrained_model_name_or_path": str(folder)}
    config = TrainConfig(**fields)
    return fields, load_components(config, inspect_base_model(config))


def _text_stand_ins(kind: str, tokenizer, t5_tokenizer) -> dict:
    """Text encoders with the real output widths (CLIP-L 768, CLIP-G 1280, T5-XXL 4096) but one layer and a tiny
    vocabulary: their embeddings are computed once before the step (``pre_compute_text_embeddings``) and the
    encoders leave the device (``offload``), so the timed steps and their peak memory do not depend on them."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer), "num_hidden_layers": 1,
           "intermediate_size": 64, "max_position_embeddings": 77}
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=4096, d_ff=64, d_kv=64, num_layers=1,
                                 num_heads=2, pad_token_id=t5_tokenizer.pad_token_id))
    if kind == "flux":
        return {"text_encoder": CLIPTextModel(CLIPTextConfig(hidden_size=768, num_attention_heads=12, **ids)),
                "text_encoder_2": t5}
    return {"text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, num_attention_heads=12,
                                                                       projection_dim=768, **ids)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, num_attention_heads=20,
                                                                         projection_dim=1280, **ids)),
            "text_encoder_3": t5}


def build_flow_components(model: str, device: torch.device, workdir: Path, layers: int | None,
                          dtype: torch.dtype = torch.float32) -> Components:
    """SD3.5 medium (``sd35m-random``) or FLUX.1 [dev] (``flux-dev-random``): the real transformer and VAE
    architectures with random weights, built on ``device``; text-encoder stand-ins (:func:`_text_stand_ins`).

    Args:
        layers: keep only this many transformer blocks (FLUX: of each kind), for a plumbing run on a CPU; None =
            the real depth.
        dtype: the weights are created in it (FLUX.1 [dev] in float32 would need 48 GB before the cast).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel

    from persam_dreambooth.testing.flow_families import tiny_t5_tokenizer
    from persam_dreambooth.training.families.flux import FluxFamily
    from persam_dreambooth.training.families.sd3 import StableDiffusion3Family

    flux = model == "flux-dev-random"
    cfg = dict(FLUX_DEV_TRANSFORMER if flux else SD35M_TRANSFORMER)
    if layers is not None:
        cfg["num_layers"] = layers
        if flux:
            cfg["num_single_layers"] = layers
        else:
            cfg["dual_attention_layers"] = tuple(i for i in cfg["dual_attention_layers"] if i < layers)
    scaling, shift = FLOW_VAE_FACTORS[model]
    tokenizer, t5_tokenizer = write_tokenizer(workdir / "tokenizer"), tiny_t5_tokenizer()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            denoiser = (FluxTransformer2DModel if flux else SD3Transformer2DModel)(**cfg)
            vae = AutoencoderKL(**FLOW_VAE, scaling_factor=scaling, shift_factor=shift)
            text_encoders = _text_stand_ins("flux" if flux else "sd3", tokenizer, t5_tokenizer)
    finally:
        torch.set_default_dtype(previous)
    for module in (denoiser, vae, *text_encoders.values()):
        module.requires_grad_(False)
    if flux:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    family = FluxFamily() if flux else StableDiffusion3Family()
    info = BaseModelInfo(
        name_or_path=model, family=family.name, pipeline_class=family.pipeline_class_name, components={},
        vae_scale_factor=8, loss_grid_factor=8, resolution_multiple=16, denoiser_downsample_factor=1,
        latent_channels=16, prediction_type="flow_matching", vae_config=dict(vae.config),
        extra={"guidance_embeds": True} if flux else {},
    )
    tokenizers = {name: t5_tokenizer if name == family.tokenizer_names[-1] else tokenizer
                  for name in family.tokenizer_names}
    return Components(family=family, info=info, denoiser=denoiser, vae=vae, text_encoders=text_encoders,
                      tokenizers=tokenizers, noise_scheduler=scheduler)


def build_components(model: str, device: torch.device, workdir: Path) -> Components:
    """The SD 1.5 (``sd15-random``) or SDXL 1.0 base (``sdxl-random``: 2.57B-parameter UNet, CLIP-L + OpenCLIP
    bigG with projection) architectures, random weights, built on ``device``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    xl = model == "sdxl-random"
    unet_cfg, vae_cfg = (SDXL_UNET, {**SD15_VAE, "scaling_factor": 0.13025}) if xl else (SD15_UNET, SD15_VAE)
    tokenizer = write_tokenizer(workdir / "tokenizer")
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device (much faster for the 0.9-2.6B-parameter UNets on a GPU)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_encoders = {"text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT, **ids))}
        if xl:
            text_encoders["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2, **ids))
    for module in (unet, vae, *text_encoders.values()):
        module.requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False)
    scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    family = StableDiffusionXLFamily() if xl else StableDiffusionFamily()
    info = BaseModelInfo(
        name_or_path=model, family=family.name, pipeline_class=family.pipeline_class_name, components={},
        vae_scale_factor=scale, loss_grid_factor=scale, resolution_multiple=scale,
        denoiser_downsample_factor=2 ** (len(unet_cfg["down_block_types"]) - 1), latent_channels=4,
        prediction_type="epsilon", vae_config=dict(vae.config),
    )
    tokenizers = dict.fromkeys(family.tokenizer_names, tokenizer)
    return Components(family=family, info=info, denoiser=unet, vae=vae, text_encoders=text_encoders,
                      tokenizers=tokenizers, noise_scheduler=scheduler)


def write_data(folder: Path, n: int, size: int) -> tuple[list[Path], list[Path]]:
    """``n`` photos (a bright ellipse on texture) with masks, at about 1.25x the training side."""
    rng = np.random.default_rng(0)
    h, w = int(size * 1.25), int(size * 1.5)
    yy, xx = np.mgrid[0:h, 0:w]
    images, masks = [], []
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cy, cx = h * (0.4 + 0.05 * i), w * (0.45 + 0.05 * i)
        mask = ((yy - cy) / (h * 0.25)) ** 2 + ((xx - cx) / (w * 0.2)) ** 2 <= 1
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        image[mask] = (230, 60, 40)
        Image.fromarray(image).save(folder / f"{i:02d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{i:02d}_mask.png")
        images.append(folder / f"{i:02d}.png")
        masks.append(folder / f"{i:02d}_mask.png")
    return images, masks


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)


def _mse_per_sample(pred, target, mask, background_weight=0.0, normalize="per_sample", reduction="mean"):
    """diffusers' loss: plain MSE, the mask ignored (the baseline the mask cost is measured against)."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    return per_sample if reduction == "none" else per_sample.mean()


def micro_costs(device: torch.device, latent_hw: tuple[int, int], batch: int, dataset_masked, dataset_vanilla,
                repeats: int = 200, channels: int = 4) -> dict[str, float]:
    """Isolated costs of what the mask adds: the loss (forward + backward) and the per-item data work."""
    from persam_dreambooth.training.losses import masked_diffusion_loss

    g = torch.Generator(device).manual_seed(0)
    pred = torch.randn(batch, channels, *latent_hw, generator=g, device=device, requires_grad=True)
    target = torch.randn(batch, channels, *latent_hw, generator=g, device=device)
    mask = (torch.rand(batch, 1, *latent_hw, generator=g, device=device) > 0.5).float()

    def timed(fn) -> float:
        for _ in range(10):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / repeats

    mse = timed(lambda: F.mse_loss(pred.float(), target.float()).backward())
    masked = timed(lambda: masked_diffusion_loss(pred, target, mask).backward())
    item_masked = timed(lambda: dataset_masked.instance_item(0, np.random.default_rng(0)))
    item_vanilla = timed(lambda: dataset_vanilla.instance_item(0, np.random.default_rng(0)))
    return {"loss_mse_us": mse * 1e6, "loss_masked_us": masked * 1e6,
            "item_vanilla_ms": item_vanilla * 1e3, "item_masked_ms": item_masked * 1e3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILY_BUILDERS), default="sd",
                        help="model family of the tiny pipeline (--model tiny)")
    parser.add_argument("--model", choices=("tiny", "sd15-random", "sdxl-random", "sd35m-random", "flux-dev-random"),
                        default="tiny")
    parser.add_argument("--layers", type=int, default=None,
                        help="sd35m-random / flux-dev-random: keep this many transformer blocks (plumbing on a CPU)")
    parser.add_argument("--offload", action="store_true",
                        help="move the frozen text encoders (and the VAE with cached latents) off the device after "
                        "use, as the trainer's --offload")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the rounds")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median step time is kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--variants", default="mse,vanilla,masked")
    parser.add_argument("--cache", choices=("both", "on", "off"), default="both")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    device = accelerator.device
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    workdir = Path(tempfile.mkdtemp(prefix="bench-train-step-"))
    wanted = {"sd15-random": "sd", "sdxl-random": "sdxl", "sd35m-random": "sd3", "flux-dev-random": "flux"}.get(
        args.model)
    if wanted is not None and args.family != wanted:
        parser.error(f"--model {args.model} is the {wanted} architecture: use it with --family {wanted}")
    t0 = time.perf_counter()
    fields = {"pretrained_model_name_or_path": args.model, "instance_data_dir": str(workdir), "output_dir": "-",
              "instance_prompt": "a photo of sks dog", "mask_source": "none", "resolution": args.resolution,
              "rank": args.rank, "gradient_checkpointing": args.gradient_checkpointing,
              "train_batch_size": args.batch_size, "learning_rate": 1e-5}
    if args.model == "tiny":
        fields, comps = build_family_components(args.family, workdir, fields)
    elif args.model in FLOW_VAE_FACTORS:
        comps = build_flow_components(args.model, device, workdir, args.layers, dtype)
    else:
        comps = build_components(args.model, device, workdir)
    build_s = time.perf_counter() - t0
    config = TrainConfig(**fields)
    trained = prepare_models(config, comps, device, dtype)
    optimizer = make_optimizer(config, trained.parameters(), config.learning_rate)
    denoiser, optimizer = accelerator.prepare(trained.denoiser, optimizer)
    images, masks = write_data(workdir / "data", n=4, size=args.resolution)
    latent_hw = (args.resolution // comps.info.loss_grid_factor,) * 2
    family = comps.family

    runs = {}
    for cached in {"both": (False, True), "on": (True,), "off": (False,)}[args.cache]:
        for variant in args.variants.split(","):
            data_config = config.replace(center_crop=True, mask_dilate_px=2 if variant == "masked" else 0)
            dataset = build_dataset(data_config, images, masks if variant == "masked" else None, None, latent_hw,
                                    seed=0, crop_conditioning=family.uses_crop_conditioning)
            if cached:
                dataset = cache_latents(dataset, family, comps.vae, args.batch_size, device, dtype)
            models = build_step_models(data_config.replace(cache_latents=cached), comps, trained, device)
            models.denoiser = denoiser
            runs[(variant, cached)] = (dataset, models)
    if args.offload:  # every variant's prompts are encoded now: the text encoders leave the device (--offload)
        for text_encoder in comps.text_encoders.values():
            text_encoder.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def one_step(variant: str, dataset, models, i: int) -> float:
        batch = collate_examples([dataset[(i * args.batch_size + j) % len(dataset)] for j in range(args.batch_size)])
        batch = {k: v.to(device) for k, v in batch.items()}
        original = step_module.masked_diffusion_loss
        if variant == "mse":
            step_module.masked_diffusion_loss = _mse_per_sample
        try:
            out = training_step(batch, models, config, torch.Generator(device).manual_seed(i))
        finally:
            step_module.masked_diffusion_loss = original
        accelerator.backward(out.loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[tuple[str, bool], list[float]] = {key: [] for key in runs}
    peaks: dict[tuple[str, bool], float] = {}
    finite: dict[tuple[str, bool], bool] = dict.fromkeys(runs, True)
    for key, (dataset, models) in runs.items():  # warm-up (allocator, kernels) and per-variant peak memory
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(args.warmup):
            finite[key] &= bool(np.isfinite(one_step(key[0], dataset, models, i)))
        sync()
        peaks[key] = _peak_mb(device)
    for _ in range(args.rounds):
        for key, (dataset, models) in runs.items():
            sync()
            start = time.perf_counter()
            for i in range(args.steps):
                # Data loading (mask resize/crop/area-average, or the cache lookup) is part of the step.
                finite[key] &= bool(np.isfinite(one_step(key[0], dataset, models, i)))
            sync()
            times[key].append((time.perf_counter() - start) / args.steps)

    results = []
    for key in runs:
        variant, cached = key
        sec = statistics.median(times[key])
        base = statistics.median(times[("mse", cached)]) if ("mse", cached) in times else None
        results.append({"variant": variant, "cached_latents": cached, "sec_per_step": sec,
                        "steps_per_sec": 1 / sec, "overhead_vs_mse_pct": None if base is None else
                        100 * (sec / base - 1), "peak_mem_mb": peaks[key], "finite_loss": finite[key]})
    header = {"family": family.name, "model": args.model, "resolution": args.resolution, "batch_size": args.batch_size,
              "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
              "mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
              "rank": args.rank, "steps": args.steps, "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
              "layers": args.layers, "offload": args.offload,
              "build_seconds": round(build_s, 1),
              "trainable_params": sum(p.numel() for p in trained.parameters())}
    uncached = {variant: dataset for (variant, cached), (dataset, _) in runs.items() if not cached}
    micro = {}
    if "masked" in uncached and "vanilla" in uncached:
        micro = micro_costs(device, latent_hw, args.batch_size, uncached["masked"], uncached["vanilla"],
                            channels=comps.info.latent_channels)
        added_s = (micro["loss_masked_us"] - micro["loss_mse_us"]) * 1e-6 + \
            args.batch_size * (micro["item_masked_ms"] - micro["item_vanilla_ms"]) * 1e-3
        step_s = min(r["sec_per_step"] for r in results)
        micro["mask_cost_pct_of_fastest_step"] = 100 * added_s / step_s
    header["micro"] = {k: round(v, 3) for k, v in micro.items()}
    print(json.dumps(header))  # noqa: T201 - benchmark output
    print(f"{'variant':8} {'cached':6} {'s/step':>9} {'steps/s':>8} {'vs mse':>8} {'peak MB':>9} finite")  # noqa: T201
    for r in results:
        over = "" if r["overhead_vs_mse_pct"] is None else f"{r['overhead_vs_mse_pct']:+7.2f}%"
        print(f"{r['variant']:8} {str(r['cached_latents']):6} {r['sec_per_step']:9.4f} {r['steps_per_sec']:8.2f} "  # noqa: T201
              f"{over:>8} {r['peak_mem_mb']:9.0f} {r['finite_loss']}")
    if args.json:
        atomic_write_json(args.json, {"setup": header, "results": results})
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
