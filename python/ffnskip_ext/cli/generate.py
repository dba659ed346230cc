"""``ffnskip generate "PROMPT"``: generate text, streamed to stdout, stats to stderr."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .options import (
    add_model_options,
    add_sampling_options,
    load_model,
    policy_named,
    sampling_kwargs,
    set_policy,
    warmup_note,
)


def add_parser(subparsers: Any) -> None:
    gen = subparsers.add_parser("generate", help="generate text from a prompt",
                                description=__doc__.splitlines()[0].replace("``", ""))
    gen.add_argument("prompt", nargs="?",
                     help="the prompt; '-' reads it from stdin (see also --file)")
    gen.add_argument("--file", help="read the prompt from this file")
    add_model_options(gen)
    add_sampling_options(gen)
    gen.add_argument("--system", help="system message for the chat template")
    gen.add_argument("--raw", action="store_true", help="no chat template: encode the prompt as is")
    gen.add_argument("--speculative", choices=("ngram", "self", "auto"),
                     help="lossless speculative decoding: draft with prompt lookup, the model "
                     "under a skip policy, or both; the policy verifies")
    gen.add_argument("--draft-max", type=int, default=8,
                     help="most tokens drafted per round (1..64)")
    gen.add_argument("--draft-policy", help="skip policy of self drafts, as --policy (default: "
                     "FFN-SkipLLM from the first token)")
    gen.set_defaults(func=run)


def read_prompt(args: argparse.Namespace) -> str:
    if args.file is not None:
        if args.prompt is not None:
            raise ValueError("give the prompt as an argument or with --file, not both")
        with open(args.file, encoding="utf-8") as f:
            return f.read()
    if args.prompt == "-":
        return sys.stdin.read()
    if args.prompt is None:
        raise ValueError("no prompt: pass it as an argument, '-' for stdin, or --file PATH")
    return args.prompt


def run(args: argparse.Namespace) -> int:
    from ..runtime.generate import generate

    text = read_prompt(args)
    from ..runtime.speculative import Speculative

    speculative = None
    if args.speculative:
        speculative = Speculative(
            draft=args.speculative, max_draft=args.draft_max,
            draft_policy=policy_named(args.draft_policy, args) if args.draft_policy else None)
    decoder, tokenizer = load_model(args)
    set_policy(decoder, args)
    if args.raw:
        prompt: str | list[dict[str, str]] = text
    else:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": text}
        ]

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        result = generate(decoder, tokenizer, prompt, stream=stream, speculative=speculative,
                          **sampling_kwargs(args))
    except KeyboardInterrupt:  # Ctrl-C: what was decoded so far, and no traceback
        sys.stdout.write("\n")
        if not args.quiet:
            print(f"[interrupted after {decoder.stats().decode_tokens} decode steps, policy "
                  f"{decoder.policy.kind}]", file=sys.stderr)
        return 130
    sys.stdout.write("\n")
    if args.quiet:
        return 0
    stats = decoder.stats()
    print(
        f"[{len(result.token_ids)} tokens, finish={result.finish_reason}, "
        f"prompt {result.prompt_tokens} tokens in {result.prefill_ms:.1f} ms, "
        f"decode {result.decode_tokens_per_s:.1f} tokens/s, policy {decoder.policy.kind}, "
        f"FFN skip ratio {stats.skip_ratio:.1%} ({stats.skip_ratio_after_warmup:.1%} after "
        f"warm-up){warmup_note(decoder)}, layer skip ratio {stats.layer_skip_ratio:.1%}]",
        file=sys.stderr,
    )
    if result.speculative is not None:
        spec = result.speculative
        print(
            f"[speculative {args.speculative}: {spec.accepted}/{spec.drafted} drafted tokens "
            f"accepted ({spec.acceptance_rate:.1%}), {spec.mean_accepted_length:.2f} per verify "
            f"pass, {spec.verify_passes} passes, draft {spec.draft_seconds:.2f} s, verify "
            f"{spec.verify_seconds:.2f} s, {result.decode_tokens_per_s:.1f} tokens/s]",
            file=sys.stderr,
        )
    return 0
