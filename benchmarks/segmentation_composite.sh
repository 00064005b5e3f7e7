#!/usr/bin/env bash
# Semantic FPN + LowFormer-B0 on the composite set, the whole CPU recipe, then its validation score.
#
#   benchmarks/segmentation_composite.sh DATA_DIR RUN_DIR
#
# 1. (PRETRAIN_EPOCHS > 0) a LowFormer-B0 classifier on DATA_DIR/../cifar10 with `lowformer train`
#    (configs/cls/cifar10/b0.yaml) into RUN_DIR_cifar10;
# 2. `lowformer seg train configs/seg/composite/fpn_b0.yaml` on DATA_DIR/{images,annotations}/train into
#    RUN_DIR, its encoder initialised from that classifier (from scratch with PRETRAIN_EPOCHS=0), the photos
#    of DATA_DIR/../cifar10/train pasted on its training images (the recipe's copy-paste);
# 3. `lowformer seg eval` of RUN_DIR on the val split -> RUN_DIR/val_scores.json.
# RUN_DIR/benchmark.json records the wall and process CPU time (user + sys) of every stage, the machine and
# versions. Every stage resumes: rerunning the script after an interruption continues where it stopped.
# Environment: PYTHON (default python3), PRETRAIN_EPOCHS (28), SEG_EPOCHS (the recipe's), THREADS (2).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benchmarks/composite_stages.sh
source "$HERE/benchmarks/composite_stages.sh"
composite_args "$@"
require_files "$DATA/images/train" "$DATA/annotations/train" "$DATA/images/val" "$DATA/annotations/val"
if [ ! -d "$DATA/../cifar10/train" ]; then
  echo "$0: '$DATA/../cifar10/train' not found: the recipe pastes CIFAR-10 training photos (segmentation.paste_source);" \
    "put the cifar10 folder beside DATA_DIR" >&2
  exit 2
fi
composite_benchmark seg segmentation configs/seg/composite/fpn_b0.yaml "${SEG_EPOCHS:-}" \
  --segmentation.paste_source "$DATA/../cifar10/train"
