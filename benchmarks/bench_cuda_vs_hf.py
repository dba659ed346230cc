"""Decode tokens/s on one GPU: ffnskip_ext's CUDA backend against HF transformers, same shape,
same random weights, batch 1, greedy.

- transformers eager: ``generate`` with its default (dynamic) KV cache;
- transformers compiled: ``generate`` with ``cache_implementation="static"`` and
  ``model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)``;
- ffnskip_ext: ``Decoder.from_hf_model(model, device="cuda")`` (the same weights), one replayed
  CUDA graph per token, host argmax between steps.

transformers' decode rate is (N - 1) / (t(N new tokens) - t(1 new token)), which removes the
prefill; ffnskip_ext times its decode steps directly.

    python benchmarks/bench_cuda_vs_hf.py [--preset llama2-7b|llama3-8b|smollm2-135m]
        [--dtype fp16|bf16] [--tokens 256] [--prompt 16] [--skip-compile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import transformers

import ffnskip_ext

PRESETS: dict[str, dict[str, object]] = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      tie_word_embeddings=False, rope_theta=10000.0),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      tie_word_embeddings=False, rope_theta=500000.0),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def random_model(preset: str, dtype: torch.dtype) -> transformers.LlamaForCausalLM:
    spec = dict(PRESETS[preset])
    rope_theta = spec.pop("rope_theta")
    config = transformers.LlamaConfig(
        **spec, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters made in the storage dtype, on the GPU
    try:
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def timed(run: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def transformers_rate(
    model: transformers.PreTrainedModel, prompt: torch.Tensor, tokens: int, rounds: int,
    **generate_args: str,
) -> float:
    def generate(new_tokens: int) -> None:
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0, **generate_args)

    with torch.inference_mode():
        generate(tokens)  # warm-up (and compilation)
        rates = []
        for _ in range(rounds):
            one = timed(lambda: generate(1))
            many = timed(lambda: generate(tokens))
            rates.append((tokens - 1) / (many - one))
    return statistics.median(rates)


def ffnskip_rate(decoder: ffnskip_ext.Decoder, prompt: list[int], tokens: int,
                 rounds: int) -> float:
    rates = []
    for _ in range(rounds + 1):  # the first round captures the decode graph
        decoder.reset()
        token = int(np.argmax(decoder.prefill(prompt)))
        start = time.perf_counter()
        for _ in range(tokens):
            token = int(np.argmax(decoder.step(token)))
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama2-7b", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-compile", action="store_true",
                        help="leave out transformers with static cache and torch.compile")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not ffnskip_ext.cuda_available():
        raise SystemExit(f"needs a GPU for torch and ffnskip_ext: {ffnskip_ext.build_info()}")

    dtype = DTYPES[args.dtype]
    model = random_model(args.preset, dtype)
    vocab = model.config.vocab_size
    prompt = [(i * 7919) % vocab for i in range(args.prompt)]
    prompt_tensor = torch.tensor([prompt], device="cuda")
    print(f"device: {torch.cuda.get_device_name()}, preset {args.preset}, {args.dtype}, "
          f"prompt {args.prompt}, {args.tokens} new tokens, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")

    results: dict[str, float] = {}
    results["transformers eager"] = transformers_rate(model, prompt_tensor, args.tokens,
                                                      args.rounds)
    decoder = ffnskip_ext.Decoder.from_hf_model(
        model, device="cuda", dtype=args.dtype, max_seq_len=args.prompt + args.tokens + 1
    )
    results["ffnskip_ext"] = ffnskip_rate(decoder, prompt, args.tokens, args.rounds)
    del decoder
    if not args.skip_compile:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        results["transformers static+compile"] = transformers_rate(
            model, prompt_tensor, args.tokens, args.rounds, cache_implementation="static"
        )

    eager = results["transformers eager"]
    print(f"{'engine':<30} {'tokens/s':>10} {'ms/token':>10} {'vs eager':>9}")
    for name, rate in results.items():
        print(f"{name:<30} {rate:>10.1f} {1e3 / rate:>10.3f} {rate / eager:>8.2f}x")


if __name__ == "__main__":
    main()
