"""``ffnskip trend DIR DIR ...``: quality against model size from several models' sweeps."""

from __future__ import annotations

import argparse
import shlex
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "trend", help="quality at each skip target against model size, from eval sweeps",
        description=__doc__)
    p.add_argument("dirs", nargs="+", metavar="DIR",
                   help="evaluation directories of ffnskip eval --sweep, one per model")
    p.add_argument("--targets", default="0.1,0.2", help="skip targets to compare")
    p.add_argument("--out", required=True, help="output directory (size_trend.md and .png)")
    p.add_argument("--no-plots", action="store_true", help="the table only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..eval.trend import write_trend

    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    if not targets or any(not 0 < t < 1 for t in targets):
        raise ValueError(f"--targets: skip ratios between 0 and 1, got {args.targets!r}")
    command = ["ffnskip", "trend", *args.dirs, "--targets", args.targets, "--out", args.out]
    path = write_trend(args.dirs, args.out, targets, shlex.join(command),
                       plots=not args.no_plots)
    print(f"wrote {path}")
    return 0
