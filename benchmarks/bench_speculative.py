"""Lossless speculative decoding against plain decoding and llama.cpp, per kind of task.

For one model (default SmolLM2-135M; --model takes a path or a name of `ffnskip models list`,
weights as the file stores them), greedy, on the CPU:

- ffnskip_ext dense, and with ``speculative=`` each of ngram, self and auto (the draft policy
  of --draft-policy, default FFN-SkipLLM from the first token); every speculative answer is
  checked token for token against dense;
- llama.cpp (llama-cpp-python) on the same GGUF file, plain and with its prompt-lookup draft
  ``LlamaPromptLookupDecoding(max_ngram_size=--ngram-max, num_pred_tokens=--draft-max)``,
  fed the same prompt token ids.

Task kinds, from the bundled evaluation sets: factoid QA (qa.jsonl), summarisation
(summarization.jsonl), rewriting / editing a given text or code (a summarisation passage to
rewrite in the past tense; a code.jsonl reference solution whose function is to be renamed)
and chat (the first turn of chat.jsonl). Decode tokens/s is (tokens after the first) / (time
after the first), so prefill is left out alike for every engine; acceptance and mean accepted
length (draft tokens kept per verify pass) come from ``GenerationResult.speculative``
(llama-cpp-python reports neither). Rounds interleave the engines, alternating their order;
the table gives per task kind the median over rounds of the mean over prompts.

    python benchmarks/bench_speculative.py [--model NAME|PATH] [--tokens 128] [--prompts 4]
        [--rounds 3] [--threads N] [--draft-max 8] [--draft-policy FILE]
        [--engines dense,ngram,self,auto,llama.cpp,llama.cpp-lookup] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import ffnskip_ext
from ffnskip_ext import Speculative, load_policy
from ffnskip_ext.eval import load_task
from ffnskip_ext.eval.tasks import SUMMARY_INSTRUCTION
from ffnskip_ext.loaders.models import resolve_model

OURS = ("dense", "ngram", "self", "auto")
LLAMA = ("llama.cpp", "llama.cpp-lookup")
TASKS = ("qa", "summarisation", "rewriting", "chat")


def task_prompts(count: int) -> dict[str, list[list[dict[str, str]]]]:
    """`count` chat prompts per task kind, from the test split of the bundled sets."""
    def user(text: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": text}]

    def test(task: str) -> list[Any]:
        return [item for item in load_task(task) if item.split == "test"]

    passages = test("summarization")
    code = test("code")
    rewrites = []
    for i in range(count):  # alternate a text edit and a code edit
        if i % 2 == 0:
            passage = passages[i // 2 % len(passages)].passage
            rewrites.append(user("Rewrite the following passage in the past tense, changing "
                                 "nothing else.\n\n" + passage))
        else:
            item = code[i // 2 % len(code)]
            source = item.prompt + item.solution
            rewrites.append(user(f"Rename the function `{item.entry_point}` to `solve` and "
                                 f"return the whole code.\n\n```python\n{source}```"))
    return {
        "qa": [user(item.question) for item in test("qa")[:count]],
        "summarisation": [user(SUMMARY_INSTRUCTION + item.passage) for item in passages[:count]],
        "rewriting": rewrites,
        "chat": [user(item.turns[0]) for item in test("chat")[:count]],
    }


class Run:
    """One answer: its tokens, decode tokens/s and, for our speculative modes, the stats."""

    def __init__(self, tokens: list[int], rate: float, spec: Any = None) -> None:
        self.tokens, self.rate, self.spec = tokens, rate, spec


class Ours:
    def __init__(self, decoder: ffnskip_ext.Decoder, tokenizer: Any, mode: str,
                 spec: Speculative | None) -> None:
        self.name, self.decoder, self.tokenizer, self.spec = mode, decoder, tokenizer, spec

    def run(self, prompt: list[dict[str, str]], tokens: int) -> Run:
        result = ffnskip_ext.generate(self.decoder, self.tokenizer, prompt,
                                      max_new_tokens=tokens, speculative=self.spec)
        return Run(result.token_ids, result.decode_tokens_per_s, result.speculative)


class LlamaCpp:
    """llama-cpp-python on the same file and the same prompt ids, greedy."""

    def __init__(self, path: str, threads: int, n_ctx: int, lookup: Any | None,
                 tokenizer: Any, eos_ids: set[int]) -> None:
        import llama_cpp

        self.name = "llama.cpp-lookup" if lookup is not None else "llama.cpp"
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, n_batch=512, verbose=False,
                                   draft_model=lookup)
        self.tokenizer = tokenizer
        self.eos = eos_ids | {self.llm.token_eos()}

    def run(self, prompt: list[dict[str, str]], tokens: int) -> Run:
        ids = ffnskip_ext.encode_prompt(self.tokenizer, prompt)
        self.llm.reset()
        out: list[int] = []
        first = last = time.perf_counter()
        for token in self.llm.generate(ids, temp=0.0, reset=True):
            last = time.perf_counter()
            if not out:
                first = last
            if token in self.eos:
                break
            out.append(int(token))
            if len(out) == tokens:
                break
        decided = len(out) - 1 + (len(out) < tokens)  # an end of sequence was decided too
        rate = decided / (last - first) if decided > 0 and last > first else 0.0
        return Run(out, rate)


def make_engines(args: argparse.Namespace, path: str) -> list[Any]:
    decoder = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=args.max_seq_len,
                                                  num_threads=args.threads)
    tokenizer = ffnskip_ext.load_tokenizer(path)
    draft_policy = load_policy(args.draft_policy) if args.draft_policy else None
    engines: list[Any] = []
    for name in args.engines:
        if name in OURS:
            spec = None if name == "dense" else Speculative(
                draft=name, draft_policy=draft_policy, max_draft=args.draft_max,
                ngram_max=args.ngram_max, ngram_min=args.ngram_min)
            engines.append(Ours(decoder, tokenizer, name, spec))
        else:
            lookup = None
            if name == "llama.cpp-lookup":
                from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

                lookup = LlamaPromptLookupDecoding(max_ngram_size=args.ngram_max,
                                                   num_pred_tokens=args.draft_max)
            eos_ids = set(decoder.config.eos_token_ids)
            if getattr(tokenizer, "eos_token_id", None) is not None:
                eos_ids.add(int(tokenizer.eos_token_id))
            engines.append(LlamaCpp(path, args.threads or os.cpu_count() or 1,
                                    args.max_seq_len, lookup, tokenizer, eos_ids))
    return engines


def measure(engines: Sequence[Any], prompts: dict[str, list[Any]], rounds: int, tokens: int,
            log: Callable[[str], None]) -> dict[tuple[str, str], list[list[Run]]]:
    """runs[(task, engine)][round][prompt]; engines interleaved per prompt, order alternating."""
    runs: dict[tuple[str, str], list[list[Run]]] = {
        (t, e.name): [] for t in prompts for e in engines}
    for r in range(rounds):
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        for task, items in prompts.items():
            per_engine: dict[str, list[Run]] = {e.name: [] for e in engines}
            for prompt in items:
                for engine in order:
                    time.sleep(0.1)  # the previous engine's spinning threads go to sleep
                    per_engine[engine.name].append(engine.run(prompt, tokens))
            for name, got in per_engine.items():
                runs[(task, name)].append(got)
            log(f"round {r + 1}/{rounds} {task}: " + ", ".join(
                f"{n} {np.mean([x.rate for x in got]):.1f}" for n, got in per_engine.items()))
    return runs


def report(runs: dict[tuple[str, str], list[list[Run]]], engines: Sequence[Any],
           log: Callable[[str], None]) -> None:
    names = [e.name for e in engines]
    for task in TASKS:
        if (task, names[0]) not in runs:
            continue
        log(f"\n### {task}\n")
        log("| engine | decode tok/s | x dense | x llama.cpp | acceptance | mean accepted | "
            "identical to dense |")
        log("|---|---|---|---|---|---|---|")
        rate = {n: statistics.median(np.mean([x.rate for x in rnd]) for rnd in runs[(task, n)])
                for n in names}
        dense = runs.get((task, "dense"))
        for name in names:
            rounds = runs[(task, name)]
            specs = [x.spec for rnd in rounds for x in rnd if x.spec is not None]
            drafted = sum(s.drafted for s in specs)
            accepted = sum(s.accepted for s in specs)
            passes = sum(s.verify_passes for s in specs)
            same = "-"
            if dense is not None and name != "dense":
                pairs = [(a.tokens, b.tokens) for ra, rb in zip(rounds, dense, strict=True)
                         for a, b in zip(ra, rb, strict=True)]
                same = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
            log(f"| {name} | {rate[name]:.1f} | {ratio(rate[name], rate.get('dense'))} | "
                f"{ratio(rate[name], rate.get('llama.cpp'))} | "
                f"{f'{accepted / drafted:.1%}' if drafted else '-'} | "
                f"{f'{accepted / passes:.2f}' if passes else '-'} | {same} |")


def ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}" if b else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a path or a name of `ffnskip models list`")
    parser.add_argument("--tokens", type=int, default=128, help="max new tokens per answer")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per task kind")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--draft-max", type=int, default=8)
    parser.add_argument("--ngram-max", type=int, default=3)
    parser.add_argument("--ngram-min", type=int, default=2,
                        help="shortest n-gram match that drafts (ours; llama.cpp's lookup: 1)")
    parser.add_argument("--draft-policy", default=None, help="policy file or name for self drafts")
    parser.add_argument("--engines", default=",".join(OURS + LLAMA),
                        type=lambda s: [x for x in s.split(",") if x])
    parser.add_argument("--tasks", default=",".join(TASKS),
                        type=lambda s: [x for x in s.split(",") if x])
    parser.add_argument("--out", default=None, help="also write the report (markdown) here")
    args = parser.parse_args()
    unknown = set(args.engines) - set(OURS + LLAMA) or set(args.tasks) - set(TASKS)
    if unknown:
        parser.error(f"unknown engine or task: {', '.join(sorted(unknown))}")

    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    path = resolve_model(args.model)
    log("# Speculative decoding benchmark\n")
    log(f"`{' '.join(['python', *sys.argv])}`\n")
    log(f"model `{os.path.basename(path)}`, {args.tokens} new tokens, {args.prompts} prompts "
        f"per task, {args.rounds} rounds, threads {args.threads or os.cpu_count()}, "
        f"draft max {args.draft_max}, {platform.processor() or platform.machine()}")
    engines = make_engines(args, path)
    prompts = {t: p for t, p in task_prompts(args.prompts).items() if t in args.tasks}
    for engine in engines:  # warm-up: page in the weights, start the threads
        engine.run(prompts[args.tasks[0]][0], 8)
    runs = measure(engines, prompts, args.rounds, args.tokens, log)
    report(runs, engines, log)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
