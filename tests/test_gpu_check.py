"""scripts/gpu_check.sh without a GPU: its dry run goes through every tier and leaves at most 8
files and a valid summary in OUTDIR; a step past its limit is killed with its children and
recorded; a spent budget skips steps rather than starting them; the parsers read the real
output formats of pytest, bench_decode and bench_cuda_vs_hf.py."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up there
spec.loader.exec_module(gpu_check)


def dry_run(outdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), str(outdir), "--dry-run",
                           "--build-dir", str(outdir.parent / "build"), *extra],
                          env=env, capture_output=True, text=True, timeout=120)


def test_dry_run_covers_every_tier_in_at_most_eight_files(tmp_path) -> None:
    outdir = tmp_path / "out"
    before = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                            text=True).stdout
    done = dry_run(outdir)
    assert done.returncode == 0, done.stdout + done.stderr
    files = [p for p in outdir.rglob("*") if p.is_file()]
    assert len(files) <= gpu_check.MAX_OUT_FILES == 8
    assert sorted(p.name for p in files) == ["gpu_check.log", "summary.json"]
    summary = json.loads((outdir / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["status"] == "passed"
    hashed = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"),
                             "--source-hash"], capture_output=True, text=True, check=True)
    assert summary["source_hash"] == hashed.stdout.strip() != ""
    steps = summary["steps"]
    assert {s["tier"] for s in steps} == {1, 2, 3}
    assert all(s["status"] == "passed" for s in steps), steps
    names = [s["name"] for s in steps]
    for expected in ("machine", "configure", "build", "kernel_tests", "model_tests",
                     "bench_decode_llama2-7b_fp16", "bench_decode_llama3-8b_bf16",
                     "bench_gemv", "memcheck_kernel_tests", "bench_cuda_vs_hf_llama2-7b_fp16"):
        assert expected in names
    log = (outdir / "gpu_check.log").read_text()
    for step in steps:
        assert f"$ {step['command']}" in log  # every command echoed, under its header
    assert "--policy dense,static:0.1,static:0.2,static:0.3,ffnskip-never" in log
    # Nothing written into the tree (results there would not come back).
    after = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                           text=True).stdout
    assert after == before


def test_spent_budget_skips_every_step_and_still_writes_the_summary(tmp_path) -> None:
    outdir = tmp_path / "out"
    done = dry_run(outdir, "--total-s", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((outdir / "summary.json").read_text())
    assert summary["status"] == "incomplete"
    assert summary["steps"] and all(s["status"] == "skipped" for s in summary["steps"])
    assert summary["skipped"] == [s["name"] for s in summary["steps"]]


def test_step_past_its_limit_is_killed_with_its_children(tmp_path) -> None:
    check = gpu_check.Check(tmp_path, dry_run=False, total_s=60, env=dict(os.environ))
    check.begin_tier(1)
    pid_file = tmp_path / "child.pid"
    began = time.monotonic()
    step = check.run("sleeper", ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; "
                                               "echo started; wait"], limit_s=6)
    assert time.monotonic() - began < 6 + 2 * gpu_check.KILL_GRACE_S
    assert step.status == "timeout"
    child = Path(f"/proc/{int(pid_file.read_text())}/stat")
    time.sleep(0.5)
    assert not child.exists() or child.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert "started" in (tmp_path / "gpu_check.log").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"][0]["status"] == "timeout"  # written before the run goes on
    # A group that ignores SIGTERM is killed after the grace period.
    began = time.monotonic()
    stubborn = check.run("stubborn", ["bash", "-c", "trap '' TERM; sleep 60 & wait"], limit_s=5)
    assert stubborn.status == "timeout"
    assert time.monotonic() - began < 5 + 2 * gpu_check.KILL_GRACE_S
    assert check.finish() == 1
    assert json.loads((tmp_path / "summary.json").read_text())["failed"] == ["sleeper", "stubborn"]


def test_failed_and_missing_commands_are_failed_steps(tmp_path) -> None:
    check = gpu_check.Check(tmp_path, dry_run=False, total_s=60, env=dict(os.environ))
    check.begin_tier(1)
    assert check.run("false", ["false"], 10).status == "failed"
    missing = check.run("missing", ["no-such-program-ffnskip"], 10)
    assert (missing.status, missing.rc) == ("failed", 127)
    assert check.run("true", ["true"], 10).status == "passed"


# The lines bench_decode and bench_cuda_vs_hf.py print, laid out as they print them (the table
# rows from a CPU run of bench_decode; the GPU line and the kernel counts written by hand).
BENCH_DECODE_OUTPUT = """\
preset=llama2-7b device=cuda weights=F16 dtype=float16 layers=32 hidden=4096 intermediate=11008 \
heads=32/32 vocab=32000 prompt=16 tokens=128
gpu=NVIDIA H200 cuda_runtime=13.0 driver=13.0 cublas=13.1.0 d2d_copy=4312 GB/s
policy           tokens/s  ms/token  ffn_skip   MB/token      GB/s   of_peak  prefill/s  kernels   speedup
dense               58.85    16.993      0.0%      169.9      10.0     88.4%      161.2      293    1.000x (ideal 1.000x: 100.0% of it)
static:0.25         61.70    16.207     25.0%      159.3       9.8     86.9%      173.6      285    1.048x (ideal 1.067x: 98.3% of it)
"""  # noqa: E501

HF_OUTPUT = """\
device: NVIDIA H200, preset llama2-7b, fp16, prompt 16, 64 new tokens, torch 2.11.0
engine                           tokens/s   ms/token  vs eager
transformers eager                   31.2     32.051     1.00x
ffnskip_ext                         250.4      3.994     8.03x
"""


def test_bench_decode_sample_has_the_programs_columns() -> None:
    """The sample above stays bench_decode's: its header is the one the source prints."""
    source = (ROOT / gpu_check.BENCH_DECODE_SOURCE).read_text()
    start = source.index('"policy", "tokens/s"')
    printed = re.findall(r'"([^"%]+)"', source[start:source.index(");", start)])
    header = next(line for line in BENCH_DECODE_OUTPUT.splitlines() if line.startswith("policy"))
    assert printed == header.split()


def test_parsers_read_the_programs_output() -> None:
    bench = gpu_check.parse_bench_decode(BENCH_DECODE_OUTPUT)
    assert bench["gpu"] == "NVIDIA H200" and bench["d2d_copy_gbs"] == 4312
    dense, static = bench["rows"]
    assert dense["policy"] == "dense" and dense["tokens/s"] == 58.85
    assert static["ffn_skip"] == 25.0 and static["kernels"] == 285
    assert static["speedup"] == 1.048
    hf = gpu_check.parse_hf(HF_OUTPUT)
    assert hf == {"tokens_per_s": {"transformers eager": 31.2, "ffnskip_ext": 250.4}}
    pytest_output = ("FAILED tests/test_cuda.py::test_x[float16] - AssertionError\n"
                     "1 failed, 40 passed, 3 skipped in 12.50s\n")
    assert gpu_check.parse_pytest(pytest_output) == {
        "counts": {"failed": 1, "passed": 40, "skipped": 3},
        "failed_tests": ["tests/test_cuda.py::test_x[float16]"]}
    # A crash: pytest-xdist names the test; without workers, faulthandler's stack does.
    xdist = ("[gw1] node down: Not properly terminated\n"
             "FAILED tests/test_cuda.py::test_y[bf16] - worker 'gw1' crashed while running "
             "'tests/test_cuda.py::test_y[bf16]'\n1 failed, 9 passed in 3.10s\n")
    assert gpu_check.parse_pytest(xdist)["crashed_tests"] == ["tests/test_cuda.py::test_y[bf16]"]
    serial = ('.s..Fatal Python error: Segmentation fault\n\nCurrent thread 0x7f (most recent '
              'call first):\n  File "/pkg/ffnskip_ext/runtime/policies.py", line 68 in _validate\n'
              '  File "/work/main/tests/test_cuda.py", line 232 in test_mixed_formats\n'
              '  File "/venv/_pytest/python.py", line 167 in pytest_pyfunc_call\n')
    assert gpu_check.parse_pytest(serial) == {
        "crashed_tests": ["tests/test_cuda.py::test_mixed_formats"]}
    assert "crashed_tests" not in gpu_check.parse_pytest(pytest_output)
    assert gpu_check.backtrace_command("py", "tests/t.py::x")[-1] == "tests/t.py::x"
    machine = gpu_check.parse_machine("gpu: NVIDIA H200, 580.1, 143771 MiB, 9.0\ncores: 16\n")
    assert machine == {"gpu": "NVIDIA H200, 580.1, 143771 MiB, 9.0", "cores": "16"}
