#!/usr/bin/env bash
# One script for the GPU test machine: build the extension there, test, sanitize, benchmark; logs + JSON in $OUT.
#
#   bash bench/device_check.sh                         # all sections, about 5-7 minutes on one H100
#   SECTIONS="build test_cuda" bash bench/device_check.sh
#
# Environment:
#   OUT                   output folder (default ./device_out); files directly in it, names [A-Za-z0-9._-] only
#   SECTIONS              sections to run, in order (default: all of ALL_SECTIONS below)
#   DEADLINE              seconds for the whole run (default 540): a section gets at most what is left, and is
#                         skipped when under 20 s remain, so the summary always prints before a 600 s kill
#   PYTHON                interpreter (default python3)
#   TORCH_CUDA_ARCH_LIST  archs to build (default 9.0: this GPU only, half the compile of "8.0;9.0")
# Every section writes $OUT/<section>.log and a line in $OUT/summary.tsv; a failing section does not stop the others.
# The last thing printed (and $OUT/summary.txt) is a short table.
#
# To add a section: write a function section_<name> (stdout/stderr go to $OUT/<name>.log, its exit status is the
# verdict; it runs from the repository root), add <name> to ALL_SECTIONS and a time limit to LIMITS.

set -u
cd "$(dirname "$0")/.."
export OUT=${OUT:-./device_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PY=${PYTHON:-$(command -v python3 || command -v python)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
# The GPU machine has no package registry: if its Python lacks pytest, use a pure-Python copy carried along in
# build/pylibs (pytest, _pytest, py.py, pluggy, iniconfig, packaging, pygments; see docs/kernels.md).
if ! "$PY" -c "import pytest" > /dev/null 2>&1 && [ -d build/pylibs ]; then
  export PYTHONPATH="$PWD/build/pylibs${PYTHONPATH:+:$PYTHONPATH}"
fi

ALL_SECTIONS="env build test_cpu test_cuda sanitize bench_cosine bench_sgd"
declare -A LIMITS=([env]=60 [build]=300 [test_cpu]=150 [test_cuda]=300 [sanitize]=240 [bench_cosine]=240
                   [bench_sgd]=180)

# ---- sections --------------------------------------------------------------------------------------------------------
section_env() {
  nvidia-smi || true
  "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
EOF
  command -v nvcc && nvcc --version | tail -n 2
  command -v compute-sanitizer || echo "compute-sanitizer: not on PATH"
  "$PY" -c "import pytest; print('pytest', pytest.__version__, pytest.__file__)" || echo "pytest: MISSING"
  command -v ninja || echo "ninja: not on PATH"
  nproc
  free -g | head -n 2
}

section_build() {
  # In place, no pip install into the machine's Python: mnemonics_fast/_C*.so lands next to the sources.
  rm -f mnemonics_fast/_C*.so
  local t0=$SECONDS
  "$PY" setup.py build_ext --inplace || return 1
  echo "build seconds: $((SECONDS - t0))"
  "$PY" -m mnemonics_fast.info || return 1
  "$PY" -c "import mnemonics_fast.ops as o, sys; sys.exit(0 if o.kernels_available() else 1)"
}

section_test_cpu() {
  "$PY" -m pytest -q -p no:cacheprovider -rf tests/test_ops.py --junitxml="$OUT/junit_test_cpu.xml"
}

section_test_cuda() {
  # With pytest-xdist (the GPU image has it) a test that crashes the interpreter (seen: a segfault on 2026-11-26)
  # only loses its worker: the run goes on and the report names the crashed test. -rfE lists every failure.
  local xdist=()
  "$PY" -c "import xdist" > /dev/null 2>&1 && xdist=(-n 2)
  "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" -rfE --durations=10 tests/test_ops_cuda.py \
    --junitxml="$OUT/junit_test_cuda.xml"
}

section_sanitize() {
  local cs rc=0 tool pids=()
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  [ -x "$cs" ] || { echo "compute-sanitizer not found"; return 1; }
  # both tools at once (two processes on the GPU): most of their time is start-up under instrumentation.
  # No caching allocator: every tensor is its own allocation, so accesses past its end are caught.
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool "$tool" --error-exitcode 9 "$PY" bench/sanitize_ops.py \
      --tool "$tool" > "$OUT/sanitize_$tool.log" 2>&1 &
    pids+=($!)
  done
  for i in 0 1; do
    wait "${pids[$i]}" || rc=1
  done
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool (full log: sanitize_$tool.log)"
    tail -n 4 "$OUT/sanitize_$tool.log"
  done
  return $rc
}

section_bench_cosine() {
  "$PY" bench/bench_cosine_linear.py --quick --out "$OUT"
}

section_bench_sgd() {
  "$PY" bench/bench_exemplar_sgd.py --quick --out "$OUT"
}

# ---- driver ----------------------------------------------------------------------------------------------------------
if [ "${1:-}" = "--one" ]; then  # single-section mode, used below so that `timeout` can bound a section
  "section_$2"
  exit $?
fi

SECTIONS=${SECTIONS:-$ALL_SECTIONS}
DEADLINE=${DEADLINE:-540}
SUMMARY="$OUT/summary.tsv"
: > "$SUMMARY"
echo "device_check: OUT=$OUT SECTIONS=\"$SECTIONS\" DEADLINE=${DEADLINE}s TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

for name in $SECTIONS; do
  log="$OUT/$name.log"
  start=$SECONDS
  if ! declare -F "section_$name" > /dev/null; then
    printf '%s\t%s\t%s\n' "$name" "UNKNOWN-SECTION" 0 >> "$SUMMARY"
    continue
  fi
  left=$((DEADLINE - SECONDS))
  limit=${LIMITS[$name]:-240}
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    printf '%s\t%s\t%s\n' "$name" "SKIPPED(no-time)" 0 >> "$SUMMARY"
    echo "== $name: skipped, ${left}s left"
    continue
  fi
  echo "== $name (limit ${limit}s) -> $log"
  timeout --kill-after=10 "$limit" bash "$0" --one "$name" > "$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT(${limit}s)" ;;
    *) status="FAIL(rc=$rc)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$SUMMARY"
  echo "   $status in $((SECONDS - start))s"
  [ "$status" = ok ] || tail -n 15 "$log" | sed 's/^/   | /'
done

# ---- short table, last -----------------------------------------------------------------------------------------------
"$PY" - "$OUT" <<'EOF' 2>&1 | tee "$OUT/summary.txt"
import glob, json, os, sys
out = sys.argv[1]
print("\n==== device_check summary ====")
for line in open(os.path.join(out, "summary.tsv")):
    name, status, secs = line.rstrip("\n").split("\t")
    print(f"  {name:<14} {status:<18} {secs:>5}s")
keep = {"eager reference", "torch.compile(reference)", "CUDA graph of eager reference", "ours (auto)",
        "ours (auto), CUDA graph", "torch._foreach_*", "torch.compile(update)", "ours"}
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    try:
        data = json.load(open(path))
    except ValueError:
        continue
    if "copy" in data:
        print(f"\n  {os.path.basename(path)}  (device copy {data['copy']['gbps']:.0f} GB/s)")
    else:
        print(f"\n  {os.path.basename(path)}")
    for row in data.get("table", []):
        if row[2] in keep:
            print("   " + " | ".join(str(c) for c in row if c != ""))
EOF
