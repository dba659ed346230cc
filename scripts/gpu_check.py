"""The GPU check of the CUDA backend, sized for a lent machine (one H200, 16 cores, no network,
a few minutes): three tiers of time-boxed steps, everything written into OUTDIR as it goes, so
that a kill at the machine's limit still leaves what ran. scripts/gpu_check.sh documents the
device command and the wheels to carry.

OUTDIR receives two files (at most 8 are allowed there, the most that comes back):
  summary.json   rewritten after every step: the commit and the sources' hash (the device's copy
                 of the tree may lack .git; --source-hash prints the hash of a checkout), the
                 machine, each step's status, time, exit status and parsed results (pytest's
                 counts, bench_decode's table), and the overall status: "running" until the
                 end, then "passed", "failed" or "incomplete" (nothing failed, but time ran
                 out before some steps)
  gpu_check.log  every step's output, one after another under a header line

Tier 1 (at most 180 s): machine info, the CUDA build with every core, the per-kernel CUDA tests
and the CUDA model tests on tiny random models. Tier 2 (at most 180 s): bench_decode on
LLaMA-2-7B and LLaMA-3-8B shapes in fp16 and bf16 (dense, static FFN skip of 10-30%, the
FFNSkipPolicy(threshold=1.0) gating overhead, device-to-device copy bandwidth, kernels per
token). Tier 3 (what is left of 420 s): where a test crashed its process, the first such test
again under cuda-gdb for its C++ stacks; bench_decode over quantised blocks, bench_gemv (the
GEMV kernels alone), compute-sanitizer's memcheck on a subset of the kernel tests, the
transformers comparison.

--dry-run replaces every command by an echo of it (no GPU, nvidia-smi or nvcc needed) and
goes through the same tiers, time limits, log and summary: CI runs it (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = "summary.json"
LOG = "gpu_check.log"
MAX_OUT_FILES = 8  # what the device tool brings back from its output folder
TOTAL_S = 420
TIER_S = {1: 180, 2: 180}  # tier 3 has what is left of TOTAL_S
MIN_STEP_S = 5  # a step that would get less is skipped, not started
KILL_GRACE_S = 5

# What the steps read from the tree: a missing or renamed one fails the dry run too.
KERNEL_TESTS = "tests/test_cuda_kernels.py"
MODEL_TESTS = "tests/test_cuda.py"
HF_BENCH = "benchmarks/bench_cuda_vs_hf.py"
BENCH_DECODE_SOURCE = "benchmarks/bench_decode.cpp"
REQUIRED_FILES = (KERNEL_TESTS, MODEL_TESTS, HF_BENCH, BENCH_DECODE_SOURCE, "CMakeLists.txt")

DECODE_POLICIES = "dense,static:0.1,static:0.2,static:0.3,ffnskip-never"
DECODE_SHAPES = [(preset, dtype) for preset in ("llama2-7b", "llama3-8b")
                 for dtype in ("fp16", "bf16")]
QUANTIZED_WEIGHTS = ("q4_k", "q8_0")

Parser = Callable[[str], dict[str, Any]]


def parse_pytest(output: str) -> dict[str, Any]:
    """pytest's closing counts ("3 failed, 40 passed, 2 skipped in 5.1s") and the failed tests."""
    counts: dict[str, Any] = {}
    for line in reversed(output.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)",
                           line)
        if found and re.search(r"\bin [\d.]+s", line):
            counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n)
                      for n, kind in found}
            break
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)
    crashed = crashed_tests(output)
    result: dict[str, Any] = {"counts": counts, "failed_tests": failed[:50]} if (
        counts or failed) else {}
    return {**result, "crashed_tests": crashed} if crashed else result


def crashed_tests(output: str) -> list[str]:
    """The tests whose process died: pytest-xdist names each ("worker 'gw1' crashed while
    running 'NODE'"); without workers, faulthandler's stack names the test function (the
    innermost frame in a tests/ file)."""
    nodes = re.findall(r"worker '\w+' crashed while running '([^']+)'", output)
    if not nodes and "Fatal Python error" in output:
        frames = re.findall(r'File "[^"]*?/(tests/test_\w+\.py)", line \d+ in (test_\w+)', output)
        nodes = [f"{path}::{test}" for path, test in frames[:1]]
    return list(dict.fromkeys(nodes))


def backtrace_command(python: str, tests: str) -> list[str]:
    """cuda-gdb running tests (a file or one test) to the first crash, then printing every
    thread's stack."""
    return ["cuda-gdb", "-batch", "-ex", "set pagination off", "-ex", "run",
            "-ex", "thread apply all bt 30", "--args", python, "-m", "pytest", "-q", "-x",
            "-p", "no:cacheprovider", tests]


def parse_bench_decode(output: str) -> dict[str, Any]:
    """bench_decode's header fields (gpu, d2d_copy) and its table, one dict per policy row."""
    result: dict[str, Any] = {}
    copy = re.search(r"d2d_copy=([\d.]+) GB/s", output)
    if copy:
        result["d2d_copy_gbs"] = float(copy.group(1))
    gpu = re.search(r"^gpu=(.*?) cuda_runtime=", output, flags=re.MULTILINE)
    if gpu:
        result["gpu"] = gpu.group(1)
    lines = output.splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith("policy ")), None)
    if header is None:
        return result
    columns = lines[header].split()
    rows = []
    for line in lines[header + 1:]:
        cells = line.split()
        if len(cells) < len(columns) - 1 or not re.fullmatch(r"[\d.]+", cells[1]):
            break
        row: dict[str, Any] = {"policy": cells[0]}
        for name, cell in zip(columns[1:], cells[1:], strict=False):
            value = cell.rstrip("%x")
            row[name] = float(value) if re.fullmatch(r"-?[\d.]+", value) else cell
        rows.append(row)
    result["rows"] = rows
    return result


def parse_hf(output: str) -> dict[str, Any]:
    """bench_cuda_vs_hf.py's table: "ENGINE NAME  tokens/s  ms/token  vs-eager x" per engine."""
    rates = re.findall(r"^(\S.*?)\s+([\d.]+)\s+[\d.]+\s+[\d.]+x$", output, flags=re.MULTILINE)
    return {"tokens_per_s": {name: float(rate) for name, rate in rates}} if rates else {}


def parse_machine(output: str) -> dict[str, Any]:
    """The "key: value" lines the machine step prints."""
    fields = {}
    for line in output.splitlines():
        key, sep, value = line.partition(": ")
        if sep and re.fullmatch(r"[a-z_]+", key):
            fields[key] = value.strip()
    return fields


@dataclass
class StepResult:
    name: str
    tier: int
    command: str
    limit_s: float
    status: str = "skipped"  # passed, failed, timeout, skipped
    reason: str = ""
    rc: int | None = None
    seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)


class Check:
    """Runs the steps, each under the smallest of its own limit, its tier's and the whole run's,
    appending its output to the log and rewriting the summary after it."""

    def __init__(self, outdir: Path, dry_run: bool, total_s: float, env: dict[str, str]) -> None:
        self.outdir = outdir
        self.dry_run = dry_run
        self.env = env
        self.start = time.monotonic()
        self.deadline = self.start + total_s
        self.tier_deadline = self.deadline
        self.tier = 0
        self.steps: list[StepResult] = []
        self.summary: dict[str, Any] = {
            "format": 1,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dry_run": dry_run,
            "commit": git_commit(),
            "source_hash": source_hash(),
            "budget_s": {"total": total_s, **{f"tier{t}": s for t, s in TIER_S.items()}},
            "status": "running",
        }
        outdir.mkdir(parents=True, exist_ok=True)
        self.log = open(outdir / LOG, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self.write_summary()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def begin_tier(self, tier: int) -> None:
        self.tier = tier
        limit = TIER_S.get(tier)
        now = time.monotonic()
        self.tier_deadline = min(self.deadline, now + limit) if limit else self.deadline
        self.say(f"\n######## tier {tier} (until {self.tier_deadline - self.start:.0f} s)")

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")

    def skip(self, name: str, command: list[str], limit_s: float, reason: str) -> StepResult:
        step = StepResult(name, self.tier, shlex.join(command), limit_s, reason=reason)
        self.say(f"\n==== {name}: skipped ({reason})")
        self.record(step)
        return step

    def run(self, name: str, command: list[str], limit_s: float,
            parse: Parser | None = None, env: dict[str, str] | None = None) -> StepResult:
        left = min(self.tier_deadline, self.deadline) - time.monotonic()
        limit = min(limit_s, left)
        if limit < MIN_STEP_S:
            return self.skip(name, command, limit_s, "its tier's time is spent")
        step = StepResult(name, self.tier, shlex.join(command), round(limit, 1))
        self.say(f"\n==== [tier {self.tier}] {name} (at most {limit:.0f} s; "
                 f"{self.elapsed():.0f} s so far)\n$ {step.command}")
        argv = ["echo", "[dry run]", *command] if self.dry_run else command
        began = time.monotonic()
        output, step.rc, timed_out = self.execute(argv, limit, {**self.env, **(env or {})})
        step.seconds = round(time.monotonic() - began, 1)
        if timed_out:
            step.status, step.reason = "timeout", f"stopped at its {limit:.0f} s limit"
        else:
            step.status = "passed" if step.rc == 0 else "failed"
        if parse is not None:
            step.result = parse(output)
        self.say(f"---- {name}: {step.status} (exit status {step.rc}, {step.seconds} s)")
        self.record(step)
        return step

    def execute(self, argv: list[str], limit: float,
                env: dict[str, str]) -> tuple[str, int | None, bool]:
        """Runs argv in its own process group, its output line by line into the log; kills the
        group at the limit. Returns (output, exit status, timed out)."""
        lines: list[str] = []
        try:
            process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       text=True, errors="replace", start_new_session=True)
        except OSError as error:  # not installed: a failed step, not a failed check
            self.say(f"cannot start: {error}")
            return str(error), 127, False

        def copy_output() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line)
                sys.stdout.write(line)
                self.log.write(line)

        reader = threading.Thread(target=copy_output, daemon=True)
        reader.start()
        timed_out = False
        try:
            process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            signal_group(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=KILL_GRACE_S)
            signal_group(process.pid, signal.SIGKILL)  # what of the group is still there
            process.wait()
        reader.join(timeout=KILL_GRACE_S)
        sys.stdout.flush()
        return "".join(lines), process.returncode, timed_out

    def record(self, step: StepResult) -> None:
        self.steps.append(step)
        self.write_summary()

    def write_summary(self) -> None:
        self.summary["elapsed_s"] = round(self.elapsed(), 1)
        self.summary["steps"] = [vars(s) for s in self.steps]
        temporary = self.outdir / (SUMMARY + ".tmp")
        temporary.write_text(json.dumps(self.summary, indent=1) + "\n", encoding="utf-8")
        os.replace(temporary, self.outdir / SUMMARY)  # a kill never leaves half a summary

    def finish(self) -> int:
        files = [p for p in self.outdir.rglob("*") if p.is_file()]
        failed = [s.name for s in self.steps if s.status in ("failed", "timeout")]
        if len(files) > MAX_OUT_FILES:
            failed.append(f"{len(files)} files in OUTDIR (at most {MAX_OUT_FILES} come back)")
        skipped = [s.name for s in self.steps if s.status == "skipped"]
        self.summary["failed"] = failed
        self.summary["skipped"] = skipped
        # Incomplete: nothing failed, but the time ran out before some steps (not an error).
        self.summary["status"] = "failed" if failed else "incomplete" if skipped else "passed"
        self.write_summary()
        self.say(f"\n######## {self.summary['status']} in {self.elapsed():.0f} s"
                 + (f"; failed: {', '.join(failed)}" if failed else ""))
        self.log.close()
        return 1 if failed else 0


def signal_group(group: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group has exited
        os.killpg(group, sig)


# What a result depends on: the device gets a copy of the tree that may lack .git, so the
# summary also names the sources by their hash (--source-hash prints it here, to compare).
SOURCE_DIRS = ("csrc", "cmake", "python/ffnskip_ext", "benchmarks", "scripts", "tests")
SOURCE_SUFFIXES = {".cpp", ".h", ".cu", ".cuh", ".py", ".sh", ".cmake", ".in", ".txt", ".toml"}


def source_hash() -> str:
    """sha256 over the source files' paths and contents (results/ and caches left out)."""
    digest = hashlib.sha256()
    files = [ROOT / "CMakeLists.txt", ROOT / "setup.py", ROOT / "pyproject.toml"]
    for folder in SOURCE_DIRS:
        files += [p for p in (ROOT / folder).rglob("*")
                  if p.is_file() and p.suffix in SOURCE_SUFFIXES
                  and not {"results", "__pycache__"} & set(p.relative_to(ROOT).parts)]
    for path in sorted(f for f in files if f.is_file()):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


MACHINE_SCRIPT = r"""
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "cores: $(nproc)"
fields=name,driver_version,memory.total,compute_cap,clocks.max.sm,clocks.max.mem
echo "gpu: $(nvidia-smi --query-gpu=$fields --format=csv,noheader | head -1)"
echo "nvcc: $(nvcc --version | tail -1)"
echo "cmake: $(cmake --version | head -1)"
"$PYTHON" - <<'EOF'
import importlib, sys
print("python:", sys.version.split()[0])
for name in ("numpy", "torch", "transformers", "pytest", "pybind11", "gguf"):
    try:
        print(f"{name}:", importlib.import_module(name).__version__)
    except Exception as error:  # reported, the steps that need it fail on their own
        print(f"{name}: missing ({type(error).__name__})")
EOF
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path, nargs="?",
                        help="results folder (at most 8 files go there)")
    parser.add_argument("--dry-run", action="store_true",
                        help="echo every command instead of running it (no GPU needed)")
    parser.add_argument("--build-dir", type=Path, default=Path("/tmp/ffnskip_gpu_build"))
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl",
                        help="wheels installed beside the package first, without an index "
                             "(default: .whl in the tree, when it exists)")
    parser.add_argument("--total-s", type=float, default=TOTAL_S,
                        help="the whole run's time limit in seconds")
    parser.add_argument("--source-hash", action="store_true",
                        help="print the hash of the sources the summary records, and stop")
    args = parser.parse_args()
    if args.source_hash:
        print(source_hash())
        return 0
    if args.outdir is None:
        parser.error("OUTDIR is needed")

    missing = [name for name in REQUIRED_FILES if not (ROOT / name).is_file()]
    if missing:
        raise SystemExit(f"gpu_check: the tree lacks {', '.join(missing)}")
    python = sys.executable
    build = args.build_dir.resolve()
    package = build / "pkg"  # the Python files, _core and libffnskip_cuda.so, as installed
    cores = str(os.cpu_count() or 1)
    env = dict(os.environ, PYTHON=python, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(package),
                                                        os.environ.get("PYTHONPATH")])),
               # bench_decode finds libffnskip_cuda.so in the package, not beside itself.
               LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(package / "ffnskip_ext"),
                                                             os.environ.get("LD_LIBRARY_PATH")])))
    check = Check(args.outdir.resolve(), args.dry_run, args.total_s, env)

    check.begin_tier(1)
    if not args.dry_run:
        # The package is assembled in the build directory; the sources stay untouched.
        shutil.rmtree(package, ignore_errors=True)
        shutil.copytree(ROOT / "python" / "ffnskip_ext", package / "ffnskip_ext",
                        ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    wheels = sorted(args.wheels.glob("*.whl")) if args.wheels.is_dir() else []
    if wheels:
        check.run("wheels", [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                             "--no-compile", "--target", str(package), *map(str, wheels)], 60)
    # After the wheels, so that the versions it reads include theirs.
    machine = check.run("machine", ["bash", "-c", MACHINE_SCRIPT], 30, parse_machine)
    check.summary["machine"] = machine.result
    generator = ["-G", "Ninja"] if shutil.which("ninja") or args.dry_run else []
    configure = check.run("configure", [
        "cmake", "-S", str(ROOT), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
        "-DFFNSKIP_CUDA=ON", "-DFFNSKIP_BUILD_BENCHMARKS=ON", f"-DPython_EXECUTABLE={python}",
        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={package / 'ffnskip_ext'}"], 60)
    build_command = ["cmake", "--build", str(build), "--parallel", cores,
                     "--target", "_core", "ffnskip_cuda", "bench_decode", "bench_gemv"]
    built = False
    if configure.status == "passed":
        built = check.run("build", build_command, 150).status == "passed"
    else:
        check.skip("build", build_command, 150, "the configuration failed")

    def needs_build(name: str, command: list[str], limit_s: float,
                    parse: Parser | None = None) -> StepResult:
        if not built:
            return check.skip(name, command, limit_s, "the build failed")
        return check.run(name, command, limit_s, parse)

    pytest = [python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"]
    needs_build("import", [python, "-c", "import ffnskip_ext, gguf, sys; "
                           "print(ffnskip_ext.build_info()); "
                           "sys.exit(not ffnskip_ext.cuda_available())"], 30)
    # Worker processes (pytest-xdist, in the device's image): a test that crashes its process
    # fails alone instead of ending the file's run (the SIGSEGV of 2026-12-04 hid every later
    # test of both files).
    workers = ["-n", "4"] if importlib.util.find_spec("xdist") else []
    kernel_tests = needs_build("kernel_tests", [*pytest, *workers, KERNEL_TESTS], 90,
                               parse_pytest)
    # The SmolLM2 tests need its 98 MB package, which does not travel.
    model_tests = needs_build("model_tests", [*pytest, *workers, MODEL_TESTS, "-k",
                                              "not smollm2"], 120, parse_pytest)

    check.begin_tier(2)
    bench_decode = str(build / "bench_decode")
    for preset, dtype in DECODE_SHAPES:
        needs_build(f"bench_decode_{preset}_{dtype}", [
            bench_decode, "--device", "cuda", "--preset", preset, "--dtype", dtype,
            "--tokens", "128", "--policy", DECODE_POLICIES], 45, parse_bench_decode)

    check.begin_tier(3)
    # The C++ stacks of the first crashed test under cuda-gdb (it debugs host code too; the
    # image has no gdb): alone, then after the tests before it in its file (whether it needs
    # them to crash says whether it is the crash's cause or where earlier damage shows).
    crashed = [node for step in (kernel_tests, model_tests)
               for node in step.result.get("crashed_tests", [])]
    if crashed:
        check.run("backtrace_alone", backtrace_command(python, crashed[0]), 60)
        check.run("backtrace_in_file", backtrace_command(python, crashed[0].split("::")[0]), 90)
    for weights in QUANTIZED_WEIGHTS:
        needs_build(f"bench_decode_llama3-8b_{weights}", [
            bench_decode, "--device", "cuda", "--preset", "llama3-8b", "--weights", weights,
            "--tokens", "128", "--policy", "dense,static:0.2"], 40, parse_bench_decode)
    # The GEMVs alone, dense against cuBLAS and over each block format: where the decode
    # step's time goes (the block GEMVs ran at 17-35% of the bandwidth on 2026-12-04, before
    # they multiplied int8 activations by dp4a), and passes of a few tokens over blocks.
    needs_build("bench_gemv", [str(build / "bench_gemv")], 60)
    # fp16 calls of every kernel: out-of-bounds and misaligned accesses.
    needs_build("memcheck_kernel_tests", [
        "compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1",
        "--target-processes", "all", *pytest, KERNEL_TESTS, "-k", "float16 and not bfloat16"],
        90, parse_pytest)
    needs_build("bench_cuda_vs_hf_llama2-7b_fp16", [
        python, HF_BENCH, "--preset", "llama2-7b", "--dtype", "fp16", "--tokens", "64",
        "--rounds", "2", "--skip-compile"], 120, parse_hf)
    return check.finish()


if __name__ == "__main__":
    sys.exit(main())
