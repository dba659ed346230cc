"""Quality against model size: the sweeps of several models (one evaluation directory each, as
``ffnskip eval --sweep`` writes) in one table and one plot, per method at the targets they
share, each metric relative to the model's own dense run where that makes sizes comparable."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence

from .harness import DENSE, read_rows
from .report import RUN_FILE, PolicySummary, summarize_policies

TREND_FILE = "size_trend.md"
TREND_PLOT = "size_trend.png"


@dataclasses.dataclass(frozen=True)
class TrendMetric:
    header: str
    task: str
    metric: str
    relative: bool  # divided by the model's dense value
    higher_is_better: bool = True


TREND_METRICS = (
    TrendMetric("QA contains / dense", "qa", "contains", relative=True),
    TrendMetric("Code pass@1 / dense", "code", "pass@1", relative=True),
    TrendMetric("Summary R-L vs dense", "summarization", "rouge_l_dense", relative=False),
    TrendMetric("TF agreement", "perplexity", "token_agreement", relative=False),
    TrendMetric("PPL / dense", "perplexity", "perplexity", relative=True,
                higher_is_better=False),
)


@dataclasses.dataclass
class ModelSweep:
    directory: str
    name: str
    weights: int  # weights a dense decode step reads: the layers and the LM head
    sizes: dict[str, int]  # items per task
    summaries: list[PolicySummary]

    def dense(self) -> PolicySummary | None:
        return next((s for s in self.summaries if s.name == DENSE), None)

    def at(self, method: str, target: float) -> PolicySummary | None:
        return next((s for s in self.summaries if s.method == method and s.target is not None
                     and math.isclose(s.target, target)), None)

    def value(self, metric: TrendMetric, method: str, target: float) -> float:
        policy, dense = self.at(method, target), self.dense()
        if policy is None:
            return math.nan
        key = (metric.task, metric.metric)
        value = policy.values.get(key, math.nan)
        if not metric.relative:
            return value
        base = dense.values.get(key, math.nan) if dense is not None else math.nan
        return value / base if base and not math.isnan(base) else math.nan

    def skip(self, metric: TrendMetric, method: str, target: float) -> float:
        """The FFN skip ratio the policy measured on the metric's task (NaN: no such row)."""
        policy = self.at(method, target)
        return math.nan if policy is None else policy.task_skip.get(metric.task, math.nan)


def load_sweep(directory: str) -> ModelSweep:
    with open(os.path.join(directory, RUN_FILE), encoding="utf-8") as f:
        run = json.load(f)
    rows = read_rows(directory)
    if not rows:
        raise ValueError(f"{directory}: no rows")
    w = run.get("weights")
    if not w:
        raise ValueError(f"{directory}: run.json has no weight counts (an older sweep)")
    weights = w["layers"] * (w["attention_qo"] + w["attention_kv"] + w["ffn"]) + w["head"]
    return ModelSweep(directory=directory, name=run["model_name"], weights=weights,
                      sizes={r["task"]: r["n"] for r in rows if r["policy"] == DENSE},
                      summaries=summarize_policies(rows, None, w))


def methods_of(sweeps: Sequence[ModelSweep]) -> list[str]:
    """The skipping methods, in the order the sweeps first list them."""
    seen: dict[str, None] = {}
    for sweep in sweeps:
        for s in sweep.summaries:
            if s.target is not None and s.method not in (DENSE, "speculative"):
                seen.setdefault(s.method, None)
    return list(seen)


def _label(sweep: ModelSweep) -> str:
    """The model's name without a GGUF file's extension and quantisation suffix, and its size."""
    name = sweep.name.removesuffix(".gguf")
    head, _, tail = name.rpartition(".")
    if head and re.fullmatch(r"I?Q\d\w*|B?F(16|32)", tail):
        name = head
    return f"{name} ({sweep.weights / 1e6:.0f}M)"


def write_trend(directories: Sequence[str], out_dir: str, targets: Sequence[float],
                command: str, plots: bool = True) -> str:
    """Writes size_trend.md (and size_trend.png when ``plots`` and matplotlib is installed)
    into ``out_dir``; models in the order of their weight counts. Returns the report path."""
    if len(directories) < 2:
        raise ValueError("give the evaluation directories of at least two models")
    sweeps = sorted((load_sweep(d) for d in directories), key=lambda s: s.weights)
    methods = methods_of(sweeps)
    metrics = [m for m in TREND_METRICS if sum(
        any(not math.isnan(s.value(m, method, t)) for method in methods for t in targets)
        for s in sweeps) >= 2]
    os.makedirs(out_dir, exist_ok=True)
    made = _plot(out_dir, sweeps, methods, metrics, targets) if plots else None
    lines = [
        "# Quality against model size", "", "Made by:", "", "```bash", command, "```", "",
        "Each model's own sweep (its directory below); a relative metric is the policy's value "
        "over the same model's dense value, so 1.0 = as good as dense. Methods are matched to "
        "each target as in the sweeps; the subsets differ between models (sizes below), so "
        "a small gap between sizes can be noise. In parentheses: the FFN skip ratio the policy "
        "measured on that task, which for the adaptive rule and FiRST can be far from the "
        "target on some tasks.", "",
        "| model | weights read per dense step | sweep | subset sizes |", "|---|---|---|---|",
    ]
    lines += [f"| {s.name} | {s.weights / 1e6:.0f}M | `{s.directory}` | "
              + ", ".join(f"{t} {n}" for t, n in s.sizes.items()) + " |" for s in sweeps]
    for metric in metrics:
        better = "higher" if metric.higher_is_better else "lower"
        lines += ["", f"## {metric.header} ({better} is better)", "",
                  "| method | target | " + " | ".join(_label(s) for s in sweeps) + " |",
                  "|---|---|" + "---|" * len(sweeps)]
        for method in methods:
            for t in targets:
                cells = [_cell(s.value(metric, method, t), s.skip(metric, method, t))
                         for s in sweeps]
                lines.append(f"| {method} | {t:.0%} | " + " | ".join(cells) + " |")
    if made:
        lines += ["", f"![{made}]({made})"]
    path = os.path.join(out_dir, TREND_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _cell(value: float, skip: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.3f}" if math.isnan(skip) else f"{value:.3f} ({skip:.1%})"


def _plot(out_dir: str, sweeps: Sequence[ModelSweep], methods: Sequence[str],
          metrics: Sequence[TrendMetric], targets: Sequence[float]) -> str | None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A row of panels per target, a column per metric, a line per method.
    fig, axes = plt.subplots(len(targets), len(metrics), squeeze=False,
                             figsize=(4.0 * len(metrics), 3.2 * len(targets)))
    x = [s.weights for s in sweeps]
    for row, t in zip(axes, targets, strict=True):
        for ax, metric in zip(row, metrics, strict=True):
            for i, method in enumerate(methods):  # one colour per method in every panel
                y = [s.value(metric, method, t) for s in sweeps]
                if not all(math.isnan(v) for v in y):
                    ax.plot(x, y, marker="o", color=f"C{i}", label=method)
            ax.set_xscale("log")
            ax.set_xticks(x, [f"{s.weights / 1e6:.0f}M" for s in sweeps])
            ax.minorticks_off()
            ax.set_title(f"{metric.header} at {t:.0%}", fontsize=9)
            if metric.relative and not metric.higher_is_better:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        row[0].set_ylabel(f"target {t:.0%}")
    for ax in axes[-1]:
        ax.set_xlabel("weights read per dense step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, TREND_PLOT), dpi=110, bbox_inches="tight")
    plt.close(fig)
    return TREND_PLOT
