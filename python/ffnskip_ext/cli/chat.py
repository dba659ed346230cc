"""``ffnskip chat``: an interactive conversation, answers streamed, the KV cache kept between
turns (``ChatSession``) so that each turn prefills only its new message."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from .options import (
    add_model_options,
    add_sampling_options,
    load_model,
    sampling_kwargs,
    set_policy,
)

COMMANDS = "/reset starts over, /stats shows counters, Ctrl-C stops an answer, Ctrl-D exits"


def add_parser(subparsers: Any) -> None:
    chat = subparsers.add_parser("chat", help="interactive multi-turn chat",
                                 description=__doc__.replace("``", ""))
    add_model_options(chat)
    add_sampling_options(chat)
    chat.set_defaults(max_new_tokens=512)
    chat.add_argument("--system", help="system message of the conversation")
    chat.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime.session import ChatSession

    decoder, tokenizer = load_model(args)
    set_policy(decoder, args)
    session = ChatSession(decoder, tokenizer)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[dict[str, str]] = list(start)
    interactive = sys.stdin.isatty()
    if not args.quiet:
        print(f"ffnskip chat: {COMMANDS}", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, as Python's REPL does
            print()
            continue
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            session.reset()
            messages = list(start)
            print("[conversation cleared]", file=sys.stderr)
            continue
        if text == "/stats":
            _print_stats(decoder, session)
            continue
        if text.startswith("/"):
            print(f"[unknown command {text}: {COMMANDS}]", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        result = _answer(session, messages, args)
        messages.append({"role": "assistant", "content": result.text})
        if not args.quiet:
            print(f"[{len(result.token_ids)} tokens, finish={result.finish_reason}, prompt "
                  f"{result.prompt_tokens} tokens ({result.cached_tokens} cached), decode "
                  f"{result.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)


def _answer(session: Any, messages: list[dict[str, str]], args: argparse.Namespace) -> Any:
    """One streamed answer; Ctrl-C ends it at the next token (finish "cancelled"), keeping
    the cache consistent for the next turn."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        result = session.generate(messages, stream=stream, cancelled=stop.is_set,
                                  **sampling_kwargs(args))
    finally:
        signal.signal(signal.SIGINT, previous)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return result


def _print_stats(decoder: Any, session: Any) -> None:
    stats = decoder.stats()
    print(f"[cache {decoder.position}/{decoder.max_seq_len} tokens "
          f"({len(session.cached_ids)} reusable), {stats.decode_tokens} decode steps, policy "
          f"{decoder.policy.kind}, FFN skip ratio {stats.skip_ratio:.1%}, layer skip ratio "
          f"{stats.layer_skip_ratio:.1%}]", file=sys.stderr)
