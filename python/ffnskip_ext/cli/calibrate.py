"""``ffnskip calibrate --target R --out FILE``: fit FFN-SkipLLM to a skip ratio."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .options import add_model_options, load_model


def add_parser(subparsers: Any) -> None:
    cal = subparsers.add_parser("calibrate",
                                help="fit an FFN-SkipLLM policy to a target skip ratio")
    add_model_options(cal)
    cal.add_argument("--target", type=float, required=True, help="FFN skip ratio, e.g. 0.2")
    cal.add_argument("--prompts", help="text file (a prompt per line) or JSONL (prompt/messages)")
    cal.add_argument("--out", required=True, help="where to write the policy JSON")
    cal.add_argument("--max-new-tokens", type=int, default=64)
    cal.add_argument("--warmup-tokens", type=int, default=32)
    cal.add_argument("--tolerance", type=float, default=0.02)
    cal.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..tuning.calibration import DEFAULT_PROMPTS, calibrate, read_prompts

    decoder, tokenizer = load_model(args)
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
