"""Runs a model under a list of policies over the tasks and writes one row per (policy, task).

Every policy decodes exactly like ``ffnskip_ext.generate`` (greedy), so the skip rule sees
the same per-token decode steps as in real use. The dense policy always runs first: the
agreement metrics compare each policy with its outputs. Rows are appended to
``rows.jsonl`` as soon as they finish, so an interrupted run keeps them and ``resume=True``
skips them.

Per task (``samples`` keeps the per-item outputs, ``metrics`` the means):

- ``qa``: ``exact`` and ``contains`` match of the answer (see ``metrics``);
- ``summarization``: ``rouge_l_ref`` (against the reference summary) and ``rouge_l_dense``
  (against the dense model's summary);
- ``chat``: every turn is answered in a conversation that holds the policy's own earlier
  answers; ``rouge_l_dense`` per answer and ``collapse_rate``, the share of answers ending
  in a repeated n-gram loop;
- ``code``: the function of every problem is completed (greedy, generation ends once the
  answer's code block closes), its code extracted (``codetask.extract_code``) and the hidden
  tests run in the sandbox (``sandbox.run_tests``, at most ``SANDBOX_WORKERS`` processes at
  a time, after the decoding so that they do not share the CPU with timed decode steps);
  ``passed`` and ``status`` per problem, ``pass@1`` their mean;
- generation tasks also get ``first_divergence`` (mean index of the first token that
  differs from the dense output) and ``identical`` (share of outputs equal to dense);
- ``perplexity``: windows of ``ppl_window`` tokens of prose; the first ``ppl_prompt`` tokens
  are prefilled under the policy as the window's prompt (FiRST routes on them), and every
  later one is fed with ``step`` under the policy (no prefill shortcut), summing -log softmax
  of the next token from the prompt's last token on; ``token_agreement`` is the share of
  those positions whose argmax equals the dense model's argmax there (teacher forced, so
  positions stay aligned).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..runtime.decoder import Decoder
from ..runtime.generate import GenerationResult, Message, generate
from ..runtime.policies import DensePolicy, Policy, policy_from_dict
from ..runtime.speculative import Speculative, SpeculativeStats
from . import metrics
from .codetask import code_end, code_message, extract_code
from .sandbox import SandboxJob, run_batch
from .tasks import (
    QA_STOP,
    TASKS,
    Window,
    chat_opening,
    load_task,
    prose_windows,
    qa_messages,
    select,
    summary_messages,
)

ROWS_FILE = "rows.jsonl"
DENSE = "dense"
GENERATION_TASKS = ("qa", "summarization", "chat", "code")
SANDBOX_WORKERS = 2  # test runs of the code task at a time
CODE_TIMEOUT_S = 10.0  # wall-clock limit of one problem's test run


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """A policy with the name it has in rows and reports; ``method`` groups policies in the
    report (a policy kind or a user label) and ``target`` is the skip ratio it was matched to
    (None when it was not). With ``speculative``, generation tasks decode speculatively,
    verified by the policy: a lossless row, whose outputs must equal the policy's own."""

    name: str
    policy: Policy
    method: str
    target: float | None = None
    speculative: Speculative | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "target": self.target,
                "policy": self.policy.to_dict(),
                "speculative": None if self.speculative is None else self.speculative.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicySpec:
        speculative = data.get("speculative")
        return cls(data["name"], policy_from_dict(data["policy"]), data["method"],
                   data.get("target"),
                   None if speculative is None else Speculative.from_dict(speculative))


def runs_task(speculative: bool, task: str) -> bool:
    """Whether a policy evaluates ``task``: speculation changes nothing teacher-forced, so
    lossless rows skip perplexity."""
    return not speculative or task in GENERATION_TASKS


def pending_rows(policies: Sequence[tuple[str, bool]], tasks: Sequence[str],
                 rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """The (policy, task) rows, in run order, that ``rows`` lacks: each policy, given as its
    name and whether it speculates, on each of ``tasks`` that it runs."""
    done = {(r["policy"], r["task"]) for r in rows}
    return [(name, task) for name, speculative in policies for task in tasks
            if (name, task) not in done and runs_task(speculative, task)]


DENSE_SPEC = PolicySpec(DENSE, DensePolicy(), DENSE, 0.0)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What is evaluated: ``limits`` per task (None: every item of the split), the split,
    the subset seed, generation lengths and optional user task files."""

    limits: dict[str, int | None]
    split: str | None = "test"
    seed: int = 0
    qa_max_new_tokens: int = 16
    summary_max_new_tokens: int = 64
    chat_max_new_tokens: int = 48
    code_max_new_tokens: int = 256
    ppl_window: int = 128
    ppl_prompt: int | None = None  # None: a quarter of the window
    task_files: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for task, limit in self.limits.items():
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                      or limit < 1):
                raise ValueError(f"limit for {task} must be a positive integer, got {limit!r}")
        unknown = set(self.task_files) - set(TASKS)
        if unknown:
            raise ValueError(f"task file for unknown task(s): {', '.join(sorted(unknown))}")
        if self.ppl_window < 2:
            raise ValueError(f"ppl_window must be >= 2, got {self.ppl_window}")
        if self.ppl_prompt is None:
            object.__setattr__(self, "ppl_prompt", max(1, self.ppl_window // 4))
        if not 1 <= self.ppl_prompt < self.ppl_window:
            raise ValueError(f"ppl_prompt must be in [1, ppl_window), got {self.ppl_prompt}")

    @property
    def tasks(self) -> list[str]:
        return [t for t in TASKS if t in self.limits]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_items(settings: EvalSettings, tokenizer: Any) -> dict[str, list[Any]]:
    """The evaluated subset of every task in ``settings``."""
    items = {}
    for task in settings.tasks:
        loaded = load_task(task, settings.task_files.get(task))
        if task == "perplexity":
            loaded = prose_windows(loaded, tokenizer, settings.ppl_window)
        items[task] = select(loaded, settings.split, settings.limits[task], settings.seed)
        if not items[task]:
            raise ValueError(f"task {task} has no items in split {settings.split!r}")
    return items


class _Run:
    """Decoding of one (policy, task) row: counts decode steps (tokens decided after the
    prefill, when speculative) and their time, and the drafts' acceptance."""

    def __init__(self, decoder: Decoder, tokenizer: Any,
                 speculative: Speculative | None = None) -> None:
        self.decoder, self.tokenizer, self.speculative = decoder, tokenizer, speculative
        self.steps = 0
        self.seconds = 0.0
        self.drafts = SpeculativeStats()

    def generate(self, messages: Sequence[Message], max_new_tokens: int,
                 stop: Sequence[str] | None = None,
                 stop_at: Callable[[str], int | None] | None = None) -> GenerationResult:
        """``generate`` greedily, with its ``stop`` and ``stop_at``."""
        before = self.decoder.stats().decode_tokens
        result = generate(self.decoder, self.tokenizer, messages, max_new_tokens=max_new_tokens,
                          stop=stop, stop_at=stop_at, speculative=self.speculative)
        if result.speculative is not None:
            steps = max(len(result.token_ids) - 1, 0)
            for field in ("drafted", "accepted", "verify_passes"):
                setattr(self.drafts, field,
                        getattr(self.drafts, field) + getattr(result.speculative, field))
        else:
            steps = self.decoder.stats().decode_tokens - before
        if steps and result.decode_tokens_per_s > 0:
            self.steps += steps
            self.seconds += steps / result.decode_tokens_per_s
        return result

    def step(self, token: int) -> np.ndarray:
        start = time.perf_counter()
        logits = self.decoder.step(token)
        self.seconds += time.perf_counter() - start
        self.steps += 1
        return logits


def _take_trace(decoder: Decoder, item_id: str) -> dict[str, Any]:
    """The recorded decode trace (for the score heat map); stops recording."""
    trace = decoder.trace()
    decoder.enable_trace(False)
    decoder.clear_trace()
    score = [[None if math.isnan(v) else round(v, 5) for v in row]
             for row in trace["score"].astype(float).tolist()]
    return {"item": item_id, "score": score,
            "ffn_skipped": trace["ffn_skipped"].astype(int).tolist(),
            "layer_skipped": trace["layer_skipped"].astype(int).tolist()}


def _sample(item_id: str, result: GenerationResult, **extra: Any) -> dict[str, Any]:
    return {"id": item_id, "text": result.text, "tokens": result.token_ids, **extra}


def _run_qa(run: _Run, items: Sequence[Any], settings: EvalSettings,
            bar: Callable[..., Any]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    samples = []
    for item in bar(items):
        result = run.generate(qa_messages(item), settings.qa_max_new_tokens,
                              stop=list(QA_STOP))
        samples.append(_sample(item.id, result,
                               exact=metrics.exact_match(result.text, item.answers),
                               contains=metrics.contains_match(result.text, item.answers)))
    return samples, None


def _run_summarization(run: _Run, items: Sequence[Any], settings: EvalSettings,
                       bar: Callable[..., Any]) -> tuple[list[dict[str, Any]],
                                                        dict[str, Any] | None]:
    samples, trace = [], None
    for i, item in enumerate(bar(items)):
        run.decoder.clear_trace()
        run.decoder.enable_trace(i == 0)  # the first summary feeds the score heat map
        result = run.generate(summary_messages(item), settings.summary_max_new_tokens)
        if i == 0:
            trace = _take_trace(run.decoder, item.id)
        samples.append(_sample(item.id, result,
                               rouge_l_ref=metrics.rouge_l(result.text, item.summary)))
    return samples, trace


def _run_chat(run: _Run, items: Sequence[Any], settings: EvalSettings,
              bar: Callable[..., Any]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    samples = []
    for item in bar(items):
        messages = chat_opening(item)
        for turn_index, turn in enumerate(item.turns):
            messages.append({"role": "user", "content": turn})
            result = run.generate(messages, settings.chat_max_new_tokens)
            messages.append({"role": "assistant", "content": result.text})
            samples.append(_sample(f"{item.id}#{turn_index + 1}", result,
                                   loop=metrics.collapsed(result.text, result.token_ids)))
    return samples, None


def _log_softmax_at(logits: np.ndarray, token: int) -> float:
    values = logits.astype(np.float64)
    peak = values.max()
    return float(values[token] - peak - math.log(np.exp(values - peak).sum()))


def _run_perplexity(run: _Run, items: Sequence[Window], settings: EvalSettings,
                    bar: Callable[..., Any]) -> tuple[list[dict[str, Any]],
                                                     dict[str, Any] | None]:
    samples = []
    for item in bar(items):
        run.decoder.reset()
        prompt = min(settings.ppl_prompt, len(item.tokens) - 1)  # a short text's window
        logits = run.decoder.prefill(list(item.tokens[:prompt]))
        nll, argmax = 0.0, []
        for i, token in enumerate(item.tokens[prompt:], start=prompt):
            nll -= _log_softmax_at(logits, token)
            argmax.append(int(np.argmax(logits)))
            if i + 1 < len(item.tokens):  # the last token's logits predict nothing
                logits = run.step(token)
        samples.append({"id": item.id, "nll": nll, "count": len(argmax), "argmax": argmax})
    return samples, None


def _run_code(run: _Run, items: Sequence[Any], settings: EvalSettings,
              bar: Callable[..., Any]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    samples, jobs = [], []
    for item in bar(items):
        result = run.generate([{"role": "user", "content": code_message(item.prompt)}],
                              settings.code_max_new_tokens, stop_at=code_end)
        samples.append(_sample(item.id, result))
        jobs.append(SandboxJob(extract_code(result.text, item.prompt, item.entry_point),
                               item.tests, item.entry_point))
    # after every answer is decoded: test runs would otherwise slow the timed decode steps
    verdicts = run_batch(jobs, workers=SANDBOX_WORKERS, timeout_s=CODE_TIMEOUT_S)
    for sample, verdict in zip(samples, verdicts, strict=True):
        sample.update(passed=verdict.passed, status=verdict.status, detail=verdict.detail)
    return samples, None


RUNNERS = {"qa": _run_qa, "summarization": _run_summarization, "chat": _run_chat,
           "perplexity": _run_perplexity, "code": _run_code}


def _compare_with_dense(task: str, samples: list[dict[str, Any]],
                        dense: list[dict[str, Any]]) -> None:
    """Adds the per-sample agreement with the dense outputs of the same items."""
    reference = {s["id"]: s for s in dense}
    for sample in samples:
        ref = reference[sample["id"]]
        if task == "perplexity":
            sample["agreement"] = float(np.mean(np.equal(sample["argmax"], ref["argmax"])))
            continue
        sample["divergence"] = metrics.first_divergence(sample["tokens"], ref["tokens"])
        sample["identical"] = sample["tokens"] == ref["tokens"]
        if task in ("summarization", "chat"):
            sample["rouge_l_dense"] = metrics.rouge_l(sample["text"], ref["text"])


def summarize(task: str, samples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The metric means of a row."""
    def avg(key: str) -> float:
        return metrics.mean([float(s[key]) for s in samples])

    if task == "perplexity":
        nll, count = sum(s["nll"] for s in samples), sum(s["count"] for s in samples)
        return {"perplexity": metrics.perplexity(nll, count), "predicted_tokens": count,
                "token_agreement": avg("agreement")}
    out = {"first_divergence": avg("divergence"), "identical": avg("identical")}
    if task == "qa":
        out.update(exact=avg("exact"), contains=avg("contains"))
    if task == "summarization":
        out.update(rouge_l_ref=avg("rouge_l_ref"), rouge_l_dense=avg("rouge_l_dense"))
    if task == "chat":
        out.update(rouge_l_dense=avg("rouge_l_dense"), collapse_rate=avg("loop"))
    if task == "code":
        out["pass@1"] = avg("passed")
    return out


def read_rows(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows written so far (an unfinished last line, e.g. from a killed run, is dropped)."""
    path = os.path.join(out_dir, ROWS_FILE)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith("\n"):
                    raise ValueError(f"{path}: corrupt row {line[:80]!r}") from None
    return rows


SPEED_PROMPT = "Tell me a short story about a lighthouse keeper."


def measure_speed(decoder: Decoder, tokenizer: Any, specs: Sequence[PolicySpec],
                  tokens: int = 32, rounds: int = 3, progress: bool = True) -> dict[str, float]:
    """Greedy decode tokens/s of every policy (speculative ones included) on one prompt, the
    median of ``rounds`` rounds that alternate between the policies: on a shared machine,
    load changes then weigh on every policy alike, unlike the timings of rows run minutes
    apart."""
    messages = [{"role": "user", "content": SPEED_PROMPT}]
    previous = decoder.policy
    speeds: dict[str, list[float]] = {s.name: [] for s in specs}
    try:
        for _ in tqdm(range(rounds), desc="speed rounds", disable=not progress):
            for spec in specs:
                decoder.reset()
                decoder.set_policy(spec.policy)
                result = generate(decoder, tokenizer, messages, max_new_tokens=tokens,
                                  speculative=spec.speculative)
                speeds[spec.name].append(result.decode_tokens_per_s)
    finally:
        decoder.reset()
        decoder.set_policy(previous)
    return {name: float(np.median(values)) for name, values in speeds.items()}


def _drop_unfinished_line(path: str) -> None:
    """Cuts a half-written last row (a killed run) so that new rows start on their own line."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def with_dense(specs: Sequence[PolicySpec]) -> list[PolicySpec]:
    """``specs`` with the dense reference first (added when missing); names must be unique."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"policy names must be unique, got {names}")
    ordered = sorted(specs if DENSE in names else [DENSE_SPEC, *specs],
                     key=lambda s: s.name != DENSE)  # stable: dense first, then as given
    if not isinstance(ordered[0].policy, DensePolicy):
        raise ValueError("the policy named 'dense' must be a DensePolicy")
    return ordered


def evaluate(
    decoder: Decoder,
    tokenizer: Any,
    specs: Sequence[PolicySpec],
    settings: EvalSettings,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluates every policy on every task of ``settings``; returns the rows (with those of
    earlier runs when resuming). The dense policy is added first when missing."""
    specs = with_dense(specs)
    rows = previous_rows(out_dir, resume, specs) if out_dir is not None else []
    items = load_items(settings, tokenizer)
    previous_policy = decoder.policy
    by_name = {spec.name: spec for spec in specs}
    todo = [(by_name[name], task) for name, task in pending_rows(
        [(spec.name, spec.speculative is not None) for spec in specs], settings.tasks, rows)]
    try:
        for spec, task in tqdm(todo, desc="eval rows", disable=not progress):
            dense = next((r["samples"] for r in rows
                          if r["policy"] == DENSE and r["task"] == task), None)
            row = _run_row(decoder, tokenizer, spec, task, items[task], settings, dense, progress)
            rows.append(row)
            if out_dir is not None:
                with open(os.path.join(out_dir, ROWS_FILE), "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
    finally:
        decoder.reset()
        decoder.set_policy(previous_policy)
    return rows


def previous_rows(out_dir: str | os.PathLike[str], resume: bool,
                  specs: Sequence[PolicySpec] = ()) -> list[dict[str, Any]]:
    """The rows already in ``out_dir`` (created if missing) when resuming; refuses to add to
    them otherwise, or when a row of one of ``specs`` was made with another policy."""
    os.makedirs(out_dir, exist_ok=True)
    rows = read_rows(out_dir)
    if rows and not resume:
        raise ValueError(f"{os.path.join(out_dir, ROWS_FILE)} already has rows: resume "
                         "(--resume) to continue that run, or choose another output directory")
    _drop_unfinished_line(os.path.join(out_dir, ROWS_FILE))
    by_name = {s.name: s for s in specs}
    for row in rows:
        spec = by_name.get(row["policy"])
        if spec is not None and (row["policy_spec"] != spec.policy.to_dict()
                                 or row.get("speculative_spec") != spec.to_dict()["speculative"]):
            raise ValueError(f"the rows of policy {spec.name!r} in {out_dir} were made with "
                             f"another policy ({row['policy_spec']}); use another output "
                             "directory")
    return rows


def _run_row(decoder: Decoder, tokenizer: Any, spec: PolicySpec, task: str,
             items: Sequence[Any], settings: EvalSettings,
             dense: list[dict[str, Any]] | None, progress: bool) -> dict[str, Any]:
    decoder.reset()  # a FiRST policy routes from the next sequence on
    decoder.set_policy(spec.policy)
    decoder.reset_stats()
    run = _Run(decoder, tokenizer, spec.speculative)
    start = time.perf_counter()

    def bar(values: Sequence[Any]) -> Any:
        return tqdm(values, desc=f"{spec.name} {task}", leave=False, disable=not progress)

    samples, trace = RUNNERS[task](run, items, settings, bar)
    _compare_with_dense(task, samples, samples if dense is None else dense)
    stats = decoder.stats()
    return {
        "policy": spec.name, "method": spec.method, "target": spec.target,
        "policy_spec": spec.policy.to_dict(), "task": task, "n": len(items),
        "speculative_spec": spec.to_dict()["speculative"],
        "speculative": None if spec.speculative is None else {
            "drafted": run.drafts.drafted, "accepted": run.drafts.accepted,
            "verify_passes": run.drafts.verify_passes,
            "lossless": all(s.get("identical", True) for s in samples)},
        "metrics": summarize(task, samples),
        "stats": {
            "decode_tokens": stats.decode_tokens, "warmup_tokens": stats.warmup_tokens,
            "ffn_skipped": stats.ffn_skipped.tolist(),
            "ffn_skipped_after_warmup": stats.ffn_skipped_after_warmup.tolist(),
            "layer_skipped": stats.layer_skipped.tolist(),
            "skip_ratio": stats.skip_ratio,
            "skip_ratio_after_warmup": stats.skip_ratio_after_warmup,
            "layer_skip_ratio": stats.layer_skip_ratio,
        },
        "decode_steps": run.steps, "decode_seconds": run.seconds,
        "tokens_per_s": run.steps / run.seconds if run.seconds > 0 else math.nan,
        "wall_seconds": time.perf_counter() - start,
        "trace": trace, "samples": samples,
    }
