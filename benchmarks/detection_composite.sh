#!/usr/bin/env bash
# The CPU detection recipe on the composite set: LowFormer-B0 pre-trained as a CIFAR-10 classifier
# (lowformer train, configs/cls/cifar10/b0.yaml, DATA_DIR/../cifar10), then RetinaNet on
# DATA_DIR/images/train (configs/det/composite_retinanet_b0.yaml) with that backbone, then
# `lowformer det eval` on DATA_DIR's val split. RUN_DIR is the detection run; the classifier run sits in
# RUN_DIR/classifier. Re-running the script resumes whatever part is unfinished.
#   usage: benchmarks/detection_composite.sh DATA_DIR RUN_DIR
# Environment: PYTHON (default python3), CLS_EPOCHS (default 2; 0 trains the detector from scratch),
# DET_EPOCHS (default: the recipe's). Prints wall and process CPU time of each part.
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 DATA_DIR RUN_DIR" >&2
    exit 2
fi
DATA=$1
RUN=$2
PY=${PYTHON:-python3}
CLS_EPOCHS=${CLS_EPOCHS:-2}
CIFAR="$DATA/../cifar10"
for need in "$DATA/images/train" "$DATA/annotations/instances_train.json" "$DATA/annotations/instances_val.json"; do
    [ -e "$need" ] || { echo "$0: error: '$need' not found (DATA_DIR must be the composite folder)" >&2; exit 2; }
done
mkdir -p "$RUN"
TIMEFORMAT='%R s wall, %U s user + %S s system CPU'
DET_ARGS=()
if [ "$CLS_EPOCHS" -gt 0 ]; then
    [ -d "$CIFAR/train" ] || { echo "$0: error: '$CIFAR/train' not found (CIFAR-10 folder beside DATA_DIR)" >&2; exit 2; }
    CLS_RUN="$RUN/classifier"
    if [ ! -f "$CLS_RUN/checkpoint/evalmodel_final.pt" ]; then
        RESUME=(); [ -f "$CLS_RUN/checkpoint/latest.txt" ] && RESUME=(--resume)
        echo "== classifier pre-training: LowFormer-B0 on $CIFAR, $CLS_EPOCHS epochs"
        time "$PY" -m lowformer train configs/cls/cifar10/b0.yaml --path "$CLS_RUN" "${RESUME[@]}" --no-progress \
            --data_provider.data_dir "$CIFAR" --run_config.n_epochs "$CLS_EPOCHS"
    fi
    DET_ARGS+=(--detection.backbone_checkpoint "$CLS_RUN/checkpoint/evalmodel_final.pt")
fi
if [ -n "${DET_EPOCHS:-}" ]; then
    DET_ARGS+=(--run_config.n_epochs "$DET_EPOCHS")
fi
if [ ! -f "$RUN/checkpoint/evalmodel_final.pt" ]; then
    RESUME=(); [ -f "$RUN/checkpoint/latest.txt" ] && RESUME=(--resume)
    echo "== RetinaNet + LowFormer-B0 on $DATA/images/train"
    time "$PY" -m lowformer det train configs/det/composite_retinanet_b0.yaml --path "$RUN" "${RESUME[@]}" \
        --no-progress --data_provider.data_dir "$DATA" "${DET_ARGS[@]}"
fi
echo "== lowformer det eval on $DATA val"
time "$PY" -m lowformer det eval --run "$RUN" --data "$DATA" --split val --out "$RUN/eval_val.json"
