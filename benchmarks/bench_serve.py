"""``ffnskip serve`` under load: K concurrent clients x M streaming chat requests on loopback.

Starts ``ffnskip serve`` as a subprocess on a free port, waits for ``/health``, then runs K
client threads, each sending M requests one after another with the ``openai`` client
(greedy, ``max_tokens`` tokens, streamed, prompts varied so that each client's requests and
the clients differ). Reports throughput (generated tokens and requests per second of wall
time), latency and time to first token (p50, p95), and the server's own ``/metrics``.
Bounded: at most K x M requests, and none starts after ``--time-limit`` seconds.

    python benchmarks/bench_serve.py [--model PATH] [--workers 2] [--clients 4]
        [--requests 4] [--max-tokens 32] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import platform
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai

import ffnskip_ext

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for learning to cook.",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
    "Name a few uses of a paperclip.",
    "What does a compiler do?",
    "Suggest a name for a small bakery.",
]


@dataclasses.dataclass
class Sample:
    latency_s: float
    ttft_s: float
    completion_tokens: int
    cached_tokens: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "ffnskip_ext", "serve", "--port", str(port),
               "--workers", str(args.workers), "--queue-size", str(args.clients)]
    for flag, value in (("--model", args.model), ("--threads", args.threads),
                        ("--dtype", args.dtype), ("--max-seq-len", args.max_seq_len)):
        if value is not None:
            command += [flag, str(value)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def wait_for_health(base: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read()[-2000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base}/health").status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit("the server did not become healthy in time")


def one_request(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> Sample:
    start = time.perf_counter()
    first = None
    usage = None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    assert usage is not None, "the stream carried no usage"
    return Sample(end - start, (first or end) - start, usage.completion_tokens,
                  usage.prompt_tokens_details.cached_tokens)


def run_clients(base: str, model: str, args: argparse.Namespace) -> tuple[list[Sample], float]:
    samples: list[Sample] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    deadline = time.monotonic() + args.time_limit

    def client_loop(c: int) -> None:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0,
                               timeout=args.time_limit)
        for m in range(args.requests):
            if time.monotonic() > deadline:
                return
            prompt = PROMPTS[(c * args.requests + m) % len(PROMPTS)]
            try:
                sample = one_request(client, model, prompt, args.max_tokens)
            except Exception as e:  # reported after the run
                with lock:
                    errors.append(e)
                return
            with lock:
                samples.append(sample)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(args.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} request(s) failed, first: {errors[0]!r}")
    return samples, wall


def server_metrics(base: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


def machine() -> str:
    """lscpu's model name and cores, the engine's instruction set, the load average."""
    info = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                                   timeout=10).stdout.splitlines():
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    model = info.get("Model name", platform.processor() or platform.machine())
    cores = info.get("Core(s) per socket", "?"), info.get("Socket(s)", "?")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{model}, {os.cpu_count()} CPUs ({cores[0]} cores x {cores[1]} sockets), engine "
            f"ISA {ffnskip_ext.build_info()['cpu_isa']}, load average {load} at the end")


def commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    return "unknown"


def report(args: argparse.Namespace, samples: list[Sample], wall: float,
           metrics: dict[str, float], model: str) -> str:
    latency = np.array([s.latency_s for s in samples])
    ttft = np.array([s.ttft_s for s in samples])
    tokens = sum(s.completion_tokens for s in samples)
    rows = [
        ("requests", f"{len(samples)} ({args.clients} clients x {args.requests})"),
        ("generated tokens", f"{tokens}"),
        ("wall time", f"{wall:.2f} s"),
        ("throughput", f"{tokens / wall:.1f} generated tok/s, {len(samples) / wall:.2f} req/s"),
        ("latency p50 / p95", "{:.2f} s / {:.2f} s".format(*np.percentile(latency, [50, 95]))),
        ("time to first token p50 / p95",
         "{:.0f} ms / {:.0f} ms".format(*np.percentile(ttft * 1e3, [50, 95]))),
        ("cached prompt tokens (server)",
         f"{metrics.get('ffnskip_cached_prompt_tokens_total', 0):.0f} of "
         f"{metrics.get('ffnskip_prompt_tokens_total', 0):.0f}"),
        ("decode tok/s of one sequence (server)",
         f"{metrics.get('ffnskip_decode_tokens_per_second', 0):.1f}"),
    ]
    # The server's default: the CPUs shared out among the workers.
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/bench_serve.py",
                                                 *sys.argv[1:]])
    lines = [
        f"## {command}",
        "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {machine()}. Commit: {commit()}.",
        f"Model: {model}, weights {args.dtype or 'auto'}; {args.workers} workers, "
        f"{threads} thread(s) each; greedy, "
        f"{args.max_tokens} tokens per request, streamed. Time to first token includes the "
        "wait for a free worker.",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="a path or a model name (default: the bundled SmolLM2)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4, help="K concurrent clients")
    parser.add_argument("--requests", type=int, default=4, help="M requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="per worker")
    parser.add_argument("--dtype", default=None,
                        help="as ffnskip serve's (default auto: the types the file stores)")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--time-limit", type=float, default=600.0,
                        help="no request starts after this many seconds")
    parser.add_argument("--out", help="append the markdown report to this file")
    args = parser.parse_args()
    if not (1 <= args.clients <= 64 and 1 <= args.requests <= 100):
        parser.error("--clients must be in [1, 64] and --requests in [1, 100]")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(args, port)
    try:
        wait_for_health(base, server, timeout_s=300)
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        samples, wall = run_clients(base, model, args)
        text = report(args, samples, wall, server_metrics(base), model)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
