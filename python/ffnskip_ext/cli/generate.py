"""``ffnskip generate "PROMPT"``: generate text, streamed to stdout, stats to stderr."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .options import add_model_options, load_model, model_path


def add_parser(subparsers: Any) -> None:
    gen = subparsers.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("prompt")
    add_model_options(gen)
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
    gen.add_argument("--speculative", choices=("ngram", "self", "auto"),
                     help="lossless speculative decoding: draft with prompt lookup, the model "
                     "under a skip policy, or both; the policy verifies")
    gen.add_argument("--draft-max", type=int, default=8,
                     help="most tokens drafted per round (1..64)")
    gen.add_argument("--draft-policy", help="skip policy of self drafts, as --policy (default: "
                     "FFN-SkipLLM from the first token)")
    gen.set_defaults(func=run)


def _policy(name: str, args: argparse.Namespace) -> Any:
    from ..runtime.policies import FiRSTPolicy, load_policy

    if name == "first":  # the routers trained for this model, next to it
        return FiRSTPolicy.for_model(model_path(args))
    return load_policy(name)


def run(args: argparse.Namespace) -> int:
    from ..runtime.generate import generate
    from ..runtime.speculative import Speculative

    speculative = None
    if args.speculative:
        speculative = Speculative(
            draft=args.speculative, max_draft=args.draft_max,
            draft_policy=_policy(args.draft_policy, args) if args.draft_policy else None)
    decoder, tokenizer = load_model(args)
    if args.policy:
        decoder.set_policy(_policy(args.policy, args))
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
        speculative=speculative,
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
