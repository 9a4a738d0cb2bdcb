"""The leakage experiment: DreamBooth on the toy world's subject, vanilla vs masked (exact and degraded masks).

Every run goes through the product as users run it: ``persam-dreambooth train`` (or ``accelerate launch
train_scripts/train_dreambooth.py``, same flags) to train and ``persam-dreambooth generate`` to sample, both in
subprocesses. Steps are resumable: a finished run (weights present) or generated image is not redone.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import world
from .base_model import BaseConfig, base_model, to_tensor
from .detector import DetectorConfig, detect, load_detector
from .scoring import reference_hist, score_images

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "train_scripts" / "train_dreambooth.py"
# exact_bgw: exact masks with --mask_background_weight bg_weight (a weak background loss instead of none)
VARIANTS = ("vanilla", "exact", "dilated", "eroded", "partial", "exact_bgw")
MASK_SETS = ("exact", "dilated", "eroded", "partial")
INSTANCE_PROMPT = f"a {world.SUBJECT_TOKEN} {world.SUBJECT_SHAPE}"


@dataclass
class ExperimentConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = VARIANTS
    n_instance: int = 5
    # full fine-tuning of the UNet: LoRA (rank 8, lr 1e-3, 400 steps) and full at lr 2e-4 barely moved the model
    # (see README, "variants tried")
    train_mode: str = "full"
    train_steps: int = 600
    train_batch: int = 1
    learning_rate: float = 5e-4
    rank: int = 8
    # attention and ResNet convolutions: the tiny UNet has attention only at 8x8 and 4x4, so attention-only LoRA
    # could not reach the 16x16 level where the subject's texture lives
    lora_targets: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0", "conv1", "conv2")
    num_images: int = 16  # per prompt
    inference_steps: int = 25
    guidance_scale: float = 5.0
    base_prompt_images: int = 4  # per world prompt, for the base model's prompt accuracy (0 = skip)
    dilate_px: int = 3
    erode_px: int = 2
    bg_weight: float = 0.1  # --mask_background_weight of the exact_bgw arm
    partial_drop: float = 0.4  # fraction of the mask's bounding box height/width cut away (a corner block)
    threads: int = 1
    # "cli": `persam-dreambooth train` (one process, as a one-device user runs it); "accelerate": `accelerate launch
    # train_scripts/train_dreambooth.py` (a launcher process plus the script, the multi-device path)
    launcher: str = "cli"
    base: BaseConfig = field(default_factory=BaseConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)


# --------------------------------------------------------------------------------------------------- instance data
def _morph(mask: np.ndarray, px: int, grow: bool) -> np.ndarray:
    """Binary dilation (``grow``) or erosion by ``px`` pixels with a 3x3 square, ``(H, W)`` bool."""
    m = mask.copy()
    for _ in range(px):
        p = np.pad(m, 1, constant_values=not grow)
        stack = [p[1 + dy:1 + dy + m.shape[0], 1 + dx:1 + dx + m.shape[1]] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        m = np.any(stack, axis=0) if grow else np.all(stack, axis=0)
    return m


def degrade(mask: np.ndarray, variant: str, cfg: ExperimentConfig, rng: np.random.Generator) -> np.ndarray:
    """The mask a segmenter might return: ``exact``, ``dilated``, ``eroded`` or ``partial`` (a corner block of the
    object's box missing, the corner drawn at random)."""
    if variant == "exact":
        return mask
    if variant == "dilated":
        return _morph(mask, cfg.dilate_px, grow=True)
    if variant == "eroded":
        return _morph(mask, cfg.erode_px, grow=False)
    if variant == "partial":
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        cut = np.zeros_like(mask)
        h, w = int(round((y1 - y0) * (1 - cfg.partial_drop))), int(round((x1 - x0) * (1 - cfg.partial_drop)))
        top, left = rng.integers(2, size=2)
        cut[(slice(y0, y1 - h) if top else slice(y0 + h, y1)), (slice(x0, x1 - w) if left else slice(x0 + w, x1))] = 1
        return mask & ~cut
    raise ValueError(f"mask variant must be one of {MASK_SETS}, got {variant!r}")


def write_instance_data(folder: Path, cfg: ExperimentConfig) -> list[world.Sample]:
    """``folder/instance/NN.png`` (the subject on its training background) and ``folder/masks_<variant>/NN.png``."""
    samples = world.subject_samples(cfg.n_instance)
    (folder / "instance").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for variant in MASK_SETS:
        (folder / f"masks_{variant}").mkdir(exist_ok=True)
    for i, s in enumerate(samples):
        Image.fromarray(s.image).save(folder / "instance" / f"{i:02d}.png")
        for variant in MASK_SETS:
            m = degrade(s.mask, variant, cfg, rng)
            Image.fromarray(m.astype(np.uint8) * 255).save(folder / f"masks_{variant}" / f"{i:02d}.png")
    return samples


def eval_prompts() -> list[str]:
    """The subject on every background other than its training one."""
    return [f"{INSTANCE_PROMPT} on {bg}" for bg in world.BACKGROUNDS if bg != world.SUBJECT_BACKGROUND]


# ------------------------------------------------------------------------------------------------- subprocesses
def _env(cfg: ExperimentConfig) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    return env


def _run(cmd: list[str], cfg: ExperimentConfig, log: Path) -> float:
    """Run ``cmd``, output to ``log``; returns wall seconds; raises with the log's tail on failure."""
    t0 = time.time()
    with log.open("w") as fh:
        rc = subprocess.run(cmd, env=_env(cfg), stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"command failed (rc={rc}): {' '.join(cmd)}\n--- {log} ---\n{tail}")
    return time.time() - t0


def train_command(base: Path, data: Path, variant: str, seed: int, out: Path, cfg: ExperimentConfig) -> list[str]:
    if cfg.launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN_SCRIPT)]
    elif cfg.launcher == "cli":
        cmd = ["persam-dreambooth", "train"]
    else:
        raise ValueError(f"launcher must be 'accelerate' or 'cli', got {cfg.launcher!r}")
    cmd += ["--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(data / "instance"),
           "--instance_prompt", INSTANCE_PROMPT, "--output_dir", str(out), "--seed", str(seed),
           "--resolution", str(world.SIZE), "--train_mode", cfg.train_mode,
           "--train_batch_size", str(cfg.train_batch), "--max_train_steps", str(cfg.train_steps),
           "--learning_rate", str(cfg.learning_rate), "--report_to", "none", "--checkpointing_steps", str(10 ** 6)]
    if cfg.train_mode == "lora":
        cmd += ["--rank", str(cfg.rank), "--lora_target_modules", *cfg.lora_targets]
    if variant == "vanilla":
        cmd += ["--mask_source", "none"]
    elif variant == "exact_bgw":
        cmd += ["--mask_dir", str(data / "masks_exact"), "--mask_background_weight", str(cfg.bg_weight)]
    else:
        cmd += ["--mask_dir", str(data / f"masks_{variant}")]
    return cmd


def generate_command(base: Path, run: Path | None, prompts_file: Path, out: Path, num_images: int,
                     cfg: ExperimentConfig) -> list[str]:
    cmd = ["persam-dreambooth", "generate", "--prompts-file", str(prompts_file), "--num-images", str(num_images),
           "--seed", "1000", "--num-inference-steps", str(cfg.inference_steps), "--guidance-scale",
           str(cfg.guidance_scale), "--batch-size", "16", "--device", "cpu", "--output-dir", str(out)]
    if run is None:
        cmd += ["--pretrained_model_name_or_path", str(base)]
    elif cfg.train_mode == "lora":
        cmd += ["--lora", str(run)]
    else:
        cmd += ["--model", str(run)]
    return cmd


def load_generations(folder: Path) -> tuple[np.ndarray, list[str]]:
    """The images of a ``generate`` output folder ``(N, H, W, 3) uint8`` and their prompts, in record order."""
    recs = [json.loads(ln) for ln in (folder / "generation.jsonl").read_text().splitlines() if ln.strip()]
    recs.sort(key=lambda r: (r["prompt_index"], r["image_index"]))
    images = np.stack([np.asarray(Image.open(folder / r["file"]).convert("RGB")) for r in recs])
    return images, [r["prompt"] for r in recs]


def _done(run: Path) -> bool:
    return (run / "pytorch_lora_weights.safetensors").is_file() or (run / "model_index.json").is_file()


# --------------------------------------------------------------------------------------------------------- steps
def base_prompt_accuracy(base: Path, detector, out: Path, cfg: ExperimentConfig) -> dict:
    """Generate every world prompt ("a red circle on sky", 64 of them) with the base model and read them back."""
    prompts = [f"a {c} {s} on {b}" for s in world.SHAPES for c in world.COLORS for b in world.BACKGROUNDS]
    pf = out / "world_prompts.txt"
    pf.write_text("\n".join(prompts) + "\n")
    wall = _run(generate_command(base, None, pf, out / "gen_base_world", cfg.base_prompt_images, cfg), cfg,
                out / "logs" / "gen_base_world.log")
    images, used = load_generations(out / "gen_base_world")
    det = detect(detector, images)
    want = {"shape": [world.SHAPES.index(p.split()[2]) for p in used],
            "color": [list(world.COLORS).index(p.split()[1]) for p in used],
            "background": [world.BACKGROUNDS.index(p.split()[4]) for p in used]}
    ok = {k: det[k] == np.array(v) for k, v in want.items()}
    res = {f"acc_{k}": float(v.mean()) for k, v in ok.items()}
    res["acc_all_three"] = float((ok["shape"] & ok["color"] & ok["background"]).mean())
    res.update(n=len(images), chance_shape=1 / len(world.SHAPES), chance_color=1 / len(world.COLORS),
               chance_background=1 / len(world.BACKGROUNDS), wall_s=wall)
    return res


def detector_on_reconstructions(base: Path, detector, n: int = 512) -> dict:
    """The detector's accuracy on world images passed through the base model's VAE (the decoder's look)."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(base / "vae").eval()
    samples = world.world_samples(n, seed=4242)
    with torch.no_grad():
        rec = vae.decode(vae.encode(to_tensor([s.image for s in samples])).latent_dist.mean).sample
    images = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    det = detect(detector, images)
    return {"recon_acc_shape": float(np.mean(det["shape"] == [world.SHAPES.index(s.shape) for s in samples])),
            "recon_acc_color": float(np.mean(det["color"] == [list(world.COLORS).index(s.color) for s in samples])),
            "recon_acc_background": float(np.mean(det["background"] == [world.BACKGROUNDS.index(s.background)
                                                                         for s in samples]))}


def run_experiment(out: Path, cfg: ExperimentConfig) -> dict:
    """Base model, detector, instance data, every (variant, seed) run, generation and scores -> ``results.json``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    t0 = time.time()
    base = base_model(cfg.base)
    base_info = json.loads((base / "toy_world_base.json").read_text())
    detector, det_info = load_detector(cfg.detector)
    det_info = {**det_info, **detector_on_reconstructions(base, detector)}
    data = out / "data"
    samples = write_instance_data(data, cfg)
    ref = reference_hist(samples)
    pf = out / "eval_prompts.txt"
    pf.write_text("\n".join(eval_prompts()) + "\n")
    results: dict = {"config": asdict(cfg), "base_model": {"folder": str(base), **base_info}, "detector": det_info}
    if cfg.base_prompt_images > 0:
        results["base_prompt_accuracy"] = base_prompt_accuracy(base, detector, out, cfg)
    train_images = np.stack([s.image for s in samples])
    results["known_cases"] = {
        "training_images": score_images(detector, np.repeat(train_images, 3, 0),
                                        eval_prompts() * len(samples), ref).summary(),
        "clean_renders": _clean_render_scores(detector, ref),
    }
    wall = {"base_generate": _run(generate_command(base, None, pf, out / "gen" / "base", cfg.num_images, cfg), cfg,
                                  out / "logs" / "gen_base.log")}
    images, prompts = load_generations(out / "gen" / "base")
    results["runs"] = {"base": {"-": score_images(detector, images, prompts, ref).summary()}}
    for variant in cfg.variants:
        results["runs"][variant] = {}
    # vanilla and exact masks first, seed by seed, then the degraded masks: a cut-short run has the main contrast
    order = sorted(((v, s) for v in cfg.variants for s in cfg.seeds),
                   key=lambda vs: (vs[0] not in ("vanilla", "exact"), cfg.seeds.index(vs[1]), VARIANTS.index(vs[0])))
    for variant, seed in order:
        name = f"{variant}-s{seed}"
        run = out / "runs" / name
        if not _done(run):
            wall[f"train {name}"] = _run(train_command(base, data, variant, seed, run, cfg), cfg,
                                         out / "logs" / f"train_{name}.log")
        wall[f"generate {name}"] = _run(generate_command(base, run, pf, out / "gen" / name, cfg.num_images, cfg),
                                        cfg, out / "logs" / f"gen_{name}.log")
        images, prompts = load_generations(out / "gen" / name)
        results["runs"][variant][str(seed)] = score_images(detector, images, prompts, ref).summary()
        logger.info("%s: %s", name, results["runs"][variant][str(seed)])
        (out / "results.json").write_text(json.dumps({**results, "wall_s": wall}, indent=2))
    results["wall_s"] = {**wall, "total": time.time() - t0}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _clean_render_scores(detector, ref: np.ndarray, per_bg: int = 8) -> dict:
    """The subject rendered exactly on each other background: what an ideal model would generate."""
    rng = np.random.default_rng(77)
    prompts, images = [], []
    for p in eval_prompts():
        bg = p.split()[-1]
        for _ in range(per_bg):
            images.append(world.render(world.SUBJECT_SHAPE, "subject", bg, rng).image)
            prompts.append(p)
    return score_images(detector, np.stack(images), prompts, ref).summary()


def rescore(out: Path, cfg: ExperimentConfig) -> dict:
    """Score every generation folder ``out/gen/<variant>-s<seed>`` again (no training, no generation) and update
    ``results.json``; for re-reading a finished or cut-short experiment with a changed scorer."""
    results = json.loads((out / "results.json").read_text())
    detector, _ = load_detector(cfg.detector)
    ref = reference_hist(world.subject_samples(cfg.n_instance))
    runs: dict = {"base": {"-": score_images(detector, *load_generations(out / "gen" / "base"), ref).summary()}}
    for variant in VARIANTS:
        for seed in cfg.seeds:
            folder = out / "gen" / f"{variant}-s{seed}"
            if (folder / "generation.jsonl").is_file():
                runs.setdefault(variant, {})[str(seed)] = score_images(detector, *load_generations(folder),
                                                                       ref).summary()
    results["runs"] = runs
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
