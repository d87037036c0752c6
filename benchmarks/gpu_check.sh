#!/usr/bin/env bash
# The GPU check in two calls of at most 10 minutes each on one GPU machine:
#
#   bash benchmarks/gpu_check.sh --stage 1             # GPU tests, decode check, GPT-2 and Llama timing (~5 min)
#   bash benchmarks/gpu_check.sh --stage 2             # at once after stage 1, on the same machine: triage of the
#                                                      # failures, or (all passed) autotuning and more shapes
#   bash benchmarks/gpu_check.sh --stage 1 --dry-run   # print each step, its timeout and the sum; run nothing
#
# No install and no C++ build: the package runs from this tree (PYTHONPATH) and PREFIX_ATTN_NO_JIT=1 keeps the
# CPU kernel from compiling. Every step runs under its own timeout; the timeouts of a stage sum to at most
# its limit (STAGE_LIMIT below, checked by tests/test_gpu_check.py), so a stage ends well inside one call.
# After every step its files are copied to $OUT (the folder a remote run brings back): log.txt (the whole
# output, live), summary.md (one line per step), the step's key files and results.tar.gz (everything so far),
# so a call cut short still brings back what finished. A copy stays in $WORK for stage 2 (same machine, warm).
# Set PREFIX_ATTN_COMMIT to the commit being run (the tree there has no .git): it goes into every result.
set -u
cd "$(dirname "$0")/.."

STAGE=1
DRY=0
DO=""  # internal: --do FUNCTION ARGS... runs one of the functions below (a step's command under timeout)
DO_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --stage) STAGE=${2:-}; shift ;;
        --stage=*) STAGE=${1#--stage=} ;;
        --dry-run) DRY=1 ;;
        --do) DO=${2:-}; shift 2; DO_ARGS=("$@"); break ;;
        *) echo "usage: $0 --stage 1|2 [--dry-run]" >&2; exit 2 ;;
    esac
    shift
done
case "$STAGE" in 1|2) ;; *) echo "usage: $0 --stage 1|2 [--dry-run]" >&2; exit 2 ;; esac
declare -A STAGE_LIMIT=([1]=300 [2]=300)  # seconds of step timeouts per stage; a device call is given ~420 s
ROOT=${PREFIX_ATTN_GPU_WORK:-/tmp/prefix_attn_gpu}
WORK=$ROOT/stage$STAGE
OUT=${OUT:-$WORK/out}
PY=${PYTHON:-python}
PYTEST_ARGS=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_ARGS+=(--timeout 120)
"$PY" -c "import xdist" 2>/dev/null && PYTEST_ARGS+=(-n 8)
TOTAL=0
SELF=$(pwd)/benchmarks/gpu_check.sh

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PREFIX_ATTN_NO_JIT=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$ROOT/triton_cache}
export PREFIX_ATTN_AUTOTUNE_CACHE=${PREFIX_ATTN_AUTOTUNE_CACHE:-$ROOT/autotune.json}

if [ "$DRY" = 0 ] && [ -z "$DO" ]; then
    mkdir -p "$WORK" "$OUT"
    exec > >(tee -a "$OUT/log.txt" "$WORK/log.txt") 2>&1
    echo "| step | exit | seconds | timeout |" > "$WORK/summary.md"
    echo "|---|---|---|---|" >> "$WORK/summary.md"
fi

publish() {  # copy the key files of this stage to $OUT (8 files at most come back), then everything as a tar
    [ "$DRY" = 1 ] && return
    local f
    cp "$WORK/summary.md" "$OUT/summary.md"
    for f in "$@"; do [ -e "$WORK/$f" ] && cp "$WORK/$f" "$OUT/$f"; done
    tar czf "$ROOT/results$STAGE.tgz" -C "$WORK" --exclude=out --exclude=ir_cache . 2>/dev/null && mv "$ROOT/results$STAGE.tgz" "$OUT/results.tar.gz"
}

step() {  # step NAME TIMEOUT COMMAND...: run under timeout, log, record; never stop the script
    local name=$1 limit=$2
    shift 2
    TOTAL=$(( TOTAL + limit ))
    if [ "$DRY" = 1 ]; then
        printf 'stage %s  %-12s timeout %4ss  %s\n' "$STAGE" "$name" "$limit" "$*"
        return 0
    fi
    echo
    echo "+ [$name, timeout ${limit}s] $*"
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@"
    local rc=$?
    echo "($name: exit $rc, $(( SECONDS - t0 ))s; ${SECONDS}s into stage $STAGE)"
    echo "| $name | $rc | $(( SECONDS - t0 )) | $limit |" >> "$WORK/summary.md"
    return 0
}

env_report() {
    { env_lines; } 2>&1 | tee "$WORK/env.txt"
}

env_lines() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c "import torch, triton, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    "$PY" -c "import transformers, peft; print('transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1 | tail -1
    echo "commit ${PREFIX_ATTN_COMMIT:-unknown}, $(date -Iseconds)"
    "$PY" -m prefix_attn.info
}

gpu_tests() {  # gpu_tests XML: pytest -m gpu, on 8 workers where pytest-xdist is there; junit XML for the triage
    mkdir -p "$(dirname "$1")"
    "$PY" -m pytest -q -rf -p no:cacheprovider -m gpu ${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"} --junitxml="$1" \
        tests/test_triton.py tests/test_host_reads.py tests/test_decode.py tests/test_decode_split.py tests/test_grouped.py
}

suite() {  # suite XML: the Triton grids of the CPU suite (odd lengths, P = 0 / 1, every head dim), on the GPU
    "$PY" -m pytest -q -rf -p no:cacheprovider -m "not gpu" ${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"} --junitxml="$1" \
        tests/test_triton.py tests/test_varlen.py tests/test_dropout.py tests/test_decode_split.py
}

failed_tests() {  # how many tests of stage 1's junit XML failed or errored (-1: no XML)
    "$PY" - "$ROOT/stage1/gpu_tests.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print(-1); raise SystemExit
print(sum(1 for tc in root.iter("testcase") if tc.find("failure") is not None or tc.find("error") is not None))
EOF
}

sanitize() {  # compute-sanitizer memcheck on the smallest failing case, its Triton IR kept
    local case
    case=$("$PY" benchmarks/gpu_triage.py --junit "$ROOT/stage1/gpu_tests.xml" --smallest)
    [ -z "$case" ] && { echo "no failing grid case to sanitize"; return 0; }
    local tool
    tool=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    mkdir -p "$WORK/ir_cache"
    if [ -n "$tool" ]; then
        TRITON_CACHE_DIR="$WORK/ir_cache" "$tool" --tool memcheck --print-limit 20 \
            "$PY" benchmarks/gpu_triage.py --case "$case" --variant table > "$WORK/sanitizer.txt" 2>&1
    else
        echo "compute-sanitizer not found; IR only" > "$WORK/sanitizer.txt"
        TRITON_CACHE_DIR="$WORK/ir_cache" "$PY" benchmarks/gpu_triage.py --case "$case" >> "$WORK/sanitizer.txt" 2>&1
    fi
    echo "case $case" >> "$WORK/sanitizer.txt"
    (cd "$WORK/ir_cache" && find . \( -name '*.ttgir' -o -name '*.ptx' -o -name '*.json' \) -print0 |
        tar czf "$WORK/ir.tgz" --null -T -)
}

if [ -n "$DO" ]; then
    "$DO" ${DO_ARGS[@]+"${DO_ARGS[@]}"}
    exit $?
fi

if [ "$STAGE" = 1 ]; then
    step env 40 bash "$SELF" --do env_report; publish env.txt
    step gpu_tests 150 bash "$SELF" --do gpu_tests "$WORK/gpu_tests.xml"; publish gpu_tests.xml
    step decode 30 "$PY" benchmarks/bench_decode.py --out "$WORK" --shapes gpt2-small,llama3-8b-gqa --len-q 1,16
    [ "$DRY" = 0 ] && cp "$WORK"/decode_*.md "$WORK/decode.md" 2>/dev/null
    publish decode.md
    step attention 80 "$PY" benchmarks/bench_attention.py --shapes gpt2-small,llama-7b --dtypes bfloat16 --prefix 64 \
        --modes fwd,bwd,fwdbwd --methods "prefix_attn,sdpa[auto],sdpa_flash,sdpa_cudnn,flex,peft_eager" --time-budget 55 \
        --out "$WORK" --no-table
    [ "$DRY" = 0 ] && cp "$WORK"/attention_*.json "$WORK/attention.json" 2>/dev/null
    publish attention.json
else
    failed=-1
    [ "$DRY" = 0 ] && failed=$(failed_tests)
    if [ "$DRY" = 1 ] || [ "$failed" -lt 0 ]; then  # no stage-1 results on this machine: run the tests again
        echo "stage 2 (no stage-1 XML on this machine): the GPU tests first, then one of the branches below"
        step gpu_tests 150 bash "$SELF" --do gpu_tests "$ROOT/stage1/gpu_tests.xml"
        [ "$DRY" = 0 ] && { cp "$ROOT/stage1/gpu_tests.xml" "$WORK/" 2>/dev/null; failed=$(failed_tests);
                            publish gpu_tests.xml; }
        [ "$DRY" = 1 ] && { TOTAL_FRESH=$TOTAL; TOTAL=0; }
    fi
    if [ "$DRY" = 1 ] || [ "$failed" -gt 0 ]; then
        [ "$DRY" = 1 ] && echo "stage 2, tests failed:"
        step triage 150 "$PY" benchmarks/gpu_triage.py --junit "$ROOT/stage1/gpu_tests.xml" --out "$WORK" \
            --max-cases 4 --time-budget 110
        publish triage.md triage.json
        step sanitizer 120 bash "$SELF" --stage 2 --do sanitize; publish triage.md sanitizer.txt ir.tgz
        [ "$DRY" = 1 ] && { TOTAL_FAIL=$TOTAL; TOTAL=0; echo "stage 2, all passed:"; }
    fi
    if [ "$DRY" = 1 ] || [ "$failed" = 0 ]; then
        step profile 30 "$PY" benchmarks/profile_calls.py --shapes gpt2-small,llama-7b,llama3-8b-gqa --prefix 64 \
            --out "$WORK/profile"
        [ "$DRY" = 0 ] && cp "$WORK"/profile/profile_*.md "$WORK/profile.md" 2>/dev/null
        publish profile.md
        step autotune 120 env PREFIX_ATTN_AUTOTUNE=1 "$PY" benchmarks/bench_attention.py --shapes llama-7b \
            --dtypes bfloat16 --prefix 64 --modes fwd,fwdbwd --methods "prefix_attn,sdpa[auto]" --out "$WORK/tuned" \
            --no-table
        [ "$DRY" = 0 ] && { cp "$WORK"/tuned/attention_*.json "$WORK/attention_tuned.json" 2>/dev/null;
                            cp "$PREFIX_ATTN_AUTOTUNE_CACHE" "$WORK/autotune.json" 2>/dev/null; }
        publish profile.md attention_tuned.json autotune.json
        step more_shapes 80 "$PY" benchmarks/bench_attention.py --shapes llama-7b,gpt2-small,llama3-8b-gqa \
            --dtypes bfloat16,float16 --prefix 16,64,256 --modes fwdbwd \
            --methods "prefix_attn,sdpa[auto],sdpa_flash,sdpa_cudnn,peft_eager" --time-budget 55 --out "$WORK/more" --no-table
        [ "$DRY" = 0 ] && cp "$WORK"/more/attention_*.json "$WORK/attention_more.json" 2>/dev/null
        publish profile.md attention_tuned.json autotune.json attention_more.json
        step suite 60 bash "$SELF" --stage 2 --do suite "$WORK/suite.xml"
        publish profile.md attention_tuned.json autotune.json attention_more.json suite.xml
    fi
fi

if [ "$DRY" = 1 ]; then
    limit=${STAGE_LIMIT[$STAGE]}
    if [ "$STAGE" = 1 ]; then
        echo "stage 1: step timeouts sum to ${TOTAL}s (limit ${limit}s)"
        [ "$TOTAL" -le "$limit" ]
    else
        fresh=$(( TOTAL_FRESH + (TOTAL_FAIL > TOTAL ? TOTAL_FAIL : TOTAL) ))
        echo "stage 2: failed branch ${TOTAL_FAIL}s, passed branch ${TOTAL}s, after a rerun of the tests ${fresh}s" \
             "(limit ${limit}s; the rerun case is bounded by 600s, one call)"
        [ "$TOTAL_FAIL" -le "$limit" ] && [ "$TOTAL" -le "$limit" ] && [ "$fresh" -le 600 ]
    fi
    exit $?
fi
echo
cat "$WORK/summary.md"
echo "stage $STAGE done in ${SECONDS}s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
