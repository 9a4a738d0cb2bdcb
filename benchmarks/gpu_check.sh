#!/usr/bin/env bash
# All GPU checks the issues ask for, as one script for a lent GPU machine (offline, random weights, no downloads),
# sized to fit one 10-minute command:
#   A. segmentation (issues 2, 3): benchmarks/gpu_segment_check.sh  (PerSAM overhead vs plain SAM with vit_h-sized
#      random weights, album images/s one-at-a-time / batched / bf16 / cache warm, PerSAM-F fit time, accelerate run)
#   B. training (issue 4): benchmarks/gpu_train_check.sh  (SD 1.5 architecture, random weights, 512 px, batch 1, fp16,
#      gradient checkpointing, LoRA: s/step and peak memory for vanilla vs masked, cached or not; end-to-end trainer)
# Usage (from the repository root, after `pip install -e .`):  bash benchmarks/gpu_check.sh [OUT_DIR]
# Each part runs under its own time limit (SEG_LIMIT, TRAIN_LIMIT seconds) so one slow part cannot eat the other's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/out}}"
mkdir -p "$OUT_DIR"
SEG_LIMIT="${SEG_LIMIT:-300}"
TRAIN_LIMIT="${TRAIN_LIMIT:-270}"
nvidia-smi || true
echo "===== A. segmentation (limit ${SEG_LIMIT}s)"
timeout "$SEG_LIMIT" bash benchmarks/gpu_segment_check.sh "$OUT_DIR/segmentation"
seg=$?
echo "===== B. training (limit ${TRAIN_LIMIT}s)"
timeout "$TRAIN_LIMIT" bash benchmarks/gpu_train_check.sh "$OUT_DIR/training"
train=$?
echo "===== exit codes: segmentation $seg, training $train (124 = hit its time limit)"
exit $(( seg != 0 || train != 0 ))
