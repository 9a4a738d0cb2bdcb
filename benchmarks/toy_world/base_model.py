"""The toy world's base text-to-image model, trained from scratch on CPU and saved as a diffusers pipeline folder.

Real classes throughout: ``AutoencoderKL`` (trained first, on world images), ``CLIPTextModel`` with a CLIP BPE
tokenizer whose vocabulary holds every world word as one token, and ``UNet2DConditionModel`` trained jointly with
the text encoder on cached VAE latents. The folder is cached under
``$PERSAM_DREAMBOOTH_CACHE/toy_world/<hash>/`` (default ``~/.cache/persam_dreambooth``), the hash covering the
generator's source and the config, so it is trained once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import world

logger = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
TRAINING_VERSION = 1  # bump when the training code below changes what it produces


@dataclass(frozen=True)
class BaseConfig:
    n_images: int = 4000
    world_seed: int = 0
    vae_channels: tuple[int, ...] = (16, 32)
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_lr: float = 2e-3
    unet_channels: tuple[int, ...] = (32, 64, 64)
    text_dim: int = 64
    text_layers: int = 2
    unet_steps: int = 2000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    snr_gamma: float = 5.0
    seed: int = 0


def cache_root() -> Path:
    return Path(os.environ.get("PERSAM_DREAMBOOTH_CACHE", Path.home() / ".cache" / "persam_dreambooth")) / "toy_world"


def config_hash(config: BaseConfig) -> str:
    """Hash of the world generator's source, the config and ``TRAINING_VERSION``: a change to any retrains."""
    h = hashlib.sha256(json.dumps({**asdict(config), "version": TRAINING_VERSION}, sort_keys=True).encode())
    h.update((HERE / "world.py").read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------ tokenizer
def write_world_tokenizer(folder: Path, max_length: int = 16):
    """A CLIP BPE tokenizer in which every world word is one token (merge chains built left to right)."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *[c + "</w>" for c in chars]]
    merges: list[tuple[str, str]] = []
    for word in world.WORDS:  # add merges until BPE (lowest rank first) makes the word one token
        while len(pieces := _bpe([*word[:-1], word[-1] + "</w>"], merges)) > 1:
            merges.append((pieces[0], pieces[1]))
            tokens.append(pieces[0] + pieces[1])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                       encoding="utf-8")
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)
    for word in world.WORDS:
        ids = tok(word).input_ids
        assert len(ids) == 3 and tok.unk_token_id not in ids[1:-1], f"world word {word!r} is not one token: {ids}"
    return tok


def _bpe(pieces: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair merging as CLIP's tokenizer does it: repeatedly join the adjacent pair of lowest merge rank."""
    rank = {pair: i for i, pair in enumerate(merges)}
    while len(pieces) > 1:
        pairs = [(rank.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:], strict=False))]
        best, i = min(pairs)
        if best == math.inf:
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2:]]
    return pieces


# --------------------------------------------------------------------------------------------------------- models
def build_models(config: BaseConfig, tokenizer):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(config.seed)
    n = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=config.vae_channels, layers_per_block=1,
        norm_num_groups=8, sample_size=world.SIZE, mid_block_add_attention=False,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_dim, intermediate_size=config.text_dim * 2,
        num_hidden_layers=config.text_layers, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    m = len(config.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=world.SIZE // 2 ** (n - 1), in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=config.unet_channels, norm_num_groups=8, attention_head_dim=8,
        cross_attention_dim=config.text_dim,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (m - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (m - 1) + ("UpBlock2D",),
    )
    return vae, text_encoder, unet


def schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler

    train = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", clip_sample=False)
    infer = DDIMScheduler.from_config(train.config, set_alpha_to_one=False, steps_offset=1)
    return train, infer


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """``[(H, W, 3) uint8]`` -> ``(B, 3, H, W)`` float in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------------- training
def train_vae(vae, pixels: torch.Tensor, config: BaseConfig) -> list[float]:
    """MSE + 1e-6 KL on random world batches. ``pixels``: (N, 3, H, W) in [-1, 1]."""
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.vae_lr, total_steps=config.vae_steps, pct_start=0.05)
    vae.train()
    losses = []
    for _ in tqdm(range(config.vae_steps), desc="vae", mininterval=10):
        x = pixels[torch.randint(len(pixels), (config.vae_batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=None)).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    vae.eval()
    return losses


def train_unet(unet, text_encoder, tokenizer, latents: torch.Tensor, captions: list[str], config: BaseConfig):
    """Epsilon prediction with min-SNR weighting; the text encoder is trained jointly.

    ``latents``: (N, 4, h, w), already multiplied by the VAE's scaling factor; ``captions[i]`` for latent i.
    """
    train_sched, _ = schedulers()
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids  # (N, L)
    alphas = train_sched.alphas_cumprod  # (T,)
    snr = alphas / (1 - alphas)
    gen = torch.Generator().manual_seed(config.seed + 1)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.unet_lr, total_steps=config.unet_steps, pct_start=0.05)
    unet.train()
    text_encoder.train()
    losses = []
    for _ in tqdm(range(config.unet_steps), desc="unet", mininterval=10):
        idx = torch.randint(len(latents), (config.unet_batch,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, train_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        xt = train_sched.add_noise(x0, noise, t)
        cond = text_encoder(ids[idx])[0]  # (B, L, D)
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        weight = torch.clamp(snr[t], max=config.snr_gamma) / snr[t]  # min-SNR-gamma for epsilon prediction
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    unet.eval()
    text_encoder.eval()
    return losses


def train_base_model(folder: Path, config: BaseConfig) -> dict:
    """Train the VAE, then UNet + text encoder, and ``save_pretrained`` a StableDiffusionPipeline into ``folder``."""
    from diffusers import StableDiffusionPipeline

    t0, c0 = time.time(), time.process_time()
    torch.manual_seed(config.seed)
    samples = world.world_samples(config.n_images, seed=config.world_seed)
    rng = np.random.default_rng(config.seed)
    captions = [world.world_caption(s, rng) for s in samples]
    pixels = to_tensor([s.image for s in samples])  # (N, 3, 32, 32)
    tok_dir = folder.parent / (folder.name + ".tok")
    tokenizer = write_world_tokenizer(tok_dir)
    vae, text_encoder, unet = build_models(config, tokenizer)
    stage = folder / "vae_stage.json"  # the VAE of an interrupted run is reused
    if stage.is_file():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
        vae_record = json.loads(stage.read_text(encoding="utf-8"))
    else:
        vae_losses = train_vae(vae, pixels, config)
        vae_record = {"vae_loss_last100": float(np.mean(vae_losses[-100:])), "wall_s_vae": time.time() - t0,
                      "cpu_s_vae": time.process_time() - c0}
        vae.save_pretrained(folder / "vae")
        stage.write_text(json.dumps(vae_record), encoding="utf-8")
    t_vae = vae_record["wall_s_vae"]
    with torch.no_grad():
        mean = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
        rec = torch.cat([vae.decode(mean[i:i + 256]).sample for i in range(0, len(mean), 256)])
    vae_psnr = float(10 * torch.log10(4.0 / F.mse_loss(rec.clamp(-1, 1), pixels)))
    scale = float(1.0 / mean.std())
    logger.info("VAE trained in %.0f s: PSNR %.1f dB, latent std %.3f", t_vae, vae_psnr, 1 / scale)
    vae.register_to_config(scaling_factor=scale)
    unet_losses = train_unet(unet, text_encoder, tokenizer, mean * scale, captions, config)
    _, infer = schedulers()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=infer, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    shutil.rmtree(tok_dir, ignore_errors=True)
    stage.unlink()
    info = {
        "config": asdict(config), "vae_psnr_db": vae_psnr, "vae_scaling_factor": scale,
        **vae_record, "unet_loss_last100": float(np.mean(unet_losses[-100:])),
        "wall_s_this_process": time.time() - t0, "cpu_s_this_process": time.process_time() - c0,
        "torch_threads": torch.get_num_threads(),
        "params": {"vae": sum(p.numel() for p in vae.parameters()),
                   "unet": sum(p.numel() for p in unet.parameters()),
                   "text_encoder": sum(p.numel() for p in text_encoder.parameters())},
    }
    (folder / "toy_world_base.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return info


def base_model(config: BaseConfig = BaseConfig(), root: Path | None = None) -> Path:
    """The cached base pipeline folder for ``config``, trained on first use."""
    folder = (root or cache_root()) / f"base-{config_hash(config)}"
    if (folder / "toy_world_base.json").is_file():
        return folder
    tmp = folder.parent / (folder.name + ".partial")  # kept on failure: its trained VAE is reused
    tmp.mkdir(parents=True, exist_ok=True)
    info = train_base_model(tmp, config)
    logger.info("base model trained in %.0f s (VAE PSNR %.1f dB)", info["wall_s_this_process"], info["vae_psnr_db"])
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def steps_per_second(config: BaseConfig, steps: int = 5) -> dict:
    """Time a few VAE and UNet steps (for sizing the config to the CPU budget)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok = write_world_tokenizer(Path(d))
    vae, te, unet = build_models(config, tok)
    px = to_tensor([s.image for s in world.world_samples(64)])
    small = BaseConfig(**{**asdict(config), "vae_steps": steps, "unet_steps": steps})
    t = time.time()
    train_vae(vae, px, small)
    t_vae = (time.time() - t) / steps
    with torch.no_grad():
        lat = vae.encode(px).latent_dist.mean
    t = time.time()
    train_unet(unet, te, tok, lat, ["a red square on dots"] * len(lat), small)
    t_unet = (time.time() - t) / steps
    return {"vae_s_per_step": t_vae, "unet_s_per_step": t_unet, "latent_shape": list(lat.shape[1:]),
            "params_unet": sum(p.numel() for p in unet.parameters()), "est_total_s": math.ceil(
                t_vae * config.vae_steps + t_unet * config.unet_steps)}
