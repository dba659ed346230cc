"""``ffnskip calibrate --target R --out FILE``: fit FFN-SkipLLM to a skip ratio;
``ffnskip calibrate --for speculation --out FILE``: the fastest self draft on this machine."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from .options import add_model_options, load_model


def add_parser(subparsers: Any) -> None:
    cal = subparsers.add_parser(
        "calibrate", help="fit an FFN-SkipLLM policy to a target skip ratio, or tune a "
                          "speculative draft for speed (--for speculation)")
    add_model_options(cal)
    cal.add_argument("--for", dest="purpose", choices=("skip-ratio", "speculation"),
                     default="skip-ratio",
                     help="skip-ratio: the FFN-SkipLLM policy closest to --target that keeps "
                          "dense answers best; speculation: the self-draft policy whose "
                          "lossless speculative decoding measures fastest")
    cal.add_argument("--target", type=float,
                     help="share of FFN sub-blocks to skip over the generated tokens, e.g. 0.2 "
                          "(required for --for skip-ratio)")
    cal.add_argument("--prompts", help="text file (a prompt per line) or JSONL (prompt/messages);"
                                       " default: four everyday chat requests")
    cal.add_argument("--out", required=True, help="where to write the policy JSON")
    cal.add_argument("--max-new-tokens", type=int, default=None,
                     help="tokens generated per calibration prompt (default: 64 for "
                          "skip-ratio, 32 for speculation)")
    cal.add_argument("--warmup-tokens", type=int, default=32,
                     help="skip-ratio: first generated tokens that always run dense")
    cal.add_argument("--tolerance", type=float, default=0.02,
                     help="skip-ratio: how far the measured skip ratio may be from --target")
    cal.add_argument("--max-skips", type=int, default=None,
                     help="skip-ratio: consider only policies that skip at most this many FFNs "
                          "per token (default: try 1, 2, 4, 8 and no limit, keep the best)")
    cal.add_argument("--strict", action="store_true",
                     help="skip-ratio: fail (exit 2) when no policy comes within --tolerance, "
                          "instead of writing the closest one with a warning")
    cal.add_argument("--draft-max", type=int, default=8,
                     help="speculation: the longest draft considered (1-64)")
    cal.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..tuning.calibration import DEFAULT_PROMPTS, read_prompts

    if args.purpose == "speculation":
        check = _check_speculation_arguments
    else:
        check = _check_skip_ratio_arguments
    check(args)
    prompts = (read_prompts(args.prompts) if args.prompts
               else [[{"role": "user", "content": p}] for p in DEFAULT_PROMPTS])
    decoder, tokenizer = load_model(args)
    if args.purpose == "speculation":
        policy = _calibrate_speculation(args, decoder, tokenizer, prompts)
    else:
        policy = _calibrate_skip_ratio(args, decoder, tokenizer, prompts)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(policy.to_json() + "\n")
    print(f"wrote {args.out}: {policy}", file=sys.stderr)
    return 0


def _check_skip_ratio_arguments(args: argparse.Namespace) -> None:
    from ..tuning.calibration import check_calibration_arguments

    if args.target is None:
        raise ValueError("--target is required (or use --for speculation)")
    if args.max_new_tokens is None:
        args.max_new_tokens = 64
    check_calibration_arguments(args.target, args.max_new_tokens, args.warmup_tokens,
                                args.tolerance, _budgets(args))


def _budgets(args: argparse.Namespace) -> tuple[int | None, ...]:
    from ..tuning.calibration import DEFAULT_BUDGETS

    return DEFAULT_BUDGETS if args.max_skips is None else (args.max_skips,)


def _check_speculation_arguments(args: argparse.Namespace) -> None:
    from ..tuning.draft import DEFAULT_TOKENS, check_draft_arguments

    if args.target is not None:
        raise ValueError("--target is for --for skip-ratio; a speculative draft is tuned for "
                         "speed, not to a skip ratio")
    if args.max_skips is not None:
        raise ValueError("--max-skips is for --for skip-ratio")
    if args.max_new_tokens is None:
        args.max_new_tokens = DEFAULT_TOKENS
    check_draft_arguments(args.max_new_tokens, args.draft_max)


def _calibrate_skip_ratio(args: argparse.Namespace, decoder: Any, tokenizer: Any,
                          prompts: list[Any]) -> Any:
    from ..tuning.calibration import CalibrationWarning, calibrate

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        policy = calibrate(
            decoder, tokenizer, prompts, args.target, max_new_tokens=args.max_new_tokens,
            warmup_tokens=args.warmup_tokens, budgets=_budgets(args), tolerance=args.tolerance,
            strict=args.strict,
        )
    for warning in caught:
        if issubclass(warning.category, CalibrationWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename,
                                 warning.lineno)
    return policy


def _calibrate_speculation(args: argparse.Namespace, decoder: Any, tokenizer: Any,
                           prompts: list[Any]) -> Any:
    from ..tuning.draft import calibrate_draft

    found = calibrate_draft(decoder, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                            max_draft=args.draft_max, progress=not args.quiet)
    costs = found.costs
    print(f"costs: dense step {costs.step * 1e3:.1f} ms, attention sub-block "
          f"{costs.attention * 1e3:.2f} ms, FFN sub-block {costs.ffn * 1e3:.2f} ms, verify of "
          f"{len(costs.verify)} tokens {costs.verify[-1] * 1e3:.1f} ms", file=sys.stderr)
    print(f"draft: one-step agreement {found.agreement:.2f}, draft length {found.max_draft}; "
          f"speculative decoding {found.measured_speedup:.2f}x plain decoding on the "
          f"calibration prompts (predicted {found.predicted_speedup:.2f}x)", file=sys.stderr)
    if found.measured_speedup < 1.0:
        print("warning: no self draft beats plain decoding on this machine; the fastest one "
              "is written anyway", file=sys.stderr)
    print(f"use: ffnskip generate --speculative self --draft-policy {args.out} "
          f"--draft-max {found.max_draft} ...", file=sys.stderr)
    return found.policy
