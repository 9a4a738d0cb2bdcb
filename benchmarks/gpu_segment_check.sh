#!/usr/bin/env bash
# GPU check of segmentation (issues 2 and 3), offline, no weights needed (random SAM weights from segment_anything's
# builders):
#   1. benchmarks/segment_speed.py: PerSAM.segment vs plain SAM (SamPredictor) on the same model and photos;
#   2. benchmarks/segment_album.py: album images/second: one at a time fp32, batched fp32 and bf16, cache cold/warm;
#   3. benchmarks/persam_f_fit.py (if present): PerSAM-F reference fit end to end (autograd fit vs the fused one in git);
#   4. the real command line under `accelerate launch` (1 process): batch 8, bf16, a cache, then a second reference
#      on the same photos (warm cache: no encoder call), then a rerun (resume: nothing to do).
# Usage: bash benchmarks/gpu_segment_check.sh [OUT_DIR]    (PYTHON=... picks the interpreter; ~3-5 min on an H100)
# Plumbing check on a CPU (tiny SAM, small sizes): DEVICE=cpu MODEL=tiny bash benchmarks/gpu_segment_check.sh /tmp/o
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/out}}"
PY="${PYTHON:-python}"
MODEL="${MODEL:-vit_h}"
DEVICE="${DEVICE:-cuda}"
if [[ "$MODEL" == "tiny" ]]; then SIZE="${SIZE:-128}"; NUM="${NUM_IMAGES:-12}"; else SIZE="${SIZE:-1024}"; NUM="${NUM_IMAGES:-32}"; fi
BS="${BATCH_SIZE:-8}"
THREADS=()
if [[ "$DEVICE" == "cpu" ]]; then THREADS=(--threads 1); fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PERSAM_DREAMBOOTH_CACHE="$WORK/pkg-cache" DEVICE

"$PY" - <<'PYCHECK'
import importlib.util, os, sys
missing = [m for m in ("torch", "accelerate", "segment_anything", "safetensors") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages: {missing}; run `pip install -e .` first")
import torch
if os.environ.get("DEVICE", "cuda").startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible to torch")
    print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__)
PYCHECK
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

echo "== 1. PerSAM vs plain SAM: $MODEL, random weights, $DEVICE"
timeout 240 "$PY" benchmarks/segment_speed.py --model "$MODEL" --device "$DEVICE" --images "$WORK/no-such-folder" \
  --synthetic-size "$SIZE" --num-images 3 --repeats 3 --decode-repeats 10 "${THREADS[@]}" 2>&1 \
  | tee "$OUT_DIR/segment_speed.log"

echo "== 2. album throughput: $MODEL, $NUM photos ${SIZE}px, batch $BS, float32 + bfloat16, cache ($DEVICE)"
timeout 300 "$PY" benchmarks/segment_album.py --model "$MODEL" --device "$DEVICE" --num-images "$NUM" --size "$SIZE" \
  --batch-size "$BS" --dtypes float32 bfloat16 --json "$OUT_DIR/segment_album.json" "${THREADS[@]}" 2>&1 \
  | tee "$OUT_DIR/segment_album.log"

if [[ -f benchmarks/persam_f_fit.py ]]; then
  echo "== 3. PerSAM-F fit: $MODEL ($DEVICE)"
  timeout 240 "$PY" benchmarks/persam_f_fit.py --model "$MODEL" --device "$DEVICE" "${THREADS[@]}" 2>&1 \
    | tee "$OUT_DIR/persam_f_fit.log" || echo "persam_f_fit.py failed (exit $?)" | tee -a "$OUT_DIR/persam_f_fit.log"
else
  echo "== 3. benchmarks/persam_f_fit.py not present: skipped"
fi

echo "== 4. persam-dreambooth segment under accelerate launch: $MODEL random checkpoint, batch $BS, bf16, cache"
"$PY" - "$WORK" "$MODEL" "$SIZE" <<'PYDATA'
import sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
from persam_dreambooth import testing as tiny
work, model, size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
h, w = size * 3 // 4, size
ref, mask = tiny.synthetic_subject(h, w, box_yx=(h // 4, w // 4, 3 * h // 4, 3 * w // 4))
Image.fromarray(ref).save(work / "ref.jpg", quality=92)
Image.fromarray(mask.astype(np.uint8) * 255).save(work / "ref_mask.png")
(work / "photos").mkdir()
for i in range(16):
    image, _ = tiny.synthetic_subject(h, w, box_yx=(h // 5 + i, w // 5 + 2 * i, h // 5 + i + h // 2, w // 5 + 2 * i + w // 2), seed=i + 1)
    Image.fromarray(image).save(work / "photos" / f"{i:02d}.jpg", quality=92)
if model == "tiny":
    sam = tiny.tiny_sam()
else:
    from segment_anything import sam_model_registry
    torch.manual_seed(0)
    sam = sam_model_registry[model]()
torch.save(sam.state_dict(), work / "sam.pth")
(work / "entry.py").write_text(
    "import sys\nfrom persam_dreambooth import testing as tiny\ntiny.register_tiny_sam()\n"
    "from persam_dreambooth.cli import main\nsys.exit(main())\n")
PYDATA
LAUNCH=("$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
if [[ "$MODEL" == "tiny" ]]; then ENTRY=("$WORK/entry.py"); else ENTRY=(-m persam_dreambooth); fi
SEG=(segment --images "$WORK/photos" --sam-model "$MODEL" --sam-checkpoint "$WORK/sam.pth" --device "$DEVICE"
     --batch-size "$BS" --dtype bfloat16 --cache-dir "$WORK/emb-cache")
{
  start=$(date +%s%N)
  timeout 240 "${LAUNCH[@]}" "${ENTRY[@]}" "${SEG[@]}" --ref-image "$WORK/ref.jpg" --ref-mask "$WORK/ref_mask.png" \
    --output "$WORK/out_mask" 2>&1 | grep -v "it/s\]\|img/s\]" || true
  mid=$(date +%s%N)
  timeout 240 "${LAUNCH[@]}" "${ENTRY[@]}" "${SEG[@]}" --ref-image "$WORK/ref.jpg" --ref-point "$((SIZE / 2)),$((SIZE * 3 / 8))" \
    --output "$WORK/out_point" 2>&1 | grep -v "it/s\]\|img/s\]" || true
  end=$(date +%s%N)
  timeout 240 "${LAUNCH[@]}" "${ENTRY[@]}" "${SEG[@]}" --ref-image "$WORK/ref.jpg" --ref-mask "$WORK/ref_mask.png" \
    --output "$WORK/out_mask" 2>&1 | grep -v "it/s\]\|img/s\]" || true
  echo "wall (incl. process start and model load): cold cache $(( (mid - start) / 1000000 )) ms, warm cache $(( (end - mid) / 1000000 )) ms"
  echo "rows: $(wc -l < "$WORK/out_mask/results.jsonl") (mask ref), $(wc -l < "$WORK/out_point/results.jsonl") (point ref)"
} 2>&1 | tee "$OUT_DIR/segment_cli.log"
grep -q ", 0 image-encoder call(s)" "$OUT_DIR/segment_cli.log" && echo "warm cache: PASS (no encoder call)" \
  || echo "warm cache: FAIL (see segment_cli.log)"
grep -q "already complete; nothing to do" "$OUT_DIR/segment_cli.log" && echo "resume: PASS" || echo "resume: FAIL"
echo "results in $OUT_DIR"
