#!/usr/bin/env bash
# The GPU figures in one prepared run: `lowformer bench` on CUDA for LowFormer-B0 / B1 at batch 200 and 1
# (timm eager fp32 as the anchor; eager, channels_last, torch.compile and CUDA graphs under AMP fp16 / bf16;
# ONNX Runtime's CUDA provider and TensorRT where installed), then a few AMP training steps of `lowformer train`.
#
#   benchmarks/gpu_cuda.sh OUT_DIR
#
# OUT_DIR gets env.txt (GPU, driver, versions), one CSV + log per bench group and train_<amp>.json (the
# trainer's summary: images_per_s over its steps). A group that fails (a package missing, a backend refused)
# is logged and the others still run; the script exits non-zero if any did.
# Environment: PYTHON (python3), DEVICE (cuda; cpu runs the same flow with the CPU's backends, to check the
# script without a GPU), BATCH (the large batch, 200), MIN_TIME (seconds per figure, 2), STEP_TIMEOUT (seconds
# per group, 300), TRAIN_PER_CLASS (generated training images per class, 64; batch 128), ONLY (space-separated
# group / train_<amp> names to run, e.g. "b1_fp16 train_fp16", to finish a run a time limit cut short; default all).
set -uo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:?usage: benchmarks/gpu_cuda.sh OUT_DIR}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-200}
MIN_TIME=${MIN_TIME:-2}
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-64}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
mkdir -p "$OUT"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
failed=0

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  "$PY" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cudnn', torch.backends.cudnn.version(), 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
  "$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" 2>&1 | tail -1
  "$PY" -c "import torch_tensorrt as t; print('torch_tensorrt', t.__version__)" 2>&1 | tail -1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# group NAME ARGS...: one `lowformer bench` call, its records in NAME.csv, its output in NAME.log
wanted() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
group() {
  local name=$1; shift
  wanted "$name" || return 0
  echo "== $name: $*"
  if ! timeout "$STEP_TIMEOUT" "$PY" -m lowformer bench lowformer_b0 lowformer_b1 --device "$DEVICE" \
      --min-time "$MIN_TIME" "$@" --out "$OUT/$name.csv" > "$OUT/$name.log" 2>&1; then
    echo "   failed (see $name.log):"; failed=1
  fi
  tail -n 12 "$OUT/$name.log"
}

if [ "$DEVICE" = cuda ]; then
  graphs=(cuda-graphs) train_amps=(bf16 fp16)
else
  graphs=() train_amps=(bf16)  # fp16 training needs CUDA's loss scaler
fi
group b${BATCH}_fp32 -b "$BATCH" --backend eager channels_last
group b${BATCH}_fp16 -b "$BATCH" --amp fp16 --backend eager channels_last "${graphs[@]}" compile
group b${BATCH}_bf16 -b "$BATCH" --amp bf16 --backend channels_last "${graphs[@]}"
group b1_fp16 -b 1 --amp fp16 --backend eager channels_last "${graphs[@]}" compile
group b${BATCH}_onnxruntime -b "$BATCH" --backend onnxruntime
if [ "$DEVICE" = cuda ]; then
  group b${BATCH}_tensorrt -b "$BATCH" --amp fp16 --backend tensorrt
fi

# A few AMP training steps at 224 px with the B0 ImageNet recipe on generated images (10 classes), so the
# figure is the trainer's own (data loading, autocast, loss scaling for fp16, optimizer, EMA).
DATA="$OUT/.images"
trains=()
for amp in "${train_amps[@]}"; do wanted "train_$amp" && trains+=("$amp"); done
[ ${#trains[@]} -eq 0 ] || "$PY" - "$DATA" "$TRAIN_PER_CLASS" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root, rng = Path(sys.argv[1]), np.random.default_rng(0)
for split, count in (("train", int(sys.argv[2])), ("val", 8)):
    for c in range(10):
        folder = root / split / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
EOF
for amp in "${trains[@]}"; do
  echo "== train_$amp"
  run="$OUT/.train_$amp"
  rm -rf "$run"
  if timeout "$STEP_TIMEOUT" "$PY" -m lowformer train configs/cls/imagenet/b0.yaml --path "$run" --device "$DEVICE" \
      --amp "$amp" --no-progress --data_provider.data_dir "$DATA" --run_config.n_epochs 1 \
      --run_config.warmup_epochs 0 --run_config.reset_bn_size 100 --data_provider.base_batch_size 128 \
      --data_provider.n_worker 4 --run_config.channels_last true > "$OUT/train_$amp.log" 2>&1; then
    cp "$run/summary.json" "$OUT/train_$amp.json" && cat "$OUT/train_$amp.json"
  else
    echo "   failed (see train_$amp.log):"; tail -n 5 "$OUT/train_$amp.log"; failed=1
  fi
done
rm -rf "$DATA" "$OUT"/.train_*
exit $failed
