#!/usr/bin/env bash
# Everything this project checks on a GPU, in two calls that fit one 15-minute device lease (see README "Performance"):
#
#   bash bench/device_all.sh 1   # ~7 min: build, CUDA op tests + compute-sanitizer, op benchmarks, one mnemonics
#                                #         outer step benchmark, phase-0 training throughput (eager vs torch.compile)
#   bash bench/device_all.sh 2   # ~5 min: tin100a-32 real-data runs (mnemonics sweep; random vs herding vs mnemonics)
#   bash bench/device_all.sh 3   # ~8 min: the comparison for seeds 1 and 2 (BEST=beta1,alpha[,lr_scale] from part 2), for a
#                                #         later lease: parts 1 + 2 fill one 15-minute lease
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
WORK=/tmp/mf_device_part$PART
rm -rf "$WORK"; mkdir -p "$WORK"
export PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # bench/*.py import the package from the checkout
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if ! "$PY" -c "import pytest" > /dev/null 2>&1 && [ -d build/pylibs ]; then
  export PYTHONPATH="$PWD/build/pylibs${PYTHONPATH:+:$PYTHONPATH}"
fi
DATA=/tmp/mf_data/tin100a-32
if [ ! -d "$DATA" ] && [ -f .devdata/tin100a-32.tar.xz ]; then
  mkdir -p /tmp/mf_data && tar xJf .devdata/tin100a-32.tar.xz -C /tmp/mf_data
fi
T0=$SECONDS
stamp() { echo "[device_all part $PART] $((SECONDS - T0))s: $*"; }

if [ "$PART" = 1 ]; then
  stamp "build + op benchmarks on a quiet GPU"
  OUT="$WORK" SECTIONS="env build bench_cosine bench_sgd" DEADLINE=230 bash bench/device_check.sh > "$WORK/check_a.txt" 2>&1
  cp "$WORK/summary.txt" "$WORK/summary_a.txt" 2>/dev/null
  stamp "cosine_linear autograd: C++ vs Python twin (eager host cost)"
  timeout 40 "$PY" bench/bench_cosine_autograd.py --out "$WORK/cosine_autograd.json" > "$WORK/cosine_autograd.log" 2>&1 \
    || echo "bench_cosine_autograd rc=$?"
  stamp "mnemonics outer step benchmark"
  timeout 130 "$PY" bench/bench_mnemonics.py --sizes 100,1000 --steps 1,5 --modes full,head --repeats 5 --warmup 2 \
    --out "$WORK/bench_mnemonics.json" > "$WORK/bench_mnemonics.log" 2>&1 || echo "bench_mnemonics rc=$?"
  stamp "profile of one mnemonics outer step (which kernels)"
  timeout 60 "$PY" bench/profile_mnemonics_step.py --out "$WORK/profile_mnemonics.txt" > /dev/null 2>&1 \
    || echo "profile_mnemonics_step rc=$?"
  stamp "training throughput benchmark: eager vs train.compile, fp32 vs bf16 (resident; dataloader rows measured before)"
  timeout 200 "$PY" bench/bench_train.py --root "$DATA" --steps 30 --warmup 4 --paths resident --dtypes fp32,bf16 \
    --compile none,default,reduce-overhead --out "$WORK/bench_train.json" > "$WORK/bench_train.log" 2>&1 \
    || echo "bench_train rc=$?"
  stamp "CUDA op tests + compute-sanitizer (correctness; timings above were taken before)"
  mkdir -p "$WORK/check_b"
  OUT="$WORK/check_b" SECTIONS="test_cuda sanitize" DEADLINE=200 bash bench/device_check.sh > "$WORK/check_b.txt" 2>&1
  stamp "done"
  tail -n 6 "$WORK/cosine_autograd.log"
  tail -n 40 "$WORK/bench_mnemonics.log"
  tail -n 6 "$WORK/bench_train.log"
  cat "$WORK/summary_a.txt" 2>/dev/null | head -n 60
  cat "$WORK/check_b/summary.txt" 2>/dev/null | head -n 10
  grep -E "passed|failed|error" "$WORK/check_b/test_cuda.log" | tail -n 5
elif [ "$PART" = 3 ]; then
  stamp "tin100a-32 comparison, more seeds (BEST=beta1,alpha[,lr_scale] from part 2)"
  timeout 560 "$PY" bench/tin100_experiments.py --root "$DATA" --runs "$WORK/runs" --out "$WORK/tin100_seeds.json" \
    --logs "$WORK/logs" --epochs "${EPOCHS:-10}" --skip-sweep --best "${BEST:-1,0.01}" --seeds "${SEEDS:-1,2}" \
    --extra mnemonics.cuda_graph=true > "$WORK/tin100_seeds.log" 2>&1 || echo "tin100 seeds rc=$?"
  stamp "done"
  rm -rf "$WORK"/runs/*/checkpoints "$WORK"/runs/*/tensorboard
  tail -n 12 "$WORK/tin100_seeds.log"
else
  stamp "tin100a-32 experiments"
  timeout 500 "$PY" bench/tin100_experiments.py --root "$DATA" --runs "$WORK/runs" --out "$WORK/tin100.json" \
    --logs "$WORK/logs" --epochs "${EPOCHS:-10}" --lrs "${LRS:-0.3,1,3}" --inner-lrs "${ALPHAS:-0.01}" \
    --scaled-lrs "${SCALED_LRS:-0.01}" \
    --extra mnemonics.cuda_graph=true > "$WORK/tin100.log" 2>&1 || echo "tin100 rc=$?"
  stamp "done"
  rm -rf "$WORK"/runs/*/checkpoints "$WORK"/runs/*/tensorboard
  cat "$WORK/tin100.log" | tail -n 30
fi
tar czf "$OUT/device_part$PART.tgz" -C "$WORK" . && ls -la "$OUT"
