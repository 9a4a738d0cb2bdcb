#!/usr/bin/env bash
# All GPU checks the issues ask for, as one script for a lent GPU machine (offline, random weights, no downloads),
# sized to fit one 10-minute command:
#   A. segmentation (issues 2, 3): benchmarks/gpu_segment_check.sh  (PerSAM overhead vs plain SAM with vit_h-sized
#      random weights, album images/s one-at-a-time / batched / bf16 / cache warm, PerSAM-F fit time, accelerate run)
#   B. training (issues 4, 9): benchmarks/gpu_train_check.sh  (SD 1.5 at 512 px: s/step and peak memory vanilla vs
#      masked, end-to-end trainer; SDXL at 1024 px < 16 GB; SD 3.5 medium at 1024 px < 16 GB; FLUX.1 [dev] at 512 px
#      < 24 GB; all random weights of the real architectures, LoRA, gradient checkpointing)
#   C. video (issue 11): benchmarks/video_speed.py with vit_h in bf16: tracked frames/s
#   D. web app (issue 12): benchmarks/ui_latency.py with vit_h: click-to-preview latency with a cached embedding
# Usage (from the repository root, after `pip install -e ".[ui]"`):  bash benchmarks/gpu_check.sh [OUT_DIR]
# Each part runs under its own time limit (SEG_LIMIT, TRAIN_LIMIT, VIDEO_LIMIT, UI_LIMIT seconds) so one slow part
# cannot eat the others'; PARTS="A B C D" (default) picks which run.
# CPU plumbing check of the whole script (tiny models):
#   DEVICE=cpu MODEL=tiny RES=32 PRECISION=no SDXL_MODEL=tiny SDXL_RES=32 SD3_RES=32 SD3_LAYERS=2 FLUX_RES=32 \
#   FLUX_LAYERS=1 FLOW_PRECISION=no STEPS=2 FLOW_STEPS=1 FLOW_ROUNDS=1 SAM_MODEL=tiny bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/out}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
PARTS="${PARTS:-A B C D}"
SEG_LIMIT="${SEG_LIMIT:-150}"
TRAIN_LIMIT="${TRAIN_LIMIT:-330}"
VIDEO_LIMIT="${VIDEO_LIMIT:-60}"
UI_LIMIT="${UI_LIMIT:-40}"
DEV="${DEVICE:-cuda}"
SAM="${SAM_MODEL:-vit_h}"
nvidia-smi || true
seg=skip; train=skip; video=skip; ui=skip
if [[ " $PARTS " == *" A "* ]]; then
  echo "===== A. segmentation (limit ${SEG_LIMIT}s)"
  timeout "$SEG_LIMIT" bash benchmarks/gpu_segment_check.sh "$OUT_DIR/segmentation"; seg=$?
fi
if [[ " $PARTS " == *" B "* ]]; then
  echo "===== B. training, all families (limit ${TRAIN_LIMIT}s)"
  timeout "$TRAIN_LIMIT" bash benchmarks/gpu_train_check.sh "$OUT_DIR/training"; train=$?
fi
if [[ " $PARTS " == *" C "* ]]; then
  echo "===== C. video tracking, $SAM bf16 (limit ${VIDEO_LIMIT}s)"
  timeout "$VIDEO_LIMIT" "$PY" benchmarks/video_speed.py --model "$SAM" --device "$DEV" --dtype bfloat16 \
    --frames "${VIDEO_FRAMES:-20}" --rounds 1 2>&1 | tee "$OUT_DIR/video_speed.txt"; video=${PIPESTATUS[0]}
fi
if [[ " $PARTS " == *" D "* ]]; then
  echo "===== D. web app click-to-preview, $SAM (limit ${UI_LIMIT}s)"
  timeout "$UI_LIMIT" "$PY" benchmarks/ui_latency.py --model "$SAM" --device "$DEV" --num-images 1 --size 1024 \
    --clicks 20 --repeats 0 --json "$OUT_DIR/ui_latency.json" 2>&1 | tee "$OUT_DIR/ui_latency.txt"; ui=${PIPESTATUS[0]}
fi
echo "===== exit codes: segmentation $seg, training $train, video $video, ui $ui (124 = hit its time limit)"
for code in "$seg" "$train" "$video" "$ui"; do [[ "$code" == skip || "$code" == 0 ]] || exit 1; done
exit 0
