"""End-to-end ``train(config)`` on a random-weight model saved as a diffusers folder (no download), then a resume.

It exercises what the CPU tests cannot: fp16 mixed precision with fp32 LoRA parameters, gradient checkpointing,
SDPA on the GPU, checkpoint save / load on the device, validation under autocast. It reports wall time, steps/s
and peak GPU memory of the training part. Examples::

    python benchmarks/trainer_smoke.py --model tiny --resolution 32 --device cpu --mixed_precision no
    python benchmarks/trainer_smoke.py --model sd15-random --resolution 512 --mixed_precision fp16 --steps 20
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from train_step import FAMILY_BUILDERS, build_components, write_data  # noqa: E402

from persam_dreambooth.training import TrainConfig, train  # noqa: E402
from persam_dreambooth.utils.io import atomic_write_json  # noqa: E402


def save_pipeline(model: str, folder: Path, family: str = "sd") -> tuple[Path, dict]:
    """The model folder and its extra TrainConfig fields: the tiny pipeline of ``family``, or the random SD 1.5
    components built on the CPU and saved as a StableDiffusionPipeline folder."""
    from importlib import import_module

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if model == "tiny":
        target, extra = FAMILY_BUILDERS[family]
        module, _, name = target.partition(":")
        return getattr(import_module(module), name)(folder / "model"), extra
    comps = build_components(model, torch.device("cpu"), folder / "build")
    pipe = StableDiffusionPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        scheduler=DDIMScheduler.from_config(comps.noise_scheduler.config, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "model")
    return folder / "model", {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILY_BUILDERS), default="sd",
                        help="model family of the tiny pipeline (--model tiny)")
    parser.add_argument("--model", choices=("tiny", "sd15-random"), default="tiny")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--workdir", default=None, help="keep the model and outputs here (default: a temp folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="trainer-smoke-"))
    t0 = time.perf_counter()
    model_dir, extra = save_pipeline(args.model, work, args.family)
    images, masks = write_data(work / "data", n=4, size=args.resolution)
    (work / "masks").mkdir(exist_ok=True)
    for image, mask in zip(images, masks, strict=True):
        (work / "masks" / f"{image.stem}.png").write_bytes(mask.read_bytes())
        mask.unlink()
    build_s = time.perf_counter() - t0

    common = dict(  # noqa: C408 - reads like the YAML config
        pretrained_model_name_or_path=str(model_dir), instance_data_dir=str(work / "data"),
        mask_dir=str(work / "masks"), instance_prompt="a photo of sks dog", output_dir=str(work / "out"),
        resolution=args.resolution, train_batch_size=1, mixed_precision=args.mixed_precision,
        gradient_checkpointing=True, random_flip=True, checkpointing_steps=max(args.steps // 2, 1),
        checkpoints_total_limit=1, validation_prompt="a photo of sks dog", validation_steps=args.steps,
        num_validation_images=1, validation_inference_steps=2, report_to="tensorboard", seed=0,
        snr_gamma=5.0 if args.family in ("sd", "sdxl") else None, **extra,
    )
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = train(TrainConfig(**common, max_train_steps=args.steps))
    train_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    start = time.perf_counter()
    train(TrainConfig(**common, max_train_steps=args.steps + 2, resume_from_checkpoint="latest"))
    resume_s = time.perf_counter() - start
    result = {
        "family": args.family, "model": args.model, "resolution": args.resolution,
        "mixed_precision": args.mixed_precision,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "build_and_save_s": round(build_s, 1),
        "train_s_incl_setup_and_validation": round(train_s, 1), "steps": args.steps,
        "resume_2_more_steps_s": round(resume_s, 1), "peak_gpu_mem_mb": None if peak is None else round(peak),
        "outputs": sorted(p.name for p in Path(out).iterdir()),
    }
    print(json.dumps(result, indent=2))  # noqa: T201 - benchmark output
    if args.json:
        atomic_write_json(args.json, result)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
