#!/usr/bin/env bash
# Semantic FPN + LowFormer-B0 on the composite set, the whole CPU recipe, then its validation score.
#
#   benchmarks/detection_composite.sh DATA_DIR RUN_DIR
#
# 1. (PRETRAIN_EPOCHS > 0) a LowFormer-B0 classifier on DATA_DIR/../cifar10 with `lowformer train`
#    (configs/cls/cifar10/b0.yaml) into RUN_DIR_cifar10;
# 2. `lowformer seg train configs/seg/composite/fpn_b0.yaml` on DATA_DIR/{images,annotations}/train into
#    RUN_DIR, its encoder initialised from that classifier (from scratch with PRETRAIN_EPOCHS=0);
# 3. `lowformer seg eval` of RUN_DIR on the val split -> RUN_DIR/val_scores.json.
# RUN_DIR/benchmark.json records the wall and process CPU time (user + sys) of every stage, the machine and
# versions. Every stage resumes: rerunning the script after an interruption continues where it stopped.
# Environment: PYTHON (default python3), PRETRAIN_EPOCHS (14), SEG_EPOCHS (the recipe's), THREADS (2).
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 DATA_DIR RUN_DIR" >&2
  exit 2
fi
DATA=$1
RUN=${2%/}
PY=${PYTHON:-python3}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-14}
export OMP_NUM_THREADS=${THREADS:-2}
HERE=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$HERE
for f in "$DATA/images/train" "$DATA/annotations/train" "$DATA/images/val" "$DATA/annotations/val"; do
  [ -e "$f" ] || { echo "$0: '$f' not found (DATA_DIR must be the composite folder)" >&2; exit 2; }
done
# shellcheck source=benchmarks/composite_stages.sh
source "$HERE/benchmarks/composite_stages.sh"
mkdir -p "$(dirname "$RUN")"
composite_benchmark seg segmentation configs/seg/composite/fpn_b0.yaml "${SEG_EPOCHS:-}"
