#!/usr/bin/env bash
# GPU check of the masked DreamBooth trainer (issue 4), offline, no weights needed:
#   1. benchmarks/train_step.py: the SD 1.5 UNet / VAE / CLIP-L architectures with random weights, 512 px, batch 1,
#      fp16, gradient checkpointing, LoRA rank 4: seconds/step and peak memory for plain MSE vs vanilla vs masked,
#      with and without cached latents (the mask must cost < 2 %);
#   2. benchmarks/trainer_smoke.py: the whole train(config) on the same random SD 1.5 saved as a diffusers folder
#      (fp16, checkpoints, validation, resume), with its peak memory (target for LoRA: < 8 GB).
# Usage: bash benchmarks/gpu_train_check.sh [OUT_DIR]   (PYTHON=... to pick the interpreter; ~4-6 min on an H100)
# Plumbing check on a CPU (tiny model): MODEL=tiny RES=32 DEVICE=cpu PRECISION=no bash benchmarks/gpu_train_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/out}}"
PY="${PYTHON:-python}"
MODEL="${MODEL:-sd15-random}"
RES="${RES:-512}"
DEVICE="${DEVICE:-cuda}"
PRECISION="${PRECISION:-fp16}"
STEPS="${STEPS:-20}"
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'PYCHECK'
import importlib.util, sys
missing = [m for m in ("torch", "diffusers", "transformers", "accelerate", "peft", "segment_anything", "tensorboard")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages: {missing}; run `pip install -e .` first")
import os, torch
if os.environ.get("DEVICE", "cuda").startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible to torch")
    print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__)
PYCHECK
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

export DEVICE
echo "== 1. step benchmark: $MODEL, random weights, $RES px, bs 1, $PRECISION, grad ckpt, LoRA r4 ($DEVICE)"
"$PY" benchmarks/train_step.py --model "$MODEL" --resolution "$RES" --batch_size 1 --device "$DEVICE" \
  --mixed_precision "$PRECISION" --gradient_checkpointing --steps "$STEPS" --warmup 3 --rounds 3 \
  --json "$OUT_DIR/train_step.json" 2>&1 | grep -v "^\s*$" | tee "$OUT_DIR/train_step.log"

echo "== 2. end-to-end trainer on a saved random $MODEL folder ($PRECISION, $STEPS steps, checkpoint, validation, resume)"
"$PY" benchmarks/trainer_smoke.py --model "$MODEL" --resolution "$RES" --device "$DEVICE" \
  --mixed_precision "$PRECISION" --steps "$STEPS" --workdir "$(mktemp -d)" \
  --json "$OUT_DIR/trainer_smoke.json" 2>&1 | tail -n 25 | tee "$OUT_DIR/trainer_smoke.log"

"$PY" - "$OUT_DIR" <<'PYSUM'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
step = json.loads((out / "train_step.json").read_text())
smoke = json.loads((out / "trainer_smoke.json").read_text())
rows = step["results"]
peak = max([r["peak_mem_mb"] for r in rows] + [smoke["peak_gpu_mem_mb"] or 0])
by = {(r["variant"], r["cached_latents"]): r for r in rows}
for cached in (False, True):
    for base in ("mse", "vanilla"):
        if ("masked", cached) in by and (base, cached) in by:
            cost = 100 * (by[("masked", cached)]["sec_per_step"] / by[(base, cached)]["sec_per_step"] - 1)
            print(f"masked vs {base:7} (cached latents={cached}): {cost:+.2f} % step time  (target < 2 %)")
print(f"micro: {step['setup'].get('micro')}")
print(f"peak memory ({step['setup']['device']}, {step['setup']['resolution']} px, {step['setup']['mixed_precision']}): "
      f"{peak:.0f} MB  (target for SD 1.5 LoRA at 512 px fp16 on a GPU: < 8192 MB): {'PASS' if peak < 8192 else 'FAIL'}")
print(f"finite losses: {all(r['finite_loss'] for r in rows)}")
sys.exit(0 if peak < 8192 else 1)
PYSUM
