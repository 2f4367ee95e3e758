#!/usr/bin/env bash
# The DALI checks on the GPU machine (issue #5), run after DALI was shipped there in chunks:
#
#   ../shared/tools/dali_chunks.sh                     # here: makes .dali1 .. .daliN (git-ignored)
#   device call k < N, carry [.daliK]:  mkdir -p /tmp/stash && cp .daliK/part* /tmp/stash/
#   device call N,     carry [.daliN]:  mkdir -p /tmp/stash && cp .daliN/part* /tmp/stash/ && bash bench/device_dali.sh
#
# (back to back: the machine keeps /tmp only while it stays up). Steps, in priority order, each capped by what is
# left of BUDGET seconds (default 240) so that the results are always packed into $OUT/device_dali.tgz:
#   1. bench/bench_loader.py: DALI mixed vs DALI CPU vs torchvision, beside the ResNet-18 bf16 step rate;
#   2. tests/test_dali.py with the "dali_gpu" (mixed decode, outputs on the GPU) cases;
#   3. the ImageNet file pipeline end to end with DALI mixed on tin100a-32 read as an ImageNet tree (upscaled to 64,
#      ResNet-18, 2 epochs, phases 0 and 1), when part 1 left the data in /tmp/mf_data.
set -u
cd "$(dirname "$0")/.."
export OUT=${OUT:-./device_out}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-/tmp/mf_device_dali}; rm -rf "$WORK"; mkdir -p "$WORK"
PY=${PYTHON:-python3}
T0=$SECONDS; T_END=$((T0 + ${BUDGET:-240}))
stamp() { echo "[device_dali] $((SECONDS - T0))s: $*"; }
step() {  # step SECONDS LOG COMMAND...
  local want=$1 log=$2 left=$((T_END - SECONDS - 15)); shift 2
  [ "$left" -lt "$want" ] && want=$left
  if [ "$want" -lt 10 ]; then echo "skipped, budget spent: $*"; return; fi
  timeout "$want" "$@" > "$log" 2>&1 || echo "rc=$? (limit ${want}s): $*"
}
stamp "unpack DALI"
mkdir -p /tmp/site
[ -d /tmp/site/nvidia/dali ] || cat /tmp/stash/part* | xz -d -T8 | tar xf - -C /tmp/site
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import nvidia.dali as d, torch; print('DALI', d.__version__, '| torch', torch.__version__, '|', torch.cuda.get_device_name())" \
  2>&1 | tee "$WORK/versions.txt"
stamp "bench_loader"
step 110 "$WORK/bench_loader.log" "$PY" bench/bench_loader.py --epochs 10 --out "$WORK/loader.json"
stamp "DALI tests on the GPU (mixed)"
step 60 "$WORK/test_dali.log" "$PY" -m pytest -q -rs -s tests/test_dali.py -p no:cacheprovider
stamp "tin100a-32 as an ImageNet tree, DALI mixed"
DATA=${DATA:-/tmp/mf_data/tin100a-32}
if [ -d "$DATA" ]; then
  step 120 "$WORK/e2e.log" "$PY" -m mnemonics_fast.train --config tin100_10phase "data.root=$DATA" data.loader=dali \
    data.image_size=64 data.resize=73 model.arch=resnet18 train.epochs=2 "train.milestones=[1]" run.stop_after_phase=1 \
    run.progress=false run.tensorboard=false "run.output_dir=$WORK/runs" run.name=dali_e2e
  cp "$WORK/runs/dali_e2e/metrics.json" "$WORK/e2e_metrics.json" 2>/dev/null
  rm -rf "$WORK/runs"
else
  echo "no $DATA: end-to-end run skipped"
fi
stamp "done"
tail -n 14 "$WORK/bench_loader.log"; tail -n 8 "$WORK/test_dali.log"; grep -v "it/s" "$WORK/e2e.log" 2>/dev/null | tail -n 14
tar czf "$OUT/device_dali.tgz" -C "$WORK" . && ls -la "$OUT"
