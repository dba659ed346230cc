"""Command line: ``ffnskip SUBCOMMAND`` (also ``python -m ffnskip_ext SUBCOMMAND``).

Subcommands: generate, calibrate, train-routers, eval, models, serve; each module here adds
its parser.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import calibrate, eval, generate, models, serve, train_routers

SUBCOMMANDS = (generate, calibrate, train_routers, eval, models, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ffnskip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.add_parser(sub)
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
