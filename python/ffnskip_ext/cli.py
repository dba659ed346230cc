"""Command line: ``ffnskip generate "PROMPT"`` (also ``python -m ffnskip_ext generate``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _generate(args: argparse.Namespace) -> int:
    from .decoder import Decoder
    from .generate import generate
    from .models import default_model_path
    from .tokenizer import load_tokenizer

    model = args.model or default_model_path()
    decoder = Decoder.from_pretrained(
        model, device=args.device, max_seq_len=args.max_seq_len, num_threads=args.threads
    )
    tokenizer = load_tokenizer(model)
    if args.raw:
        prompt: str | list[dict[str, str]] = args.prompt
    else:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate(
        decoder,
        tokenizer,
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        stream=stream,
    )
    sys.stdout.write("\n")
    print(
        f"[{len(result.token_ids)} tokens, finish={result.finish_reason}, "
        f"prompt {result.prompt_tokens} tokens in {result.prefill_ms:.1f} ms, "
        f"decode {result.decode_tokens_per_s:.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ffnskip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="HF model directory or .gguf file (default: SmolLM2-135M)")
    gen.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--system", help="system message for the chat template")
    gen.add_argument("--raw", action="store_true", help="no chat template: encode the prompt as is")
    gen.add_argument("--max-seq-len", type=int, default=None)
    gen.add_argument("--threads", type=int, default=None)
    gen.set_defaults(func=_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"ffnskip: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
