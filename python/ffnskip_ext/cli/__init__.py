"""Command line: ``ffnskip SUBCOMMAND`` (also ``python -m ffnskip_ext SUBCOMMAND``).

Subcommands: generate, chat, calibrate, train-routers, eval, trend, models, serve; each
module here adds its parser.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import calibrate, chat, eval, generate, models, serve, train_routers, trend
from .options import HelpFormatter

SUBCOMMANDS = (generate, chat, calibrate, train_routers, eval, trend, models, serve)


class _Parser(argparse.ArgumentParser):
    """Subcommand parsers (and theirs) show the defaults of their options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ffnskip",
                                     description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {importlib.metadata.version('ffnskip_ext')}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
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
    except KeyboardInterrupt:  # Ctrl-C outside a generation (loading): no traceback
        print("ffnskip: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as a process killed by SIGPIPE does;
        # stdout goes to /dev/null so that the interpreter's last flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
