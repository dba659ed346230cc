"""What skipping FFN blocks buys in decode speed, against the ideal from bytes not read.

Decodes a model (default SmolLM2-135M; --model takes a path or a name of `ffnskip models
list`, weights as the file stores them unless --dtype converts them) on the CPU with
StaticFFNSkip over a contiguous middle window of 0%, 10%, 20% and 30% of the FFN blocks, and
with FFNSkipPolicy(threshold=1.0), which computes every score but never skips (the gating
overhead). Decode is memory-bound, so the ideal speedup of a skip is the ratio of the weight
bytes a decode step reads with and without it: the decoder's own count
(``stats().weight_bytes_per_token``, per stored type). Rounds alternate between
configurations; medians are reported.

    python benchmarks/bench_skip.py [--model PATH|NAME] [--dtype auto] [--tokens 64]
                                    [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

import ffnskip_ext
from ffnskip_ext import DensePolicy, FFNSkipPolicy, Policy, StaticFFNSkip
from ffnskip_ext.loaders.models import resolve_model


def tokens_per_s(decoder: ffnskip_ext.Decoder, policy: Policy, prompt: list[int],
                 tokens: int) -> tuple[float, float]:
    """(decode tok/s, weight bytes read per decode token)."""
    decoder.set_policy(policy)
    decoder.reset()
    token = int(np.argmax(decoder.prefill(prompt)))
    decoder.reset_stats()
    start = time.perf_counter()
    for _ in range(tokens):
        token = int(np.argmax(decoder.step(token)))
    rate = tokens / (time.perf_counter() - start)
    return rate, decoder.stats().weight_bytes_per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="path or model name (default SmolLM2)")
    parser.add_argument("--dtype", default="auto", help="auto (as stored) or a float type")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    path = resolve_model(args.model)
    decoder = ffnskip_ext.Decoder.from_pretrained(path, dtype=args.dtype, max_seq_len=512,
                                                  num_threads=args.threads)
    tokenizer = ffnskip_ext.load_tokenizer(path)
    prompt = ffnskip_ext.encode_prompt(
        tokenizer, [{"role": "user", "content": "Tell me a short story about a lighthouse."}]
    )
    config = decoder.config
    layers = config.num_layers
    configs: list[tuple[str, Policy]] = [("dense", DensePolicy())]
    for fraction in (0.1, 0.2, 0.3):
        count = round(fraction * layers)
        first = (layers - count) // 2
        window = list(range(first, first + count))
        configs.append((f"static {fraction:.0%} ({count} FFNs)", StaticFFNSkip(window)))
    configs.append(("ffn-skip threshold=1.0", FFNSkipPolicy(threshold=1.0, warmup_tokens=0)))

    tokens_per_s(decoder, DensePolicy(), prompt, 4)  # warm-up
    results: dict[str, list[float]] = {name: [] for name, _ in configs}
    bytes_read: dict[str, float] = {}
    for i in range(args.rounds):
        for name, policy in configs if i % 2 == 0 else configs[::-1]:
            rate, bytes_read[name] = tokens_per_s(decoder, policy, prompt, args.tokens)
            results[name].append(rate)

    dense = statistics.median(results["dense"])
    types = ", ".join(f"{t} {n / 1e6:.0f} MB" for t, n in sorted(decoder.weight_bytes.items()))
    print(f"machine: {cpu_name()}, {os.cpu_count()} cpus, threads={args.threads}, CPU kernels "
          f"{ffnskip_ext.build_info()['cpu_isa']}; model {os.path.basename(path)} "
          f"({decoder.dtype}: {types}), {args.tokens} tokens x {args.rounds} rounds")
    print(f"{'configuration':<28}{'tok/s':>9}{'MB/token':>10}{'speedup':>9}{'ideal':>8}"
          f"{'of ideal':>10}{'of ideal gain':>15}   rounds")
    for name, _ in configs:
        tps = statistics.median(results[name])
        speedup = tps / dense
        ideal = bytes_read["dense"] / bytes_read[name]
        gain = (speedup - 1) / (ideal - 1) if ideal > 1 else float("nan")
        print(f"{name:<28}{tps:>9.2f}{bytes_read[name] / 1e6:>10.1f}{speedup:>9.3f}{ideal:>8.3f}"
              f"{speedup / ideal:>10.1%}{gain:>15.1%}   {[round(r, 1) for r in results[name]]}")


def cpu_name() -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        return next((line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")), platform.machine())


if __name__ == "__main__":
    main()
