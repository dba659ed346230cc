"""The CPU kernels one by one: time per call and GB/s of the bytes each call must read, per
kernel, shape, weight type and instruction set (the timing mode of tests/test_kernels.py).

    python benchmarks/bench_kernels.py [--threads N] [--isa avx2,...] [--repeats R]
                                       [--shapes smollm2-135m,qwen2.5-1.5b,llama2-7b]

Decode linears (one token) stream their weights once, so their GB/s is comparable with the
machine's read bandwidth (``ffnskip_ext.measure_read_bandwidth``, printed first). A decode step
reads each layer's weights from memory, not from the cache where back-to-back calls on one
small matrix would find them: a decode linear is timed on a matrix of the same width with
rows for at least ``--decode-bytes`` (default 256 MB, past any L3), its time scaled back to
the shape's rows. Prefill linears (many tokens) report GFLOP/s as well. A linear's time is the
median of ``--repeats`` back-to-back calls in C++ after a warm-up call
(``_core.kernels.time_linear``: the thread pool stays awake between calls, as in a decode
step); attention's is timed through its binding, back to back on one cache of fp32 or fp16
elements (decode at 1024 and 4096 positions): where the cache fits in L3 that is the kernel's
compute, not a decode step's reads of every layer's cache from memory.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

import ffnskip_ext
from ffnskip_ext import _core

kernels = _core.kernels

# (name, rows, cols) of the linears of one layer and the LM head.
MODELS = {
    "smollm2-135m": dict(hidden=576, inter=1536, q=576, kv=192, vocab=49152, heads=9,
                         kv_heads=3, head_dim=64),
    "qwen2.5-1.5b": dict(hidden=1536, inter=8960, q=1536, kv=256, vocab=151936, heads=12,
                         kv_heads=2, head_dim=128),
    "llama2-7b": dict(hidden=4096, inter=11008, q=4096, kv=4096, vocab=32000, heads=32,
                      kv_heads=32, head_dim=128),
}
FLOAT_TYPES = ("F32", "BF16", "F16")


def linears(m: dict[str, int]) -> list[tuple[str, int, int]]:
    h = m["hidden"]
    return [("qkv", m["q"] + 2 * m["kv"], h), ("o", h, m["q"]), ("gate_up", 2 * m["inter"], h),
            ("down", h, m["inter"]), ("lm_head", m["vocab"], h)]


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stored(rows: int, cols: int, dtype: str, rng: np.random.Generator) -> np.ndarray:
    """Random weights as the kernel reads them (values do not matter for timing)."""
    if dtype not in FLOAT_TYPES:
        elements, size = _core.TENSOR_TYPES[dtype]
        blocks = rng.integers(0, 256, size=(rows, cols // elements, size), dtype=np.uint8)
        scale_at = size - 2 if dtype == "Q6_K" else 0  # finite fp16 scales where they live
        blocks[..., scale_at:scale_at + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        if dtype in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"):
            blocks[..., 2:4] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        return blocks.reshape(rows, -1)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    if dtype == "F32":
        return w
    if dtype == "F16":
        return w.astype(np.float16).view(np.uint16)
    return (w.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits (truncated: timing only)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="0: all hardware threads")
    parser.add_argument("--isa", default=",".join(kernels.isas()),
                        help="comma-separated instruction sets")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--shapes", default="smollm2-135m,qwen2.5-1.5b")
    parser.add_argument("--types", default="F32,BF16,F16,Q8_0,Q4_0,Q4_1,Q5_0,Q4_K,Q6_K",
                        help="weight types, comma-separated")
    parser.add_argument("--prefill-tokens", type=int, default=64)
    parser.add_argument("--decode-bytes", type=float, default=256e6,
                        help="weight bytes a decode linear is timed over (0: the shape's own)")
    args = parser.parse_args()

    pool = kernels.ThreadPool(args.threads)
    rng = np.random.default_rng(0)
    bandwidth = ffnskip_ext.measure_read_bandwidth(num_threads=args.threads)
    print(f"# {platform.processor() or platform.machine()}, {pool.size} threads, "
          f"best ISA {kernels.isas()[-1]}, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| model | kernel | shape | type | isa | tokens | time (us) | GB/s | of bandwidth "
          "| GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in args.shapes.split(","):
        m = MODELS[model]
        for name, rows, cols in linears(m):
            for dtype in args.types.split(","):
                if cols % _core.TENSOR_TYPES[dtype][0]:
                    continue  # rows of this width are not whole blocks of the type
                weight = stored(rows, cols, dtype, rng)
                row_bytes = weight.nbytes / rows
                streamed_rows = max(rows, int(np.ceil(args.decode_bytes / row_bytes)))
                streamed = weight if streamed_rows == rows else stored(streamed_rows, cols,
                                                                        dtype, rng)
                for isa in args.isa.split(","):
                    for tokens in (1, args.prefill_tokens):
                        if name == "lm_head" and tokens > 1:
                            continue  # prefill needs the logits of the last token only
                        x = rng.standard_normal((tokens, cols), dtype=np.float32)
                        timed, timed_rows = (streamed, streamed_rows) if tokens == 1 \
                            else (weight, rows)
                        seconds = kernels.time_linear(pool, timed, dtype, x, isa,
                                                      args.repeats) * rows / timed_rows
                        read = weight.nbytes + x.nbytes
                        flops = 2.0 * rows * cols * tokens
                        print(f"| {model} | {name} | {rows}x{cols} | {dtype} | {isa} | {tokens} "
                              f"| {seconds * 1e6:.1f} | {read / seconds / 1e9:.1f} "
                              f"| {read / seconds / bandwidth:.0%} | {flops / seconds / 1e9:.1f} |")
        for isa in args.isa.split(","):
            heads, kv_heads, d = m["heads"], m["kv_heads"], m["head_dim"]
            prefill = args.prefill_tokens
            for (tokens, context), cache in itertools.product(
                    ((1, 1024), (1, 4096), (prefill, prefill)), ("F32", "F16")):
                pos = context - tokens
                q = rng.standard_normal((tokens, heads * d), dtype=np.float32)
                k, v = (rng.standard_normal((kv_heads, context, d), dtype=np.float32)
                        for _ in "kv")
                if cache == "F16":  # the cache as the decoder holds it: fp16 bits
                    k, v = (a.astype(np.float16).view(np.uint16) for a in (k, v))
                seconds = median_seconds(functools.partial(
                    kernels.attention, pool, q, k, v, pos, heads, isa, cache), args.repeats)
                read = k.nbytes + v.nbytes + q.nbytes
                print(f"| {model} | attention | ctx {context} | {cache} | {isa} | {tokens} "
                      f"| {seconds * 1e6:.1f} | {read / seconds / 1e9:.1f} "
                      f"| {read / seconds / bandwidth:.0%} | |")


if __name__ == "__main__":
    main()
