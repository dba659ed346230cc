"""``ffnskip eval``: evaluate skip policies (or a matched sweep) and write the report."""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
import time
from typing import Any

from ..eval.tasks import TASKS
from .options import add_model_options, load_model, model_path

# Calibration and Block Influence use the train split; these many windows feed Block Influence.
INFLUENCE_WINDOWS = 2
# Train-split questions and chats (each) on which FiRST thresholds are calibrated.
FIRST_ROUTING_PROMPTS = 8


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="quality and speed of skip policies on task sets; report and plots",
        description=__doc__)
    add_model_options(p)
    p.add_argument("--policies", nargs="+", metavar="JSON",
                   help="policy JSON files to evaluate (named after the file)")
    p.add_argument("--sweep", action="store_true",
                   help="dense, FFN-SkipLLM (calibrated), static/random FFN skip, layer drop, "
                        "early exit and FiRST (with routers) matched at --targets")
    p.add_argument("--targets", default="0.1,0.2,0.3", help="sweep skip ratios")
    p.add_argument("--speculative", default="ngram,self,auto",
                   help="lossless speculative rows of the sweep (comma-separated draft "
                        "sources, or 'none')")
    p.add_argument("--draft-policy",
                   help="policy JSON of the sweep's self drafts (default: FFN-SkipLLM from the "
                        "first token; see ffnskip calibrate --for speculation)")
    p.add_argument("--limit", help="items per task: N, or TASK=N,... (e.g. 20,qa=60)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    p.add_argument("--task-file", action="append", metavar="TASK=PATH",
                   help="a JSONL file replacing a bundled task set (repeatable)")
    p.add_argument("--split", default="test", choices=["train", "test", "all"])
    p.add_argument("--seed", type=int, default=0, help="subset choice and random skips")
    p.add_argument("--out", required=True, help="output directory (rows, report, plots)")
    p.add_argument("--resume", action="store_true", help="skip the rows already in --out")
    p.add_argument("--warmup-tokens", type=int, default=4,
                   help="FFN-SkipLLM warm-up in the sweep (short answers: keep it small)")
    p.add_argument("--calibration-prompts", type=int, default=4,
                   help="train-split chat prompts for FFN-SkipLLM calibration")
    p.add_argument("--calibration-tokens", type=int, default=40)
    p.add_argument("--routers", help="FiRST router file for the sweep (default: the one next "
                                     "to the model, when there is one)")
    p.add_argument("--ppl-window", type=int, default=128, help="perplexity window in tokens")
    p.add_argument("--ppl-prompt", type=int, default=None,
                   help="tokens of each perplexity window prefilled as its prompt, not scored "
                   "(default: a quarter of the window)")
    p.add_argument("--speed-tokens", type=int, default=32,
                   help="tokens per timing round of every policy (0: no timing rounds)")
    p.add_argument("--speed-rounds", type=int, default=3)
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=functools.partial(_eval, parser=p))


def parse_limits(text: str | None, tasks: list[str]) -> dict[str, int | None]:
    """``N`` for every task and/or ``TASK=N`` entries; tasks not named get the plain N (or
    every item when there is none)."""
    default: int | None = None
    named: dict[str, int] = {}
    for part in filter(None, (text or "").split(",")):
        task, _, number = part.rpartition("=")
        try:
            value = int(number)
        except ValueError:
            raise ValueError(f"--limit: {part!r} is not N or TASK=N") from None
        if task:
            if task not in TASKS:
                raise ValueError(f"--limit: unknown task {task!r} (known: {', '.join(TASKS)})")
            named[task] = value
        else:
            default = value
    return {t: named.get(t, default) for t in tasks}


def _eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..eval.harness import (
        EvalSettings,
        PolicySpec,
        evaluate,
        measure_speed,
        previous_rows,
        with_dense,
    )
    from ..eval.report import RUN_FILE, SPECS_FILE, SPEED_FILE, write_report
    from ..eval.sweep import weight_counts

    started = time.perf_counter()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"--tasks: unknown or no tasks {unknown} (known: {', '.join(TASKS)})")
    files = dict(_task_file(entry) for entry in args.task_file or [])
    settings = EvalSettings(
        limits=parse_limits(args.limit, tasks), split=None if args.split == "all" else args.split,
        seed=args.seed, ppl_window=args.ppl_window, ppl_prompt=args.ppl_prompt,
        task_files=files,
    )
    if not args.sweep and not args.policies:
        raise ValueError("nothing to evaluate: give --sweep and/or --policies")
    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    model = model_path(args)
    run = {"command": _command(args, parser), "model": os.path.abspath(model),
           "model_name": os.path.basename(os.path.normpath(model)),
           "settings": settings.to_dict(), "sweep": args.sweep, "targets": targets,
           "policies": args.policies, "warmup_tokens": args.warmup_tokens,
           "calibration": [args.calibration_prompts, args.calibration_tokens]}
    previous_rows(args.out, args.resume)  # refuse to overwrite before spending any time
    run_path, specs_path = os.path.join(args.out, RUN_FILE), os.path.join(args.out, SPECS_FILE)
    previous = _read_json(run_path) if args.resume else None
    if previous is not None:
        # Settings added since the run was made take their defaults, as the run had them.
        made_with = previous.get("settings")
        if isinstance(made_with, dict) and "limits" in made_with:
            previous["settings"] = EvalSettings(**made_with).to_dict()
        changed = [k for k in run if k != "command" and previous.get(k) != run[k]]
        if changed:
            raise ValueError(f"--resume: {run_path} was made with other {', '.join(changed)}")
        run["notes"] = previous.get("notes", [])
        run["setup_seconds"] = previous.get("setup_seconds", 0.0)
    decoder, tokenizer = load_model(args)
    run.update(num_layers=decoder.config.num_layers, dtype=decoder.dtype,
               weights=weight_counts(decoder.config))

    saved = _read_json(specs_path) if args.resume else None
    if saved is not None:  # resuming: the same policies, no second calibration
        specs = [PolicySpec.from_dict(d) for d in saved]
    else:
        specs, run["notes"] = _build_specs(args, decoder, tokenizer, files)
        run["setup_seconds"] = time.perf_counter() - started
        with open(specs_path, "w", encoding="utf-8") as f:
            json.dump([s.to_dict() for s in specs], f, indent=1)
    with open(run_path, "w", encoding="utf-8") as f:
        json.dump(run, f, indent=1)
    for note in run["notes"]:
        print(f"note: {note}", file=sys.stderr)

    evaluate(decoder, tokenizer, specs, settings, out_dir=args.out, resume=args.resume)
    speed_path = os.path.join(args.out, SPEED_FILE)
    if args.speed_tokens > 0 and (not args.resume or not os.path.exists(speed_path)):
        speeds = measure_speed(decoder, tokenizer, with_dense(specs), args.speed_tokens,
                               args.speed_rounds)
        with open(speed_path, "w", encoding="utf-8") as f:
            json.dump(speeds, f, indent=1)
    report = write_report(args.out, plots=not args.no_plots)
    print(f"wrote {report} ({(time.perf_counter() - started) / 60:.1f} min)", file=sys.stderr)
    return 0


def _build_specs(args: argparse.Namespace, decoder: Any, tokenizer: Any,
                 files: dict[str, str]) -> tuple[list[Any], list[str]]:
    """The sweep's policies (calibrated on train-split chat prompts, Block Influence on
    train-split prose) and those of --policies; notes say what was left out or replaced."""
    from ..eval.harness import EvalSettings, load_items
    from ..eval.sweep import sweep_specs
    from ..eval.tasks import load_task, select
    from ..runtime.policies import load_policy
    from ..tuning.calibration import DEFAULT_PROMPTS

    notes: list[str] = []
    specs = []
    if args.sweep:
        chat = select(load_task("chat", files.get("chat")), "train", args.calibration_prompts,
                      args.seed)
        prompts = [[{"role": "user", "content": c.turns[0]}] for c in chat] or [
            [{"role": "user", "content": p}] for p in DEFAULT_PROMPTS]
        if not chat:
            notes.append("no train-split chat items: calibrated on the default prompts")
        prose = EvalSettings(limits={"perplexity": INFLUENCE_WINDOWS}, split="train",
                             seed=args.seed, ppl_window=args.ppl_window,
                             ppl_prompt=args.ppl_prompt, task_files=files)
        windows = load_items(prose, tokenizer)["perplexity"]
        targets = [float(t) for t in args.targets.split(",") if t.strip()]
        routers = _sweep_routers(args, notes)
        routing = [[{"role": "user", "content": q.question}] for q in select(
            load_task("qa", files.get("qa")), "train", FIRST_ROUTING_PROMPTS, args.seed)]
        routing += [[{"role": "user", "content": c.turns[0]}] for c in select(
            load_task("chat", files.get("chat")), "train", FIRST_ROUTING_PROMPTS, args.seed)]
        specs = sweep_specs(decoder, tokenizer, targets, prompts, [w.tokens for w in windows],
                            seed=args.seed, warmup_tokens=args.warmup_tokens,
                            calibration_tokens=args.calibration_tokens, log=notes.append,
                            routers=routers, routing_prompts=routing,
                            speculative=_speculative_sources(args.speculative),
                            draft_policy=load_policy(args.draft_policy)
                            if args.draft_policy else None)
    return specs + [_policy_spec(path) for path in args.policies or []], notes


def _sweep_routers(args: argparse.Namespace, notes: list[str]) -> Any:
    """The FiRST routers of --routers, or those next to the model; None (and a note) when
    there are none."""
    from ..runtime.routers import default_router_path, load_routers, model_routers

    path = args.routers or model_routers(model_path(args))
    if path is None:
        notes.append(f"no FiRST routers at {default_router_path(model_path(args))}: FiRST left "
                     "out (ffnskip train-routers)")
        return None
    return load_routers(path)


def _speculative_sources(value: str) -> list[str]:
    from ..runtime.speculative import DRAFT_SOURCES

    sources = [] if value.strip() == "none" else [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in sources if s not in DRAFT_SOURCES]
    if unknown:
        raise ValueError(f"--speculative: unknown draft source(s) {', '.join(unknown)} "
                         f"(expected {', '.join(DRAFT_SOURCES)} or none)")
    return sources


def _task_file(entry: str) -> tuple[str, str]:
    task, sep, path = entry.partition("=")
    if not sep or task not in TASKS:
        raise ValueError(f"--task-file: expected TASK=PATH with TASK in {', '.join(TASKS)}, "
                         f"got {entry!r}")
    return task, path


def _policy_spec(path: str) -> Any:
    from ..eval.harness import PolicySpec
    from ..runtime.policies import load_policy

    policy = load_policy(path)
    name = os.path.splitext(os.path.basename(path))[0]
    return PolicySpec(name, policy, policy.kind)


def _read_json(path: str) -> Any:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The command line that reproduces this run: every option that differs from its default
    (--resume left out: the same command continues an interrupted run when given it)."""
    parts = ["ffnskip", "eval"]
    for action in parser._actions:  # argparse has no public list of a parser's options
        if not action.option_strings or action.dest in ("help", "resume"):
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts += ([flag, *value] if action.nargs == "+" else
                      [x for v in value for x in (flag, v)])
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)
