#!/usr/bin/env bash
# Everything this project checks on a GPU, in two calls that fit one 15-minute device lease (see README "Performance"):
#
#   bash bench/device_all.sh 1   # ~7 min: build, CUDA op tests + compute-sanitizer, op benchmarks, one mnemonics
#                                #         outer step benchmark, phase-0 training throughput (eager vs torch.compile)
#   bash bench/device_all.sh 2   # ~5 min: tin100a-32 real-data runs (mnemonics sweep, the paper's inner step and the
#                                #         unit step mnemonics.inner_update=normalised; random vs herding vs the best of
#                                #         each)
#   bash bench/device_all.sh 3   # ~8 min: the comparison for seeds 1 and 2 (BEST=beta1,alpha[,lr_scale] from part 2;
#                                #         BEST_NORMALISED=beta1,alpha,exemplars adds the unit-step runs), for a
#                                #         later lease: parts 1 + 2 fill one 15-minute lease. With SEEDS=0,1,2 EPOCHS=4
#                                #         BUDGET=560 (default BEST: the CPU sweep's beta1 1, alpha 0.01) it is the
#                                #         three-seed comparison issue #3 asks for, in one call
#   bash bench/device_all.sh 4   # ~5 min (H100, 2026-11-27: 295 s): build, then the mnemonics outer step:
#                                #         compiled+graph+bf16, graph, bf16 and the compiled engine
#                                #         (mnemonics.compile) against a float64 oracle; the autograd-layer A/B; a
#                                #         profile. Steps in priority order, skipped (not cut) when BUDGET runs out
#   bash bench/device_all.sh 5   # ~6 min: build, CUDA op tests and sanitizers (what verified the kernels on the H100,
#                                #         2026-11-27), with a 2-seed tin100a-32 comparison running beside them
#   bash bench/device_all.sh 6   # ~4 min (H100, 2026-11-27: 225 s): build, then the trainer with the kernels vs
#                                #         with the references
#                                #         (MNEMONICS_FAST_FORCE_REFERENCE=1) on tin100a-32, 3 seeds (MN=1: with the
#                                #         exemplar level)
#
# Needs the development set as .devdata/tin100a-32.tar.xz (git-ignored; copy it from ../shared/data) for part 1's
# training benchmark and for part 2. Everything is written under $WORK and packed into $OUT/device_part<N>.tgz
# (the device tool brings back at most 8 files); the short tables are printed last.
set -u
cd "$(dirname "$0")/.."
PART=${1:-1}
export OUT=${OUT:-./device_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-/tmp/mf_device_part$PART}
rm -rf "$WORK"; mkdir -p "$WORK"
export PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # bench/*.py import the package from the checkout
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if ! "$PY" -c "import pytest" > /dev/null 2>&1 && [ -d build/pylibs ]; then
  export PYTHONPATH="$PWD/build/pylibs${PYTHONPATH:+:$PYTHONPATH}"
fi
DATA=${DATA:-/tmp/mf_data/tin100a-32}
if [ ! -d "$DATA" ] && [ -f .devdata/tin100a-32.tar.xz ]; then
  mkdir -p /tmp/mf_data && tar xJf .devdata/tin100a-32.tar.xz -C /tmp/mf_data
fi
T0=$SECONDS
stamp() { echo "[device_all part $PART] $((SECONDS - T0))s: $*"; }

# One device call may run 600 s at most, and the results are packed only at the end. So every step's time limit is
# capped by what is left of BUDGET (default 575 s: set it to the call's timeout_s minus 25), keeping 20 s for the pack,
# and a step is skipped when under 10 s would be left for it.
T_END=$((T0 + ${BUDGET:-575}))
cap() { local want=$1 left=$((T_END - SECONDS - 20)); [ "$left" -lt "$want" ] && want=$left; echo "$want"; }
step() {  # step SECONDS LOG COMMAND...: run COMMAND with at most SECONDS (capped), output to LOG
  local t; t=$(cap "$1"); local log=$2; shift 2
  if [ $((T_END - SECONDS - 20)) -lt 10 ]; then echo "skipped, device time budget spent: $*"; return; fi
  timeout "$t" "$@" > "$log" 2>&1 || echo "rc=$? (limit ${t}s): $*"
}
# Steps parts 1 and 4 share.
cosine_autograd_step() {
  stamp "cosine_linear autograd: C++ vs Python twin (eager host cost)"
  step 40 "$WORK/cosine_autograd.log" "$PY" bench/bench_cosine_autograd.py --out "$WORK/cosine_autograd.json"
}
profile_step() {  # profile_step SECONDS
  stamp "profile of one mnemonics outer step (which kernels)"
  step "$1" "$WORK/profile_mnemonics.log" "$PY" bench/profile_mnemonics_step.py --out "$WORK/profile_mnemonics.txt"
}

if [ "$PART" = 1 ]; then
  # Order = priority: the op benchmarks (quiet GPU) and the CUDA correctness checks first, then the rest.
  stamp "build + op benchmarks on a quiet GPU"
  OUT="$WORK" SECTIONS="env build bench_cosine bench_sgd" DEADLINE=$(cap 230) bash bench/device_check.sh \
    > "$WORK/check_a.txt" 2>&1
  cp "$WORK/summary.txt" "$WORK/summary_a.txt" 2>/dev/null
  stamp "CUDA op tests + compute-sanitizer"
  mkdir -p "$WORK/check_b"
  OUT="$WORK/check_b" SECTIONS="test_cuda sanitize" DEADLINE=$(cap 200) bash bench/device_check.sh \
    > "$WORK/check_b.txt" 2>&1
  cosine_autograd_step
  stamp "mnemonics outer step benchmark"
  step 130 "$WORK/bench_mnemonics.log" "$PY" bench/bench_mnemonics.py --sizes 100,1000 --steps 1,5 --modes full,head \
    --repeats 5 --warmup 2 --out "$WORK/bench_mnemonics.json"
  stamp "training throughput: eager vs train.compile, fp32 vs bf16 (resident; dataloader rows measured before)"
  step 200 "$WORK/bench_train.log" "$PY" bench/bench_train.py --root "$DATA" --steps 30 --warmup 4 --paths resident \
    --dtypes fp32,bf16 --compile none,default,reduce-overhead --out "$WORK/bench_train.json"
  profile_step 60
  stamp "done"
  tail -n 6 "$WORK/cosine_autograd.log" 2>/dev/null
  tail -n 40 "$WORK/bench_mnemonics.log" 2>/dev/null
  tail -n 8 "$WORK/bench_train.log" 2>/dev/null
  cat "$WORK/summary_a.txt" 2>/dev/null | head -n 60
  cat "$WORK/check_b/summary.txt" 2>/dev/null | head -n 10
  grep -E "passed|failed|error" "$WORK/check_b/test_cuda.log" 2>/dev/null | tail -n 5
elif [ "$PART" = 4 ]; then
  # The kernels were verified on 2026-11-27 (part 5); this part only builds them, then times the exemplar level.
  stamp "build"
  OUT="$WORK" SECTIONS="env build" DEADLINE=$(cap 130) bash bench/device_check.sh > "$WORK/check.txt" 2>&1
  stamp "mnemonics outer step (M=100, T=1, full): graph, bf16 and the compiled engine, each against a float64 oracle"
  # one process. Each compiled variant's first call compiles (~100 s on the H100; bf16 is a separate compilation,
  # +graph reuses the plain one): the two not measured on a GPU before (compiled+graph+bf16, and the float64 oracle
  # column of a compiled variant) come first, so a time limit cuts the others
  step 230 "$WORK/bench_mnemonics.log" "$PY" bench/bench_mnemonics.py --sizes 100 --steps 1 --modes full \
    --variants "${VARIANTS:-naive,compiled+graph+bf16,compiled+graph,graph,graph+bf16,compiled,compiled+ro}" \
    --repeats 10 --warmup 3 --out "$WORK/bench_mnemonics.json"
  cosine_autograd_step
  profile_step 40
  stamp "done"
  tail -n 4 "$WORK/cosine_autograd.log" 2>/dev/null
  tail -n 12 "$WORK/bench_mnemonics.log" 2>/dev/null
  cat "$WORK/summary.txt" 2>/dev/null | head -n 6
elif [ "$PART" = 5 ]; then
  # After the 2026-11-27 H100 run of part 4 (3 bad-input cases segfaulted: integers streamed into TORCH_CHECK from the
  # .cu files). The tin100a-32 comparison runs in the background beside the tests (accuracy only; its wall times are
  # shared-GPU times), so one short call holds both.
  stamp "build"
  OUT="$WORK" SECTIONS="env build" DEADLINE=$(cap 130) bash bench/device_check.sh > "$WORK/check_build.txt" 2>&1
  cp "$WORK/summary.txt" "$WORK/summary_build.txt" 2>/dev/null
  stamp "tin100a-32: random vs herding vs mnemonics (BEST=${BEST:-0.05,0.01,exemplars}, seeds ${SEEDS:-0,1}), background"
  timeout "$(cap 560)" "$PY" bench/tin100_experiments.py --root "$DATA" --runs "$WORK/runs" --out "$WORK/tin100.json" \
    --logs "$WORK/logs" --epochs "${EPOCHS:-4}" --skip-sweep --best "${BEST:-0.05,0.01,exemplars}" \
    --seeds "${SEEDS:-0,1}" --extra mnemonics.cuda_graph=true > "$WORK/tin100.log" 2>&1 &
  TIN=$!
  stamp "CUDA op tests + compute-sanitizer, beside it"
  mkdir -p "$WORK/check"
  OUT="$WORK/check" SECTIONS="test_cuda sanitize" DEADLINE=$(cap 170) bash bench/device_check.sh \
    > "$WORK/check.txt" 2>&1
  stamp "ResNet-18 224x224 step: peak memory unrolled vs chunked (shared GPU: memory only)"
  step 60 "$WORK/bench_mnemonics_224.log" "$PY" bench/bench_mnemonics.py --arch resnet18 --image 224 --sizes 100 \
    --steps 1 --modes full --variants eager,eager+chunk --chunk 25 --query 64 --repeats 2 --warmup 1 \
    --out "$WORK/bench_mnemonics_224.json"
  stamp "waiting for tin100"
  wait "$TIN" || echo "tin100: rc=$?"
  stamp "done"
  rm -rf "$WORK"/runs/*/checkpoints "$WORK"/runs/*/tensorboard
  tail -n 12 "$WORK/tin100.log"
  tail -n 4 "$WORK/bench_mnemonics_224.log" 2>/dev/null
  cat "$WORK/check/summary.txt" 2>/dev/null | head -n 8
  grep -E "passed|failed|error" "$WORK/check/test_cuda.log" 2>/dev/null | tail -n 8
  grep -E "SUMMARY|all launch paths" "$WORK/check/sanitize.log" 2>/dev/null
elif [ "$PART" = 6 ]; then
  # #4's last check: the trainer with the kernels vs with MNEMONICS_FAST_FORCE_REFERENCE=1, same seeds, all at once
  stamp "build"
  OUT="$WORK" SECTIONS="env build" DEADLINE=$(cap 130) bash bench/device_check.sh > "$WORK/check.txt" 2>&1
  stamp "trainer A/B: kernels vs references, tin100a-32, seeds ${SEEDS:-0,1,2}${MN:+, with the exemplar level}"
  step 560 "$WORK/kernels_ab.log" "$PY" bench/kernels_ab_train.py --root "$DATA" --runs "$WORK/runs" \
    --out "$WORK/kernels_ab.json" --logs "$WORK/logs" --epochs "${EPOCHS:-4}" --seeds "${SEEDS:-0,1,2}" \
    ${MN:+--mnemonics --overrides mnemonics.cuda_graph=true}
  stamp "done"
  rm -rf "$WORK"/runs/*/checkpoints "$WORK"/runs/*/tensorboard
  tail -n 8 "$WORK/kernels_ab.log"
elif [ "$PART" = 3 ]; then
  stamp "tin100a-32 comparison, more seeds (BEST=beta1,alpha[,lr_scale] from part 2)"
  step 560 "$WORK/tin100_seeds.log" "$PY" bench/tin100_experiments.py --root "$DATA" --runs "$WORK/runs" \
    --out "$WORK/tin100_seeds.json" --logs "$WORK/logs" --epochs "${EPOCHS:-10}" --skip-sweep --best "${BEST:-1,0.01}" \
    --seeds "${SEEDS:-1,2}" ${BEST_NORMALISED:+--best-normalised "$BEST_NORMALISED"} --extra mnemonics.cuda_graph=true
  stamp "done"
  rm -rf "$WORK"/runs/*/checkpoints "$WORK"/runs/*/tensorboard
  tail -n 12 "$WORK/tin100_seeds.log"
else
  stamp "tin100a-32 experiments"
  step 500 "$WORK/tin100.log" "$PY" bench/tin100_experiments.py --root "$DATA" --runs "$WORK/runs" \
    --out "$WORK/tin100.json" --logs "$WORK/logs" --epochs "${EPOCHS:-10}" --lrs "${LRS:-0.3,1}" \
    --inner-lrs "${ALPHAS:-0.01}" --scaled-lrs "${SCALED_LRS:-0.01}" \
    --normalised-lrs "${NORMALISED_LRS:-0.03,0.1}" --normalised-alphas "${NORMALISED_ALPHAS:-0.02}" \
    --extra mnemonics.cuda_graph=true
  stamp "done"
  rm -rf "$WORK"/runs/*/checkpoints "$WORK"/runs/*/tensorboard
  cat "$WORK/tin100.log" | tail -n 30
fi
tar czf "$OUT/device_part$PART.tgz" -C "$WORK" . && ls -la "$OUT"
