#!/usr/bin/env bash
# The CPU kernels of the best ISA this machine has against FFNSKIP_CPU_ISA=avx2, in processes
# that alternate (a process per measurement: the ISA is chosen when the module loads).
# Usage: benchmarks/bench_cpu_isa.sh [ALTERNATIONS] [MODEL:DTYPE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
alternations=${1:-3}
shift || true
specs=("$@")
if [ ${#specs[@]} -eq 0 ]; then
  specs=(smollm2-135m:auto smollm2-135m:bfloat16 smollm2-135m:float32 qwen2.5-coder-1.5b:auto)
fi
for spec in "${specs[@]}"; do
  model=${spec%%:*} dtype=${spec#*:}
  for alt in $(seq "$alternations"); do
    for isa in native avx2; do
      if [ "$isa" = avx2 ]; then export FFNSKIP_CPU_ISA=avx2; else unset FFNSKIP_CPU_ISA; fi
      line=$(python benchmarks/bench_cpu_compare.py --model "$model" --dtype "$dtype" \
               --engines ffnskip --rounds 2 --threads 2 2>&1 |
             grep -E "^ffnskip_ext  |CPU kernels" | tr '\n' ' ')
      echo "$model $dtype alt$alt $isa | $line"
    done
  done
done
