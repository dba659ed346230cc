"""The markdown report and plots of an evaluation directory (rows.jsonl and run.json)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .harness import DENSE, GENERATION_TASKS, EvalSettings, pending_rows, read_rows
from .sweep import MATCHING

RUN_FILE = "run.json"
SPECS_FILE = "policies.json"  # the run's policies, made once, reused by --resume
SPEED_FILE = "speed.json"
REPORT_FILE = "report.md"
# Written by hand after a run; the report includes it, so regenerating keeps it.
DISCUSSION_FILE = "discussion.md"
PLOTS = {"quality": "quality_vs_skip.png", "heatmap": "score_heatmap.png",
         "frequency": "layer_skip_frequency.png"}


@dataclasses.dataclass(frozen=True)
class Column:
    header: str
    task: str
    metric: str
    higher_is_better: bool = True
    digits: int = 3


COLUMNS = (
    Column("QA exact", "qa", "exact"),
    Column("QA contains", "qa", "contains"),
    Column("Sum R-L ref", "summarization", "rouge_l_ref"),
    Column("Sum R-L dense", "summarization", "rouge_l_dense"),
    Column("Chat R-L dense", "chat", "rouge_l_dense"),
    Column("Chat collapse", "chat", "collapse_rate", higher_is_better=False),
    Column("Code pass@1", "code", "pass@1"),
    Column("1st divergence", "generation", "first_divergence", digits=1),
    Column("TF agreement", "perplexity", "token_agreement"),
    Column("PPL", "perplexity", "perplexity", higher_is_better=False, digits=2),
)


@dataclasses.dataclass
class PolicySummary:
    """One policy over every task it ran."""

    name: str
    method: str
    target: float | None
    policy: dict[str, Any]
    ffn_skip: float  # skipped FFN blocks / (decode tokens x layers), over all tasks
    layer_skip: float
    weights_not_read: float  # share of a dense step's weights not read; NaN: sizes unknown
    task_tokens_per_s: float  # decode steps / their time over the rows
    speed: float  # interleaved timing (``harness.measure_speed``), NaN when not measured
    values: dict[tuple[str, str], float]  # (task, metric) -> value
    task_skip: dict[str, float]  # FFN skip ratio per task (NaN: no decode steps)
    layer_frequency: np.ndarray  # [layers] share of decode tokens whose FFN was skipped
    trace: dict[str, Any] | None
    # Lossless rows: drafted, accepted, verify_passes summed over the rows, and whether every
    # output equalled dense's (None for the other policies).
    speculative: dict[str, Any] | None = None

    def value(self, column: Column) -> float:
        return self.values.get((column.task, column.metric), math.nan)


def not_read(method: str, ffn_skipped: float, layer_skipped: float,
             weights: dict[str, int] | None) -> float:
    """Share of a dense decode step's weights (``sweep.weight_counts``) left unread, from the
    skipped FFN blocks and layers summed over the steps, per step. Early exit's skipped layers
    still read their K/V projections."""
    if not weights:
        return math.nan
    attention = weights["attention_qo"] + (0 if method == "early_exit" else weights["attention_kv"])
    step = weights["layers"] * (weights["attention_qo"] + weights["attention_kv"]
                                + weights["ffn"]) + weights["head"]
    return (ffn_skipped * weights["ffn"] + layer_skipped * attention) / step


def summarize_policies(rows: Sequence[dict[str, Any]], speeds: dict[str, float] | None = None,
                       weights: dict[str, int] | None = None) -> list[PolicySummary]:
    """Per policy, in the order policies first appear in ``rows``; ``weights`` as in
    run.json (``sweep.weight_counts``) gives the weights-not-read share."""
    names = list(dict.fromkeys(r["policy"] for r in rows))
    out = []
    for name in names:
        own = [r for r in rows if r["policy"] == name]
        tokens = sum(r["stats"]["decode_tokens"] for r in own)
        ffn = np.sum([r["stats"]["ffn_skipped"] for r in own], axis=0)
        layer = np.sum([r["stats"]["layer_skipped"] for r in own], axis=0)
        steps, seconds = sum(r["decode_steps"] for r in own), sum(r["decode_seconds"] for r in own)
        values = {(r["task"], k): float(v) for r in own for k, v in r["metrics"].items()}
        generated = [s for r in own if r["task"] in GENERATION_TASKS for s in r["samples"]]
        if generated:
            values["generation", "first_divergence"] = float(
                np.mean([s["divergence"] for s in generated]))
        out.append(PolicySummary(
            name=name, method=own[0]["method"], target=own[0]["target"],
            policy=own[0]["policy_spec"],
            ffn_skip=float(ffn.sum()) / (tokens * len(ffn)) if tokens else 0.0,
            layer_skip=float(layer.sum()) / (tokens * len(layer)) if tokens else 0.0,
            weights_not_read=not_read(own[0]["method"], float(ffn.sum()) / tokens,
                                      float(layer.sum()) / tokens, weights) if tokens else 0.0,
            task_tokens_per_s=steps / seconds if seconds > 0 else math.nan,
            speed=(speeds or {}).get(name, math.nan),
            values=values,
            task_skip={r["task"]: r["stats"]["skip_ratio"] if r["stats"]["decode_tokens"]
                       else math.nan for r in own},
            layer_frequency=ffn / tokens if tokens else ffn.astype(float),
            trace=next((r["trace"] for r in own if r.get("trace")), None),
            speculative=_drafts(own),
        ))
    return out


def _drafts(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    own = [r["speculative"] for r in rows if r.get("speculative")]
    if not own:
        return None
    total = {k: sum(d[k] for d in own) for k in ("drafted", "accepted", "verify_passes")}
    total["lossless"] = all(d["lossless"] for d in own)
    return total


def _lossless_table(summaries: Sequence[PolicySummary]) -> list[str]:
    """The speculative rows: identical to dense or not, speed against dense, acceptance."""
    dense = next((s for s in summaries if s.name == DENSE), None)
    lines = ["| policy | outputs equal dense | tok/s | vs dense | tok/s tasks | vs dense "
             "| acceptance | accepted per verify |", "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        if s.speculative is None:
            continue
        d = s.speculative
        ratio = s.speed / dense.speed if dense and dense.speed else math.nan
        tasks = (s.task_tokens_per_s / dense.task_tokens_per_s
                 if dense and dense.task_tokens_per_s else math.nan)
        acceptance = d["accepted"] / d["drafted"] if d["drafted"] else math.nan
        per_pass = d["accepted"] / d["verify_passes"] if d["verify_passes"] else math.nan
        lines.append(f"| {s.name} | {'yes' if d['lossless'] else '**NO**'} | "
                     f"{_fmt(s.speed, 1)} | {_fmt(ratio, 2)}x | {_fmt(s.task_tokens_per_s, 1)} "
                     f"| {_fmt(tasks, 2)}x | {_fmt(acceptance, 2)} | {_fmt(per_pass, 2)} |")
    return lines


def nearest(summaries: Sequence[PolicySummary], method: str,
            target: float) -> PolicySummary | None:
    """The policy of ``method`` whose target is closest to ``target`` (within 0.05)."""
    candidates = [s for s in summaries if s.method == method and s.target is not None
                  and abs(s.target - target) <= 0.05 + 1e-9]
    return min(candidates, key=lambda s: abs(s.target - target), default=None)  # type: ignore


def _fmt(value: float, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _table(summaries: Sequence[PolicySummary], columns: Sequence[Column]) -> list[str]:
    head = ["policy", "target", "FFN skip", "layer skip", "weights not read", "tok/s",
            "tok/s tasks", *(c.header for c in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        target = "-" if s.target is None else f"{s.target:.0%}"
        weights = "n/a" if math.isnan(s.weights_not_read) else f"{s.weights_not_read:.1%}"
        cells = [s.name, target, f"{s.ffn_skip:.1%}", f"{s.layer_skip:.1%}", weights,
                 _fmt(s.speed, 1), _fmt(s.task_tokens_per_s, 1),
                 *(_fmt(s.value(c), c.digits) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _targets(summaries: Sequence[PolicySummary]) -> list[float]:
    return sorted({s.target for s in summaries if s.target})


def _at(summaries: Sequence[PolicySummary], target: float) -> list[PolicySummary]:
    """One policy per method (dense excluded), the one nearest ``target``."""
    methods = dict.fromkeys(s.method for s in summaries if s.method != DENSE)
    return [p for m in methods if (p := nearest(summaries, m, target))]


def _ranks(summaries: Sequence[PolicySummary], columns: Sequence[Column]) -> list[str]:
    """Rank of FFN-SkipLLM among the methods at each target, per metric (1 = best)."""
    lines = ["| target | " + " | ".join(c.header for c in columns) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for target in _targets(summaries):
        group = _at(summaries, target)
        ours = nearest(summaries, "ffn_skip", target)
        if ours is None:
            continue
        cells = []
        for c in columns:
            valued = [p for p in group if not math.isnan(p.value(c))]
            if ours not in valued:
                cells.append("n/a")
                continue
            sign = -1 if c.higher_is_better else 1
            rank = 1 + sum(sign * p.value(c) < sign * ours.value(c) for p in valued)
            tied = sum(p.value(c) == ours.value(c) for p in valued) > 1
            cells.append(f"{rank}{'=' if tied else ''} of {len(valued)}")
        lines.append(f"| {target:.0%} | " + " | ".join(cells) + " |")
    return lines


def _partial_banner(out_dir: str, run: dict[str, Any],
                    rows: Sequence[dict[str, Any]]) -> list[str]:
    """Lines naming the rows that the run's policies file (dense first, as the harness runs
    it) plans but rows.jsonl lacks yet; none when the run is complete or has no such file."""
    path = os.path.join(out_dir, SPECS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        planned = [(p["name"], p.get("speculative") is not None) for p in json.load(f)]
    planned = [(DENSE, False)] + [p for p in planned if p[0] != DENSE]
    tasks = EvalSettings(**run["settings"]).tasks
    pending = pending_rows(planned, tasks, rows)
    if not pending:
        return []
    names = []
    for name, speculative in planned:
        missing = [t for p, t in pending if p == name]
        if missing:  # a policy with no row yet by its name alone
            runs = pending_rows([(name, speculative)], tasks, [])
            names.append(name if len(missing) == len(runs) else f"{name} ({', '.join(missing)})")
    return [f"**Partial run: {len(pending)} rows are not in yet** ({', '.join(names)}). The same "
            "command with `--resume` goes on from there; until then the tables below have gaps "
            "(n/a) and the ranks compare only the policies that have the row.", ""]


def write_report(out_dir: str, plots: bool = True) -> str:
    """Writes report.md (and the plots when ``plots`` and matplotlib is installed), with
    ``discussion.md`` of the same directory when there is one; returns the report path."""
    with open(os.path.join(out_dir, RUN_FILE), encoding="utf-8") as f:
        run = json.load(f)
    rows = read_rows(out_dir)
    if not rows:
        raise ValueError(f"{out_dir}: no rows to report")
    speed_path = os.path.join(out_dir, SPEED_FILE)
    speeds = None
    if os.path.exists(speed_path):
        with open(speed_path, encoding="utf-8") as f:
            speeds = json.load(f)
    summaries = summarize_policies(rows, speeds, run.get("weights"))
    columns = [c for c in COLUMNS if any(not math.isnan(s.value(c)) for s in summaries)]
    made = _plots(out_dir, summaries, columns) if plots else []
    sizes = {r["task"]: r["n"] for r in rows if r["policy"] == DENSE}
    wall = run.get("setup_seconds", 0.0) + sum(r["wall_seconds"] for r in rows)
    lines = [
        f"# Quality against skip ratio: {run['model_name']}", "",
        "Made by:", "", "```bash", run["command"], "```", "",
        f"Model: `{run['model_name']}` ({run['num_layers']} layers, {run['dtype']}), "
        f"greedy decoding, seed {run['settings']['seed']}, split "
        f"`{run['settings']['split']}`. Subset sizes: "
        + ", ".join(f"{t} {n}" for t, n in sizes.items())
        + f" (perplexity: windows of {run['settings']['ppl_window']} tokens, the first "
        f"{run['settings'].get('ppl_prompt', 1)} prefilled as the window's prompt, not "
        "scored; chat: "
        "every turn is an answer). Generation lengths: QA "
        f"{run['settings']['qa_max_new_tokens']}, summary "
        f"{run['settings']['summary_max_new_tokens']}, chat "
        f"{run['settings']['chat_max_new_tokens']}, code "
        f"{run['settings'].get('code_max_new_tokens', 'n/a')} tokens. Compute time of the rows and "
        f"setup (calibration, Block Influence): {wall / 60:.1f} min.", "",
        *_partial_banner(out_dir, run, rows),
        "Columns: FFN skip = skipped FFN blocks / (decode tokens x layers) over every task "
        "(warm-up included); layer skip = share of layers not run in full; weights not read = "
        "share of the weights a dense decode step reads (layers and LM head) that the "
        "policy's decode steps did not read; tok/s = greedy "
        "decode tokens per second on one prompt, the median of rounds that alternate between "
        "the policies; tok/s tasks = decode steps per second over the task rows, which ran "
        "minutes apart (on a shared machine both are rough, the second more so); "
        "QA exact / contains = "
        "normalised answer match; R-L = ROUGE-L F1 against the reference or the dense "
        "output; collapse = share of chat answers ending in a repeated n-gram loop; "
        "Code pass@1 = share of code problems whose hidden unit tests pass with the greedy "
        "answer (run in a sandboxed process); "
        "1st divergence = mean index of the first generated token that differs from dense "
        "(for dense itself: the mean output length; FFN-SkipLLM's warm-up tokens are dense by "
        "construction); "
        "TF agreement = share of prose positions whose greedy token equals dense's "
        "(teacher forced); PPL = perplexity, each position after the window's prompt decoded "
        "under the policy.", "",
    ]
    discussion = os.path.join(out_dir, DISCUSSION_FILE)
    if os.path.exists(discussion):
        with open(discussion, encoding="utf-8") as f:
            lines += ["## What it shows", "", f.read().strip(), ""]
    lines += ["## How methods are matched", "", MATCHING.strip(), ""]
    if run.get("notes"):
        lines += ["Notes from the run:", "", *(f"- {n}" for n in run["notes"]), ""]
    targets = _targets(summaries)
    if targets:
        mid = min(targets, key=lambda t: abs(t - 0.2))
        dense = [s for s in summaries if s.name == DENSE]
        lines += [f"## At ~{mid:.0%} skip", "", *_table(dense + _at(summaries, mid), columns), ""]
    lines += ["## All policies", "", *_table(summaries, columns), ""]
    if any(s.speculative for s in summaries):
        lines += ["## Lossless speculative decoding", "",
                  "Dense decoding with drafts verified by the dense model: every generated "
                  "output is checked against dense's, token for token; tok/s as above; "
                  "acceptance = share of drafted tokens kept.", "",
                  *_lossless_table(summaries), ""]
    if any(s.method == "ffn_skip" for s in summaries):
        lines += ["## Rank of FFN-SkipLLM among the methods at each target", "",
                  "1 = best of the methods at that target (dense excluded); = marks a tie.", "",
                  *_ranks(summaries, columns), ""]
    lines += ["## FFN skip ratio per task", "",
              "| policy | " + " | ".join(sizes) + " |", "|" + "---|" * (len(sizes) + 1)]
    lines += [f"| {s.name} | " + " | ".join(
        f"{s.task_skip[t]:.1%}" if not math.isnan(s.task_skip.get(t, math.nan))
        else "n/a" for t in sizes) + " |" for s in summaries]
    lines += ["", "n/a: no decode steps (every output ended at its first token)."]
    lines += ["", "## Policies", "", "| policy | parameters |", "|---|---|"]
    lines += [f"| {s.name} | `{json.dumps(_params(s.policy))}` |" for s in summaries]
    if made:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in made]
    path = os.path.join(out_dir, REPORT_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _params(policy: dict[str, Any]) -> dict[str, Any]:
    params = {k: v for k, v in policy.items() if k != "version"}
    if isinstance(params.get("threshold"), float):
        params["threshold"] = round(params["threshold"], 5)
    return params


def _plots(out_dir: str, summaries: Sequence[PolicySummary],
           columns: Sequence[Column]) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for name, draw in ((PLOTS["quality"], _plot_quality), (PLOTS["heatmap"], _plot_heatmap),
                       (PLOTS["frequency"], _plot_frequency)):
        fig = draw(plt, summaries, columns)
        if fig is not None:
            fig.savefig(os.path.join(out_dir, name), dpi=110, bbox_inches="tight")
            plt.close(fig)
            made.append(name)
    return made


def _plot_quality(plt: Any, summaries: Sequence[PolicySummary],
                  columns: Sequence[Column]) -> Any:
    cols = 3
    rows = math.ceil(len(columns) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    dense = next((s for s in summaries if s.name == DENSE), None)
    methods = list(dict.fromkeys(s.method for s in summaries if s.method != DENSE))
    by_weights = not any(math.isnan(s.weights_not_read) for s in summaries)

    def _x(s: PolicySummary) -> float:
        return s.weights_not_read if by_weights else s.ffn_skip

    for ax, column in zip(axes.flat, columns, strict=False):
        for method in methods:
            points = sorted((_x(s), s.value(column)) for s in summaries
                            if s.method == method and not math.isnan(s.value(column)))
            if dense is not None and not math.isnan(dense.value(column)):
                points = [(0.0, dense.value(column)), *points]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=method)
        ax.set_title(column.header + ("" if column.higher_is_better else " (lower is better)"),
                     fontsize=9)
        ax.set_xlabel("weights not read per decode step" if by_weights
                      else "measured FFN skip ratio", fontsize=8)
        if column.metric == "perplexity":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9,
               bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def _plot_heatmap(plt: Any, summaries: Sequence[PolicySummary],
                  columns: Sequence[Column]) -> Any:
    """Per-layer score cos(a_l, x_{l+1}) over the decoded tokens of the first summary, for
    dense and FFN-SkipLLM at every target; skipped FFNs (no score) are black."""
    chosen = [s for s in summaries if s.trace and (s.name == DENSE or s.method == "ffn_skip")]
    if not chosen:
        return None
    finite = [v for s in chosen for row in s.trace["score"] for v in row  # type: ignore[index]
              if v is not None]
    low = float(np.percentile(finite, 2)) if finite else 0.0
    fig, axes = plt.subplots(len(chosen), 1, figsize=(10, 2.6 * len(chosen)), squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="black")
    for ax, s in zip(axes[:, 0], chosen, strict=True):
        score = np.array([[np.nan if v is None else v for v in row]
                          for row in s.trace["score"]], dtype=float)  # type: ignore[index]
        image = ax.imshow(score.T, aspect="auto", origin="lower", cmap=cmap, vmin=low, vmax=1.0,
                          interpolation="nearest")
        ax.set_title(f"{s.name}: score per layer over decoded tokens of "
                     f"{s.trace['item']} (black: FFN skipped)", fontsize=9)  # type: ignore
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, fraction=0.03)
    axes[-1, 0].set_xlabel("decode step")
    fig.tight_layout()
    return fig


def _plot_frequency(plt: Any, summaries: Sequence[PolicySummary],
                    columns: Sequence[Column]) -> Any:
    """Per-layer share of decode tokens whose FFN was skipped: every method at the target
    nearest 20%, and FFN-SkipLLM at every target."""
    targets = _targets(summaries)
    if not targets:
        return None
    mid = min(targets, key=lambda t: abs(t - 0.2))
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8), squeeze=False)
    panels: tuple[tuple[Any, list[PolicySummary], Callable[[PolicySummary], str]], ...] = (
        (axes[0, 0], _at(summaries, mid), lambda s: s.method),
        (axes[0, 1], [s for s in summaries if s.method == "ffn_skip"], lambda s: s.name),
    )
    for ax, group, label in panels:
        for s in group:
            ax.plot(np.arange(len(s.layer_frequency)), s.layer_frequency, marker=".",
                    label=f"{label(s)} ({s.ffn_skip:.0%})")
        ax.set_xlabel("layer")
        ax.set_ylabel("share of decode tokens skipped")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_title(f"FFN skip frequency per layer, every method at ~{mid:.0%}", fontsize=9)
    axes[0, 1].set_title("FFN-SkipLLM at every target", fontsize=9)
    fig.tight_layout()
    return fig
