# Shared by the composite CPU benchmarks (sourced): the three stages, resume tests, per-stage wall / CPU time.
# stage_start; ...; stage_end NAME appends NAME=WALL,USER,SYS to the array `stages` for record_run.py.
# composite_args "$@": DATA_DIR RUN_DIR -> DATA, RUN; PY, PRETRAIN_EPOCHS (default 28), THREADS (default 2).
composite_args() {
  if [ $# -ne 2 ]; then
    echo "usage: $0 DATA_DIR RUN_DIR" >&2
    exit 2
  fi
  DATA=$1
  RUN=${2%/}
  PY=${PYTHON:-python3}
  PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-28}
  export OMP_NUM_THREADS=${THREADS:-2}
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$HERE
}
# require_files PATH...: each must exist in DATA_DIR, checked before any work.
require_files() {
  local f
  for f in "$@"; do
    [ -e "$f" ] || { echo "$0: '$f' not found (DATA_DIR must be the composite folder)" >&2; exit 2; }
  done
}
resume_flag() { [ -f "$1/checkpoint/latest.txt" ] && echo --resume || true; }
finished() { [ -f "$1/summary.json" ] && grep -q '"finished": true' "$1/summary.json"; }
# `times` must run in the benchmark's own shell, not in a $(...) subshell, which has no children: it writes
# to a file and the result goes to CPU; its second line is the children's cumulative user and sys time.
children_cpu() {
  local f; f=$(mktemp)
  times > "$f"
  CPU=$(tail -1 "$f" | sed 's/[ms]/ /g' | awk '{printf "%.2f,%.2f", $1*60+$2, $3*60+$4}')
  rm -f "$f"
}
stages=()
stage_start() { t0=$(date +%s.%N); children_cpu; c0=$CPU; }
stage_end() {
  local c1; children_cpu; c1=$CPU
  stages+=("$1=$(awk -v a="$t0" -v b="$(date +%s.%N)" -v c="$c0" -v d="$c1" 'BEGIN {split(c, x, ","); split(d, y, ",");
    printf "%.1f,%.2f,%.2f", b - a, y[1] - x[1], y[2] - x[2]}')")
}
# pretrain EPOCHS CIFAR_DIR RUN_DIR: the LowFormer-B0 CIFAR-10 classifier both benchmarks start from.
pretrain() {
  stage_start
  if ! finished "$3"; then
    # shellcheck disable=SC2046
    "$PY" -m lowformer train "$HERE/configs/cls/cifar10/b0.yaml" --data_provider.data_dir "$2" --path "$3" \
      --run_config.n_epochs "$1" --no-progress $(resume_flag "$3")
  fi
  stage_end pretrain
}

# composite_benchmark CMD SECTION CONFIG EPOCHS [ARG...]: pre-training (unless PRETRAIN_EPOCHS=0), `lowformer CMD
# train CONFIG ARG...` (SECTION.backbone_checkpoint = the classifier; EPOCHS overrides n_epochs when set),
# `lowformer CMD eval` on val, then RUN/benchmark.json. Reads what composite_args sets, and HERE.
composite_benchmark() {
  local cmd=$1 section=$2 config=$3 n_epochs=$4 init=() epochs=()
  shift 4
  mkdir -p "$(dirname "$RUN")"
  if [ "$PRETRAIN_EPOCHS" -gt 0 ]; then
    if [ ! -d "$DATA/../cifar10/train" ]; then
      echo "$0: '$DATA/../cifar10/train' not found; set PRETRAIN_EPOCHS=0 to train from scratch" >&2
      exit 2
    fi
    pretrain "$PRETRAIN_EPOCHS" "$DATA/../cifar10" "${RUN}_cifar10"
    init=(--"$section".backbone_checkpoint "${RUN}_cifar10/checkpoint/evalmodel.pt")
  fi
  [ -n "$n_epochs" ] && epochs=(--run_config.n_epochs "$n_epochs")
  stage_start
  if ! finished "$RUN"; then
    # shellcheck disable=SC2046
    "$PY" -m lowformer "$cmd" train "$HERE/$config" --data_provider.data_dir "$DATA" --path "$RUN" --no-progress \
      "${init[@]}" "${epochs[@]}" "$@" $(resume_flag "$RUN")
  fi
  stage_end train
  stage_start
  "$PY" -m lowformer "$cmd" eval --run "$RUN" --data "$DATA" --split val --out "$RUN/val_scores.json"
  stage_end eval
  "$PY" "$HERE/benchmarks/record_run.py" "$RUN" "$RUN/val_scores.json" "${stages[@]}" \
    --set "pretrain_epochs=$PRETRAIN_EPOCHS" --set "${cmd}_epochs=${n_epochs:-recipe}"
}
