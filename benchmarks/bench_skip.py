"""What skipping FFN blocks buys in decode speed, against the ideal from bytes not read.

Decodes SmolLM2-135M (fp32) on the CPU with StaticFFNSkip over a contiguous middle window
of 0%, 10%, 20% and 30% of the FFN blocks, and with FFNSkipPolicy(threshold=1.0), which
computes every score but never skips (the gating overhead). Decode is memory-bound, so the
ideal speedup of a skip is the ratio of weight bytes read per token with and without it.
Rounds alternate between configurations; medians are reported.

    python benchmarks/bench_skip.py [--model PATH] [--tokens 64] [--rounds 3] [--threads N]
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


def weight_bytes(config: ffnskip_ext.ModelConfig, skipped_ffns: int, itemsize: int = 4) -> int:
    """Weights read per decode token: every layer, the final norm and the LM head."""
    h, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    attention = h * (q + 2 * kv) + q * h + h
    ffn = 3 * h * f + h
    layers = config.num_layers * attention + (config.num_layers - skipped_ffns) * ffn
    return itemsize * (layers + h + config.vocab_size * h)


def tokens_per_s(decoder: ffnskip_ext.Decoder, policy: Policy, prompt: list[int],
                 tokens: int) -> float:
    decoder.set_policy(policy)
    decoder.reset()
    token = int(np.argmax(decoder.prefill(prompt)))
    start = time.perf_counter()
    for _ in range(tokens):
        token = int(np.argmax(decoder.step(token)))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    path = args.model or ffnskip_ext.default_model_path()
    decoder = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=512, num_threads=args.threads)
    tokenizer = ffnskip_ext.load_tokenizer(path)
    prompt = ffnskip_ext.encode_prompt(
        tokenizer, [{"role": "user", "content": "Tell me a short story about a lighthouse."}]
    )
    config = decoder.config
    layers = config.num_layers
    configs: list[tuple[str, Policy, int]] = [("dense", DensePolicy(), 0)]
    for fraction in (0.1, 0.2, 0.3):
        count = round(fraction * layers)
        first = (layers - count) // 2
        window = list(range(first, first + count))
        configs.append((f"static {fraction:.0%} ({count} FFNs)", StaticFFNSkip(window), count))
    configs.append(("ffn-skip threshold=1.0", FFNSkipPolicy(threshold=1.0, warmup_tokens=0), 0))

    tokens_per_s(decoder, DensePolicy(), prompt, 4)  # warm-up
    results: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    for _ in range(args.rounds):
        for name, policy, _ in configs:
            results[name].append(tokens_per_s(decoder, policy, prompt, args.tokens))

    dense = statistics.median(results["dense"])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, threads={args.threads}; "
          f"model {os.path.basename(path)} fp32, {args.tokens} tokens x {args.rounds} rounds")
    print(f"{'configuration':<28}{'tok/s':>9}{'speedup':>9}{'ideal':>8}{'of ideal':>10}"
          f"{'of ideal gain':>15}")
    for name, _, skipped in configs:
        tps = statistics.median(results[name])
        speedup = tps / dense
        ideal = weight_bytes(config, 0) / weight_bytes(config, skipped)
        gain = (speedup - 1) / (ideal - 1) if ideal > 1 else float("nan")
        print(f"{name:<28}{tps:>9.2f}{speedup:>9.3f}{ideal:>8.3f}{speedup / ideal:>10.1%}"
              f"{gain:>15.1%}")


if __name__ == "__main__":
    main()
