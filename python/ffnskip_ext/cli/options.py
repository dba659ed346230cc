"""The options subcommands share (model, sampling, policy), loading the model they name, and
the conventions of their output (progress on stderr)."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from .. import _core

# The engine's dtype names and the short forms it accepts too.
DTYPE_CHOICES = (*_core.DTYPES, "fp32", "fp16", "bf16")
KV_CACHE_DTYPE_CHOICES = ("auto", "float32", "float16", "fp32", "fp16")
# "owner/name" with nothing on disk there: what a Hugging Face Hub id looks like.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help where X says something (not None or False)
    and the help does not name its default already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a .gguf file, a Hugging Face directory or a model name "
                        "of `ffnskip models list` (default: smollm2-135m)")
    parser.add_argument("--device", default="cpu", choices=_core.DEVICES, help="where to run")
    parser.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                        help="weight storage: auto (as the file stores them, the default) or a "
                        "conversion")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="context length the KV cache is allocated for (default: the "
                        "model's, at most 8192)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: all)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPE_CHOICES,
                        help="the KV cache's elements: auto (float32 on the CPU, the "
                        "activation dtype on CUDA) or, on the CPU, float16 (half the memory "
                        "and bytes per step)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress or statistics on stderr")


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="most tokens to generate per answer")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 is greedy")
    parser.add_argument("--top-k", type=int, default=0,
                        help="sample among the k most likely tokens; 0: all")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample among the most likely tokens of this total probability")
    parser.add_argument("--min-p", type=float, default=0.0,
                        help="drop tokens less likely than this times the most likely one")
    parser.add_argument("--repeat-penalty", type=float, default=1.0,
                        help="> 1 discourages tokens already in the conversation (greedy too)")
    parser.add_argument("--seed", type=int, default=None, help="random seed of the sampler")
    parser.add_argument("--stop", action="append", type=unescape,
                        help="stop string, with \\n and \\t escapes (repeatable)")
    parser.add_argument("--policy", help="skip policy: a JSON file, 'ffn-skip', 'dense' or "
                        "'first' (FiRST routers of the model)")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop)


def unescape(text: str) -> str:
    """\\n, \\t, \\r and \\\\ as the characters a shell argument cannot easily hold."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[0]), text)


def model_path(args: argparse.Namespace) -> str:
    from ..loaders.models import resolve_model

    if args.model and not os.path.exists(args.model) and _HUB_ID.fullmatch(args.model):
        raise FileNotFoundError(
            f"{args.model}: looks like a Hugging Face Hub id, but nothing is downloaded from a "
            "hub: pass a local .gguf file or model directory, or a name of `ffnskip models "
            "list` (fetched with `ffnskip models pull NAME`)")
    return resolve_model(args.model)


def policy_named(name: str, args: argparse.Namespace) -> Any:
    """A policy file, a preset, or 'first' (the routers trained for the model)."""
    from ..runtime.policies import FiRSTPolicy, load_policy

    if name == "first":
        return FiRSTPolicy.for_model(model_path(args))
    return load_policy(name)


def set_policy(decoder: Any, args: argparse.Namespace) -> None:
    """Applies ``--policy``, with a warning for a policy known to change answers."""
    from ..runtime.policies import is_aggressive

    if args.policy:
        policy = policy_named(args.policy, args)
        if is_aggressive(policy) and not getattr(args, "quiet", False):
            print("warning: an FFN-SkipLLM policy without max_skips_per_token often turns "
                  "answers into garbage after its warm-up; the 'ffn-skip' preset caps it at 4, "
                  "or draft with it (--speculative self) for dense output", file=sys.stderr)
        decoder.set_policy(policy)


def warmup_note(decoder: Any) -> str:
    """Why an FFN-SkipLLM run skipped nothing when every decode step was in its warm-up."""
    stats = decoder.stats()
    warmup = getattr(decoder.policy, "warmup_tokens", 0)
    if stats.decode_tokens and stats.warmup_tokens == stats.decode_tokens:
        return (f" (all {stats.decode_tokens} decode steps were inside the policy's warm-up "
                f"of {warmup} tokens, which never skips)")
    return ""


@contextlib.contextmanager
def progress(what: str, quiet: bool) -> Iterator[None]:
    """Says on stderr what is being done when it takes more than a second, and how long it
    took; says nothing when quick or ``quiet``."""
    start = time.perf_counter()
    said = threading.Event()

    def say() -> None:
        print(f"ffnskip: {what}...", file=sys.stderr, flush=True)
        said.set()

    timer = threading.Timer(1.0, say)
    timer.daemon = True
    if not quiet:
        timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if timer.is_alive():
            timer.join()
        if said.is_set():
            print(f"ffnskip: {what}: {time.perf_counter() - start:.1f} s", file=sys.stderr)


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The decoder and tokenizer of ``--model`` with the other model options."""
    from ..runtime.decoder import Decoder
    from ..runtime.tokenizer import load_tokenizer

    path = model_path(args)
    quiet = getattr(args, "quiet", False)
    with progress(f"loading {os.path.basename(path)}", quiet):
        decoder = Decoder.from_pretrained(
            path, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
            num_threads=args.threads, kv_cache_dtype=args.kv_cache_dtype,
        )
    with progress("loading the tokenizer", quiet):
        tokenizer = load_tokenizer(path)
    return decoder, tokenizer
