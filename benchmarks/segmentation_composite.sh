#!/usr/bin/env bash
# Semantic FPN + LowFormer-B0 on the composite set, the whole CPU recipe, then its validation score.
#
#   benchmarks/segmentation_composite.sh DATA_DIR RUN_DIR
#
# 1. (PRETRAIN_EPOCHS > 0) a LowFormer-B0 classifier on DATA_DIR/../cifar10 with `lowformer train`
#    (configs/cls/cifar10/b0.yaml) into RUN_DIR_cifar10;
# 2. `lowformer seg train configs/seg/composite/fpn_b0.yaml` on DATA_DIR/{images,annotations}/train into
#    RUN_DIR, its encoder initialised from that classifier (from scratch with PRETRAIN_EPOCHS=0);
# 3. `lowformer seg eval` of RUN_DIR on the val split -> RUN_DIR/val_scores.json.
# RUN_DIR/benchmark.json records wall and process CPU time (user + sys of every stage), the machine and
# versions. Every stage resumes: rerunning the script after an interruption continues where it stopped.
# Environment: PYTHON (default python3), PRETRAIN_EPOCHS (6), SEG_EPOCHS (8), THREADS (2).
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 DATA_DIR RUN_DIR" >&2
  exit 2
fi
DATA=$1
RUN=${2%/}
PY=${PYTHON:-python3}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-6}
SEG_EPOCHS=${SEG_EPOCHS:-8}
export OMP_NUM_THREADS=${THREADS:-2}
HERE=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$HERE
CIFAR=$DATA/../cifar10
for d in "$DATA/images/train" "$DATA/annotations/train" "$DATA/images/val" "$DATA/annotations/val"; do
  [ -d "$d" ] || { echo "$0: '$d' not found (DATA_DIR must be the composite folder)" >&2; exit 2; }
done
if [ "$PRETRAIN_EPOCHS" -gt 0 ] && [ ! -d "$CIFAR/train" ]; then
  echo "$0: '$CIFAR/train' not found; set PRETRAIN_EPOCHS=0 to train from scratch" >&2
  exit 2
fi
resume_flag() { [ -f "$1/checkpoint/latest.txt" ] && echo --resume || true; }
mkdir -p "$(dirname "$RUN")"
start=$(date +%s)

init=()
if [ "$PRETRAIN_EPOCHS" -gt 0 ]; then
  PRE=${RUN}_cifar10
  if [ ! -f "$PRE/summary.json" ] || ! grep -q '"finished": true' "$PRE/summary.json"; then
    # shellcheck disable=SC2046
    "$PY" -m lowformer train configs/cls/cifar10/b0.yaml --data_provider.data_dir "$CIFAR" --path "$PRE" \
      --run_config.n_epochs "$PRETRAIN_EPOCHS" --no-progress $(resume_flag "$PRE")
  fi
  init=(--segmentation.backbone_checkpoint "$PRE/checkpoint/evalmodel.pt")
fi
# shellcheck disable=SC2046
"$PY" -m lowformer seg train configs/seg/composite/fpn_b0.yaml --data_provider.data_dir "$DATA" --path "$RUN" \
  --run_config.n_epochs "$SEG_EPOCHS" --no-progress "${init[@]}" $(resume_flag "$RUN")
"$PY" -m lowformer seg eval --run "$RUN" --data "$DATA" --split val --out "$RUN/val_scores.json"

wall=$(( $(date +%s) - start ))
# `times` must run in this shell (a subshell has no children); its second line is the children's user/sys.
times_file=$(mktemp)
times > "$times_file"
read -r cu cs < <(tail -1 "$times_file" | sed 's/[ms]/ /g' | awk '{print $1*60+$2, $3*60+$4}')
rm -f "$times_file"
"$PY" - "$RUN" "$wall" "$cu" "$cs" "$PRETRAIN_EPOCHS" "$SEG_EPOCHS" <<'PYEOF'
import json, os, platform, sys
import torch, timm, segmentation_models_pytorch as smp
run, wall, cu, cs, pre, seg = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
flags = model = ""
try:
    info = open("/proc/cpuinfo").read()
    model = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
    flags = " ".join(sorted({f for l in info.splitlines() if l.startswith("flags")
                             for f in l.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma"))}))
except (OSError, StopIteration):
    pass
scores = json.load(open(os.path.join(run, "val_scores.json")))
out = {"miou": scores["miou"], "pixel_acc": scores["pixel_acc"], "per_class_iou": scores["per_class_iou"],
       "images": scores["images"], "wall_s": wall, "cpu_user_s": cu, "cpu_sys_s": cs, "cpu_s": cu + cs,
       "pretrain_epochs": pre, "seg_epochs": seg, "threads": int(os.environ.get("OMP_NUM_THREADS", "0")),
       "cpu": model, "cpu_flags": flags, "cores": os.cpu_count(), "python": platform.python_version(),
       "torch": torch.__version__, "timm": timm.__version__, "smp": smp.__version__,
       "note": "wall includes waiting for the CPU on a shared machine; cpu_s is the processes' own time"}
tmp = os.path.join(run, ".benchmark.json.tmp")
json.dump(out, open(tmp, "w"), indent=2)
os.replace(tmp, os.path.join(run, "benchmark.json"))
print(json.dumps({k: out[k] for k in ("miou", "pixel_acc", "wall_s", "cpu_s", "cpu")}))
PYEOF
