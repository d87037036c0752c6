#!/usr/bin/env bash
# Everything a GPU machine should run, in one call of under 10 minutes:
# install, backend report, GPU tests, training-step, bank and packed benchmarks, attention suite, plots, summary
# (printed last).
#
#   bash benchmarks/gpu_check.sh                 # full attention set, cut by a time budget if it runs long
#   bash benchmarks/gpu_check.sh --quick         # llama-7b, P=64, bfloat16 only; fewer training steps
#   bash benchmarks/gpu_check.sh --dtypes float16 --shapes gpt2-small    # other args go to bench_attention.py
#
# Results: benchmarks/results/, and "$OUT" when that variable is set (at most 7 files: the attention JSON, CSV and
# PNGs, the training-step JSON and PNG, and results.tar.gz holding everything of this run with the log).
# TOTAL_SECONDS (default 540) is the wall-clock budget the attention suite's --time-budget is derived from;
# SKIP_INSTALL=1 skips the pip install (an environment where the package is already installed).
# PREFIX_ATTN_AUTOTUNE=1 times every tile candidate once per shape (prefix_attn/triton/tuning.py) before the timed
# runs; the chosen tiles are written to autotune.json in the run folder (and results.tar.gz).
set -u
cd "$(dirname "$0")/.."

TOTAL_SECONDS=${TOTAL_SECONDS:-540}
QUICK=""
EXTRA=()
for arg in "$@"; do
    if [ "$arg" = "--quick" ]; then QUICK="--quick"; else EXTRA+=("$arg"); fi
done
RUN_DIR=$(mktemp -d -t prefix_attn_bench.XXXXXX)
exec > >(tee "$RUN_DIR/gpu_check.log") 2>&1
export PREFIX_ATTN_AUTOTUNE_CACHE=${PREFIX_ATTN_AUTOTUNE_CACHE:-$RUN_DIR/autotune.json}

step() {  # echo, run, report; never stop the script
    echo
    echo "+ $*"
    "$@"
    local rc=$?
    echo "(exit $rc, ${SECONDS}s elapsed)"
    return 0
}

step nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
if [ -z "${SKIP_INSTALL:-}" ]; then
    step pip install --no-deps --no-build-isolation -e .
fi
step python -m prefix_attn.info
step timeout 200 python -m pytest -q -m gpu tests/
step timeout 150 python benchmarks/bench_train_step.py $QUICK --out "$RUN_DIR"
step timeout 60 bash -c "python benchmarks/bench_bank.py --backend triton --dtype bfloat16 $QUICK > '$RUN_DIR/bench_bank.md'"
step timeout 60 bash -c "python benchmarks/bench_packed.py --device cuda $QUICK > '$RUN_DIR/bench_packed.md'"
step timeout 60 bash -c "python benchmarks/bench_dropout.py --backend triton --dtype bfloat16 $QUICK > '$RUN_DIR/bench_dropout.md'"

budget=$(( TOTAL_SECONDS - SECONDS - 60 ))
[ "$budget" -lt 30 ] && budget=30
step timeout $(( budget + 60 )) python benchmarks/bench_attention.py $QUICK --time-budget "$budget" \
    --out "$RUN_DIR" --no-table ${EXTRA[@]+"${EXTRA[@]}"}

mkdir -p benchmarks/results
cp "$RUN_DIR"/*.json "$RUN_DIR"/*.csv "$RUN_DIR"/bench_*.md benchmarks/results/ 2>/dev/null
plot_inputs=()  # the attention summary last: the end of the output is what a remote run shows
for f in "$RUN_DIR"/train_step_*.json "$RUN_DIR"/attention_*.json; do
    [ -e "$f" ] && plot_inputs+=("$f")
done
if [ ${#plot_inputs[@]} -gt 0 ]; then
    step python benchmarks/plot.py "${plot_inputs[@]}"
    cp "$RUN_DIR"/*.png benchmarks/results/ 2>/dev/null
fi
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    tar czf "$OUT/results.tar.gz" -C "$RUN_DIR" .
    for f in "$RUN_DIR"/attention_*.json "$RUN_DIR"/attention_*.csv "$RUN_DIR"/attention_*.png \
             "$RUN_DIR"/train_step_*.json "$RUN_DIR"/train_step_*.png; do
        [ -e "$f" ] && cp "$f" "$OUT/"
    done
    echo "copied to \$OUT: $(ls "$OUT" | tr '\n' ' ')"
fi
echo "results of this run: $RUN_DIR (copied to benchmarks/results/); ${SECONDS}s in all"
