#!/usr/bin/env bash
# Trains configs/cls/cifar10/b0.yaml (LowFormer-B0, 32-48 px per batch) on a CIFAR-10 folder and reports
# the top-1 of the EMA model on its val/ (from the trainer, then re-checked by `lowformer eval` on the
# saved evalmodel_final.pt). Not a test: on a 2-core CPU one epoch takes tens of minutes.
#   usage: benchmarks/train_cifar10.sh [DATA_DIR] [EPOCHS] [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10}
EPOCHS=${2:-1}
RUN=${3:-runs/cifar10_b0_e${EPOCHS}}
PY=${PYTHON:-python}
start=$(date +%s)
"$PY" -m lowformer train configs/cls/cifar10/b0.yaml --path "$RUN" \
    --data_provider.data_dir "$DATA" --run_config.n_epochs "$EPOCHS"
"$PY" -m lowformer eval lowformer_b0 --num-classes 10 --checkpoint "$RUN/checkpoint/evalmodel_final.pt" \
    --data "$DATA/val" --image-size 48 --crop-ratio 1.0 --interpolation bilinear --workers 1 \
    --out "$RUN/eval_val.json"
echo "command: benchmarks/train_cifar10.sh $DATA $EPOCHS $RUN; total wall $(( $(date +%s) - start )) s"
cat "$RUN/summary.json"
