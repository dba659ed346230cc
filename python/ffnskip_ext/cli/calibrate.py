"""``ffnskip calibrate --target R --out FILE``: fit FFN-SkipLLM to a skip ratio."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from .options import add_model_options, load_model


def add_parser(subparsers: Any) -> None:
    cal = subparsers.add_parser("calibrate",
                                help="fit an FFN-SkipLLM policy to a target skip ratio")
    add_model_options(cal)
    cal.add_argument("--target", type=float, required=True,
                     help="share of FFN sub-blocks to skip over the generated tokens, e.g. 0.2")
    cal.add_argument("--prompts", help="text file (a prompt per line) or JSONL (prompt/messages);"
                                       " default: four everyday chat requests")
    cal.add_argument("--out", required=True, help="where to write the policy JSON")
    cal.add_argument("--max-new-tokens", type=int, default=64,
                     help="tokens generated per calibration prompt")
    cal.add_argument("--warmup-tokens", type=int, default=32,
                     help="first generated tokens that always run dense")
    cal.add_argument("--tolerance", type=float, default=0.02,
                     help="how far the measured skip ratio may be from --target")
    cal.add_argument("--strict", action="store_true",
                     help="fail (exit 2) when no policy comes within --tolerance, instead of "
                          "writing the closest one with a warning")
    cal.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..tuning.calibration import (
        DEFAULT_PROMPTS,
        CalibrationWarning,
        calibrate,
        check_calibration_arguments,
        read_prompts,
    )

    check_calibration_arguments(args.target, args.max_new_tokens, args.warmup_tokens,
                                args.tolerance)
    prompts = (read_prompts(args.prompts) if args.prompts
               else [[{"role": "user", "content": p}] for p in DEFAULT_PROMPTS])
    decoder, tokenizer = load_model(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        policy = calibrate(
            decoder, tokenizer, prompts, args.target, max_new_tokens=args.max_new_tokens,
            warmup_tokens=args.warmup_tokens, tolerance=args.tolerance, strict=args.strict,
        )
    for warning in caught:
        if issubclass(warning.category, CalibrationWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename,
                                 warning.lineno)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(policy.to_json() + "\n")
    print(f"wrote {args.out}: {policy}", file=sys.stderr)
    return 0
