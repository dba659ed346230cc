#!/usr/bin/env bash
# The GPU check of the CUDA backend in one command, sized for the lent machine (one H200, 16
# cores, no network, at most 10 minutes a command): tiers of time-boxed steps, at most 7
# minutes in all, writing summary.json and gpu_check.log into OUTDIR as they go (a kill at the
# limit still leaves what ran; at most 8 files may come back). scripts/gpu_check.py holds the
# steps and says what each tier runs.
#
#   scripts/gpu_check.sh OUTDIR [--dry-run] [--build-dir DIR] [--wheels DIR] [--total-s S]
#
# --dry-run echoes every command instead of running it: no GPU, nvidia-smi or nvcc needed (CI
# runs it, tests/test_gpu_check.py). The build goes to /tmp/ffnskip_gpu_build, outside the tree.
#
# Wheels to carry: the machine has no network and lacks only gguf among the package's runtime
# dependencies (its own needs, numpy, pyyaml, requests and tqdm, are there; the device tool's
# package list). Once, in the tree's root, where there is an index:
#
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps gguf==0.19.0 -d .whl
#
# The single device command (the device tool's `run`; .whl is installed into the build's
# package folder, without an index, before the build):
#
#   run(command="bash scripts/gpu_check.sh $OUT", carry=[".whl"], timeout_s=480)
#
# SmolLM2's 98 MB package does not travel: its tests skip there.
# Environment: PYTHON (python3), the interpreter that runs the driver, the tests and the build.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
