"""Decode tokens/s of ffnskip_ext and of HF transformers (eager, inference_mode), same run.

Both decode the same chat prompt greedily with their KV caches, with the same number of
threads, on the same weights at the same precision (--dtype float32 or bfloat16; the bundled
SmolLM2-135M GGUF unless --model is given).
Rounds alternate between the engines so that machine noise hits both; the median is reported.

    python benchmarks/bench_decode.py [--model PATH] [--dtype float32|bfloat16] [--tokens 64]
                                      [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import transformers
from decode_rate import greedy_decode_rate

import ffnskip_ext

PROMPT = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper."}]


def time_transformers(model: transformers.PreTrainedModel, prompt: list[int], tokens: int) -> float:
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True)
        token = out.logits[0, -1].argmax().view(1, 1)
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[0, -1].argmax().view(1, 1)
        return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default SmolLM2)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch_dtype = getattr(torch, args.dtype)

    path = args.model or ffnskip_ext.default_model_path()
    torch.set_num_threads(args.threads)
    tokenizer = ffnskip_ext.load_tokenizer(path)
    prompt = ffnskip_ext.encode_prompt(tokenizer, PROMPT)
    decoder = ffnskip_ext.Decoder.from_pretrained(
        path, dtype=args.dtype, max_seq_len=512, num_threads=args.threads
    )
    if path.endswith(".gguf"):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch_dtype,
            attn_implementation="eager",
        )
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, attn_implementation="eager"
        )
    model.eval()

    greedy_decode_rate(decoder, prompt, 4)  # warm-up: page in weights, wake threads
    time_transformers(model, prompt, 4)
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(greedy_decode_rate(decoder, prompt, args.tokens))
        theirs.append(time_transformers(model, prompt, args.tokens))
    ours_med, theirs_med = statistics.median(ours), statistics.median(theirs)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"threads={args.threads}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}")
    print(f"model: {os.path.basename(path)} ({args.dtype} weights), prompt {len(prompt)} tokens, "
          f"{args.tokens} decode tokens x {args.rounds} rounds")
    print(f"{'engine':<28}{'tokens/s (median)':>20}{'rounds':>30}")
    print(f"{'ffnskip_ext (cpu)':<28}{ours_med:>20.2f}{str([round(x, 1) for x in ours]):>30}")
    print(f"{'transformers eager':<28}{theirs_med:>20.2f}{str([round(x, 1) for x in theirs]):>30}")
    print(f"ratio ffnskip_ext / transformers: {ours_med / theirs_med:.2f}x")


if __name__ == "__main__":
    main()
