"""Decode speed with the fp32 and the fp16 KV cache in one process: two decoders of one file,
a random prompt of --context tokens, then --tokens greedy steps per round, the decoders in
alternating order round by round; prints each round's rate, the medians and their ratio.

    python benchmarks/bench_kv_cache.py [MODEL] [--context 4000] [--rounds 6] [--tokens 64]
        [--threads N]

MODEL: a .gguf file, a Hugging Face directory or a model name (default: smollm2-135m).
FFNSKIP_CPU_ISA=avx2 times the AVX2 kernels on an AVX-512 machine.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from decode_rate import greedy_decode_rate

import ffnskip_ext
from ffnskip_ext.loaders.models import resolve_model

CACHES = ("auto", "float16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--context", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    path = resolve_model(args.model)
    decoders = {kv: ffnskip_ext.Decoder.from_pretrained(
        path, max_seq_len=args.context + args.tokens + 1, num_threads=args.threads,
        kv_cache_dtype=kv) for kv in CACHES}
    vocab = decoders["auto"].config.vocab_size
    prompt = np.random.default_rng(0).integers(100, vocab - 100, args.context).tolist()
    print(f"{path}: {args.context} tokens of context, {args.tokens} decode tokens x "
          f"{args.rounds} rounds, cpu_isa {ffnskip_ext.build_info()['cpu_isa']}")
    rates: dict[str, list[float]] = {kv: [] for kv in CACHES}
    for r in range(args.rounds):
        for kv in CACHES if r % 2 == 0 else CACHES[::-1]:
            rates[kv].append(greedy_decode_rate(decoders[kv], prompt, args.tokens))
    for kv in CACHES:
        print(f"kv_cache_dtype={kv}: median {statistics.median(rates[kv]):.1f} tok/s, rounds "
              f"{[round(x, 1) for x in rates[kv]]}")
    ratio = statistics.median(rates["float16"]) / statistics.median(rates["auto"])
    print(f"ratio float16 / auto (medians): {ratio:.2f}x")


if __name__ == "__main__":
    main()
