#!/usr/bin/env bash
# Verify a GPU install of the project, end to end, in about 11 minutes on an H100/H200:
#
#     bash tests/gpu_check.sh LOGDIR [BUDGET_SECONDS]
#
# Every step has its own timeout and writes LOGDIR/<step>.log; LOGDIR/summary.txt gets one line per
# step (exit status, seconds) and the figures that matter. The steps, in order:
#   env        nvidia-smi, nvcc, torch / CUDA versions, ninja, compute-sanitizer
#   build      kernels.cu from a clean build/kernels/, timed, and the one-time probe on this GPU
#   tests      the whole suite (the GPU tier of tests/test_kernels.py must run, not skip)   } side by
#   paths      tests/gpu_check_paths.py: every dispatch path on a side stream, masked tokens  } side: no
#   memcheck   compute-sanitizer on a few kernel tests                                        } timing
#   racecheck  likewise                                                                       } here
#   fused      bench.py --fused: route + gate-GELU-mask alone, kernels vs eager PyTorch
#   default    python train.py, the offline default, into LOGDIR/default: wall time, exact match
#   layer      bench.py: the MoE layer's paths, N 128..32768, E 8 and 16 (without torch.compile: with
#              it, this step did not finish in 2 minutes on an H200)
#   gpt2_eager a GPT-2-124M-shaped PESC run from random weights, 50 steps: tokens/s, MFU, peak memory
#   train_step bench.py --train_step
#   gpt2_compile  the same GPT-2-shaped run under torch.compile (~2 minutes of compiling on an H200)
# The timed steps run one at a time, after the others. A step is skipped, saying so, when less than
# its minimum time is left of the budget (default 660 s from the start); its timeout is cut to what
# is left. An earlier run's files in LOGDIR are removed first. LOGDIR also receives the runs'
# checkpoints (~0.4 GB for each GPT-2-shaped one); out/ is not touched.
set -u
cd "$(dirname "$0")/.."
LOG="${1:?usage: bash tests/gpu_check.sh LOGDIR [BUDGET_SECONDS]}"
BUDGET="${2:-660}"
mkdir -p "$LOG"
LOG="$(cd "$LOG" && pwd)"
SUMMARY="$LOG/summary.txt"
START=$(date +%s)
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME CAP MIN COMMAND...: runs COMMAND with its output in LOG/NAME.log, under a timeout of CAP
# seconds or what is left of the budget, whichever is less; skipped when less than MIN seconds are
# left (a step that cannot finish would only spend them)
step() {
    local name="$1" cap="$2" min="$3"; shift 3
    rm -f "$LOG/$name.log"                     # never report an earlier run's log as this one's
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$left" -lt "$min" ]; then
        say "$name: skipped, ${left} s of the budget of ${BUDGET} s left (it needs ${min})"
        return 0
    fi
    local limit=$(( cap < left ? cap : left ))
    local t0=$(date +%s)
    # bash -c: the commands are this file's functions (exported below) as well as programs
    timeout --kill-after=5 "$limit" bash -c '"$@"' _ "$@" > "$LOG/$name.log" 2>&1
    local rc=$?
    local took=$(( $(date +%s) - t0 ))
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        say "$name: TIMED OUT after ${took} s (limit ${limit} s)"
    else
        say "$name: exit ${rc}, ${took} s"
    fi
    return 0
}

env_report() {
    nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    nvcc --version | tail -2
    python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability(), 'grouped_mm', hasattr(torch.nn.functional, 'grouped_mm'))"
    python3 -c "import ninja; print('ninja', ninja.__version__)" || which ninja
    compute-sanitizer --version | tail -1
    python3 -c "import xdist; print('pytest-xdist', xdist.__version__)" || true
}

build_kernels() {
    rm -rf build/kernels
    python3 -c "
import time, torch, kernels
t0 = time.time(); kernels.build(); t1 = time.time()
ok = kernels.available()
print(f'kernels.cu: build {t1 - t0:.1f} s, probe on {torch.cuda.get_device_name()}: {\"passed\" if ok else \"FAILED\"}')
raise SystemExit(0 if ok else 1)"
}

run_tests() {
    local parallel=()
    python3 -c "import xdist" 2>/dev/null && parallel=(-n 8)
    python3 -m pytest -q -rs --durations=10 "${parallel[@]}" tests
}

sanitize() {   # $1: memcheck or racecheck; three kernel tests: the router, the gate step in bf16, a layer step
    # without PyTorch's caching allocator, so that an access past a tensor is past its allocation too
    local t=tests/test_kernels.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$1" --error-exitcode 1 --print-limit 20 \
        python3 -m pytest -q -p no:cacheprovider \
        "$t::test_route_kernel_matches_reference[8-2]" "$t::test_gate_gelu_mask_kernel_matches_reference[dtype1-8-2-64]" \
        "$t::test_pesc_layer_training_step_matches_pytorch_path[True]"
}

default_run() {   # python train.py as a user runs it, its files in LOGDIR (out/ is left alone)
    python3 train.py --out_dir="$LOG/default" --base_ckpt="$LOG/default/base.pt"
}

gpt2_shaped() {   # $1: compile True/False. GPT-2 124M's body (12 x 768, 12 heads) with the byte vocabulary
    python3 train.py --init_from=scratch --pretrain_iters=1 --n_layer=12 --n_head=12 --n_embd=768 \
        --block_size=128 --batch_size=64 --max_iters=50 --log_interval=5 --eval_interval=1000 --n_val=32 \
        --n_samples=0 --adapter_dim=64 --lora_rank=8 --torch_compile="$1" \
        --out_dir="$LOG/gpt2_compile_$1" --base_ckpt="$LOG/gpt2_compile_$1/base.pt"
}

export LOG
export -f env_report build_kernels run_tests sanitize default_run gpt2_shaped
rm -rf "$LOG/default" "$LOG"/gpt2_compile_*    # an earlier run's results must not be read as this one's

say "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET} s, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
step env 30 15 env_report
step build 240 60 build_kernels
grep -h "kernels.cu:" "$LOG/build.log" 2>/dev/null | tee -a "$SUMMARY"

# correctness, side by side (nothing here is timed)
step tests 180 60 run_tests &
step paths 150 30 python3 tests/gpu_check_paths.py --out "$LOG/paths.json" &
step memcheck 150 30 sanitize memcheck &
step racecheck 150 30 sanitize racecheck &
wait
tail -1 "$LOG/tests.log" 2>/dev/null | tee -a "$SUMMARY"
grep -h "skipped\|SKIPPED" "$LOG/tests.log" 2>/dev/null | head -5 | tee -a "$SUMMARY"
grep -h "path runs\|^FAIL" "$LOG/paths.log" 2>/dev/null | tee -a "$SUMMARY"
grep -h "ERROR SUMMARY\|RACECHECK SUMMARY\|passed\|failed" "$LOG/memcheck.log" "$LOG/racecheck.log" 2>/dev/null | tee -a "$SUMMARY"

# timed, one at a time
step fused 60 20 python3 bench.py --fused --n 512,2048,8192,32768 --experts 8,16 --runs 20 --out "$LOG/fused.json"
grep -h "E=" "$LOG/fused.log" 2>/dev/null | tee -a "$SUMMARY"
step default 150 100 default_run
grep -h "moe: dispatch\|average\|held-out response loss:\|total wall time" "$LOG/default.log" 2>/dev/null | tee -a "$SUMMARY"
step layer 90 30 python3 bench.py --n 128,512,2048,8192,32768 --experts 8,16 --runs 10 --warmup 3 --no-compile \
    --out "$LOG/layer.json"
grep -h "^| " "$LOG/layer.log" 2>/dev/null | tee -a "$SUMMARY"
step gpt2_eager 90 60 gpt2_shaped False
step train_step 60 30 python3 bench.py --train_step --runs 10
grep -h "^| \|vs one adapter:" "$LOG/train_step.log" 2>/dev/null | tee -a "$SUMMARY"
step gpt2_compile 200 150 gpt2_shaped True
for c in False True; do
    [ -f "$LOG/gpt2_compile_$c/result.json" ] || continue
    python3 -c "
import json, sys
r = json.load(open(sys.argv[1]))
rate = '? tokens/s' if r.get('tokens_per_s') is None else f'{r[\"tokens_per_s\"]:,.0f} tokens/s'
mfu = 'MFU ?' if r.get('mfu') is None else f'MFU {100 * r[\"mfu\"]:.1f} %'
print(f'gpt2-shaped, compile={sys.argv[2]}: step {1e3 * r[\"step_time_s\"]:.1f} ms, {rate}, {mfu}, '
      f'peak memory {r[\"peak_memory_bytes\"] / 2**30:.2f} GiB')
" "$LOG/gpt2_compile_$c/result.json" "$c" 2>&1 | tail -1 | tee -a "$SUMMARY"
done
say "gpu_check done in $(( $(date +%s) - START )) s"
