"""Quality evaluation of skip policies: task sets, metrics, the harness, sweeps and reports.

``ffnskip eval --sweep --out DIR`` runs dense, FFN-SkipLLM and its baselines matched at
skip ratios of 10/20/30% over the bundled task sets and writes ``DIR/report.md`` and plots;
``evaluate`` does the same from Python for any list of policies. The task formats are in
``ffnskip_ext.eval.tasks``, the metric definitions in ``ffnskip_ext.eval.metrics``.
"""

from .harness import EvalSettings, PolicySpec, evaluate, read_rows
from .report import write_report
from .sweep import DEFAULT_TARGETS, MATCHING, sweep_specs
from .tasks import TASKS, bundled_path, load_task, select

__all__ = [
    "DEFAULT_TARGETS",
    "EvalSettings",
    "MATCHING",
    "PolicySpec",
    "TASKS",
    "bundled_path",
    "evaluate",
    "load_task",
    "read_rows",
    "select",
    "sweep_specs",
    "write_report",
]
