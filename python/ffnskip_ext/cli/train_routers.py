"""``ffnskip train-routers [MODEL]``: train FiRST layer routers (PyTorch) for a model."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def add_parser(subparsers: Any) -> None:
    tr = subparsers.add_parser("train-routers", help="train FiRST layer routers for a model")
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
    tr.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..loaders.models import resolve_model
    from ..training.first import train_routers

    if args.model and args.model_option and args.model != args.model_option:
        raise ValueError("give the model once: as MODEL or as --model")
    model = resolve_model(args.model or args.model_option)
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
