"""Command line: ``ffnskip generate "PROMPT"`` (also ``python -m ffnskip_ext generate``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from .decoder import Decoder
    from .models import default_model_path
    from .tokenizer import load_tokenizer

    model = args.model or default_model_path()
    decoder = Decoder.from_pretrained(
        model, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
        num_threads=args.threads,
    )
    return decoder, load_tokenizer(model)


def _generate(args: argparse.Namespace) -> int:
    from .generate import generate
    from .policies import load_policy

    decoder, tokenizer = _load(args)
    if args.policy == "first":  # the routers trained for this model, next to it
        from .models import default_model_path
        from .policies import FiRSTPolicy

        decoder.set_policy(FiRSTPolicy.for_model(args.model or default_model_path()))
    elif args.policy:
        decoder.set_policy(load_policy(args.policy))
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
    stats = decoder.stats()
    print(
        f"[{len(result.token_ids)} tokens, finish={result.finish_reason}, "
        f"prompt {result.prompt_tokens} tokens in {result.prefill_ms:.1f} ms, "
        f"decode {result.decode_tokens_per_s:.1f} tokens/s, policy {decoder.policy.kind}, "
        f"FFN skip ratio {stats.skip_ratio:.1%} ({stats.skip_ratio_after_warmup:.1%} after "
        f"warm-up), layer skip ratio {stats.layer_skip_ratio:.1%}]",
        file=sys.stderr,
    )
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from .calibration import DEFAULT_PROMPTS, calibrate, read_prompts

    decoder, tokenizer = _load(args)
    prompts = (read_prompts(args.prompts) if args.prompts
               else [[{"role": "user", "content": p}] for p in DEFAULT_PROMPTS])
    policy = calibrate(
        decoder, tokenizer, prompts, args.target, max_new_tokens=args.max_new_tokens,
        warmup_tokens=args.warmup_tokens, tolerance=args.tolerance,
    )
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(policy.to_json() + "\n")
    print(f"wrote {args.out}: {policy}", file=sys.stderr)
    return 0


def _train_routers(args: argparse.Namespace) -> int:
    import json
    import time

    from .first import train_routers
    from .models import default_model_path

    if args.model and args.model_option and args.model != args.model_option:
        raise ValueError("give the model once: as MODEL or as --model")
    model = args.model or args.model_option or default_model_path()
    start = time.perf_counter()
    routers = train_routers(
        model, data=args.data, epochs=args.epochs, lr=args.lr, max_tokens=args.max_tokens,
        target_usage=args.target_usage, usage_weight=args.usage_weight, penalty=args.penalty,
        batch_size=args.batch_size, seed=args.seed, straight_through=args.straight_through,
        threshold=args.threshold, out=args.out, num_threads=args.threads,
    )
    report = json.loads(routers.metadata["training"])
    print(f"wrote {routers.path}: {routers.num_layers} routers, trained in "
          f"{time.perf_counter() - start:.0f} s on {report['settings']['examples']} examples",
          file=sys.stderr)
    for epoch in report["history"]:
        print(f"  epoch {epoch['epoch']}: loss {epoch['loss']:.4f}, cross-entropy "
              f"{epoch['ce']:.4f}, mean gate {epoch['mean_gate']:.3f}", file=sys.stderr)
    for kind, kept in report["kept"].items():
        print(f"  {kind}: {kept['kept_layers']:.1f} of {routers.num_layers} layers kept at "
              f"threshold {args.threshold} (min {kept['min_kept']}, max {kept['max_kept']}), "
              f"mean gate {kept['mean_gate']:.3f}, {kept['examples']} prompts", file=sys.stderr)
    return 0


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF model directory or .gguf file (default: SmolLM2-135M)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--max-seq-len", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ffnskip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("prompt")
    _add_model_options(gen)
    gen.add_argument("--policy", help="skip policy: a JSON file, 'ffn-skip', 'dense' or 'first' "
                                         "(FiRST routers next to the model)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--system", help="system message for the chat template")
    gen.add_argument("--raw", action="store_true", help="no chat template: encode the prompt as is")
    gen.set_defaults(func=_generate)

    cal = sub.add_parser("calibrate", help="fit an FFN-SkipLLM policy to a target skip ratio")
    _add_model_options(cal)
    cal.add_argument("--target", type=float, required=True, help="FFN skip ratio, e.g. 0.2")
    cal.add_argument("--prompts", help="text file (a prompt per line) or JSONL (prompt/messages)")
    cal.add_argument("--out", required=True, help="where to write the policy JSON")
    cal.add_argument("--max-new-tokens", type=int, default=64)
    cal.add_argument("--warmup-tokens", type=int, default=32)
    cal.add_argument("--tolerance", type=float, default=0.02)
    cal.set_defaults(func=_calibrate)

    tr = sub.add_parser("train-routers", help="train FiRST layer routers for a model")
    tr.add_argument("model", nargs="?", metavar="MODEL",
                    help="HF model directory or .gguf file (default: SmolLM2-135M)")
    tr.add_argument("--model", dest="model_option", help=argparse.SUPPRESS)
    tr.add_argument("--data", help='JSONL of {"prompt", "completion"} or {"text"} rows '
                                   "(default: the bundled tasks' train split)")
    tr.add_argument("--epochs", type=int, default=3)
    tr.add_argument("--lr", type=float, default=1e-2)
    tr.add_argument("--max-tokens", type=int, default=384, help="tokens per example at most")
    tr.add_argument("--target-usage", type=float, default=None,
                    help="share of layers the routers should keep on, e.g. 0.8")
    tr.add_argument("--usage-weight", type=float, default=1.0)
    tr.add_argument("--penalty", type=float, default=0.01, help="weight of the mean gate")
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--straight-through", action="store_true",
                    help="train on the hard decisions (the soft gates' gradient)")
    tr.add_argument("--threshold", type=float, default=0.5,
                    help="decision threshold (straight-through training, kept-layer report)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", help="router file (default: next to the model)")
    tr.add_argument("--threads", type=int, default=None, help="torch and engine threads")
    tr.set_defaults(func=_train_routers)
    from .eval.cli import add_eval_parser
    add_eval_parser(sub)
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
