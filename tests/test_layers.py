"""The package's layers: imports point down only, there are no import circles (lazy imports
inside functions included), and the runtime works with torch and the upper layers blocked."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ffnskip_ext
from ffnskip_ext import _core
from ffnskip_ext.runtime.policies import POLICY_TYPES

PACKAGE = Path(ffnskip_ext.__file__).parent
# Lowest first; a module may import only modules of its own layer or below. The root
# package (ffnskip_ext/__init__.py) re-exports the runtime and sits above it.
LAYERS = [
    ("base", ["ffnskip_ext._core", "ffnskip_ext.config"]),
    ("loaders", ["ffnskip_ext.loaders"]),
    ("runtime", ["ffnskip_ext.runtime"]),
    ("serve", ["ffnskip_ext.serve"]),  # the HTTP server: the runtime and what is below it
    ("root", ["ffnskip_ext"]),
    ("tuning", ["ffnskip_ext.tuning"]),
    ("eval", ["ffnskip_ext.eval"]),
    ("training", ["ffnskip_ext.training"]),
    ("cli", ["ffnskip_ext.cli", "ffnskip_ext.__main__"]),
]
# Modules the runtime (base, loaders, runtime) must never import: the server's among them, so
# that the runtime needs neither it nor starlette and uvicorn.
RUNTIME_FORBIDDEN = ("torch", "argparse", "ffnskip_ext.serve", "starlette", "uvicorn",
                     "ffnskip_ext.tuning", "ffnskip_ext.eval", "ffnskip_ext.training",
                     "ffnskip_ext.cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def run_time_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of the tree except those under ``if TYPE_CHECKING:`` (never executed)."""
    nodes, todo = [], [tree]
    while todo:
        node = todo.pop()
        nodes.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test) == "TYPE_CHECKING":
                todo.extend(child.orelse)
            else:
                todo.append(child)
    return nodes


def imports_of(path: Path) -> set[str]:
    """Every module a file imports when it runs, at any depth of the code (lazy imports
    too), as absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in run_time_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            # "from . import x" may name a submodule
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


def package_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports. A module's ancestor packages are left out:
    Python has initialised them before the module runs, whatever it imports."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files) | {"ffnskip_ext._core"}
    graph = {}
    for name, path in files.items():
        ancestors = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
        graph[name] = {m for m in imports_of(path)
                       if m in modules and m != name and m not in ancestors}
    return graph


def layer_of(module: str) -> int:
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and len(prefix) > best:
                best, index = len(prefix), i
    assert index is not None, f"{module} belongs to no layer: add it to LAYERS"
    return index


def test_every_module_has_a_layer_and_imports_point_down() -> None:
    wrong = []
    for module, imported in package_graph().items():
        for target in imported:
            if layer_of(target) > layer_of(module):
                wrong.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                             f"({LAYERS[layer_of(target)][0]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circles() -> None:
    graph = package_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_the_runtime_imports_no_torch_argparse_or_upper_layers() -> None:
    runtime = [m for m in package_graph() if layer_of(m) <= layer_of("ffnskip_ext.runtime")]
    wrong = []
    for module in runtime:
        path = PACKAGE.parent.joinpath(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for target in imports_of(path):
            if any(target == f or target.startswith(f + ".") for f in RUNTIME_FORBIDDEN):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


BLOCKED_RUNTIME = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # any import of it now raises ImportError
import ffnskip_ext
from ffnskip_ext.runtime import (decoder, generate, policies, routers, sampling, session,
                                 tokenizer)
policies.FFNSkipPolicy(threshold=0.9)
print("ok")
"""


def test_runtime_imports_with_torch_and_upper_layers_blocked() -> None:
    blocked = ["torch", "ffnskip_ext.serve", "starlette", "uvicorn", "ffnskip_ext.tuning",
               "ffnskip_ext.eval", "ffnskip_ext.training", "ffnskip_ext.cli"]
    done = subprocess.run([sys.executable, "-c", BLOCKED_RUNTIME.format(blocked=blocked)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_python_policy_kinds_are_the_engines() -> None:
    assert tuple(POLICY_TYPES) == _core.POLICY_KINDS


@pytest.mark.parametrize("module", ["ffnskip_ext.eval.tasks", "ffnskip_ext.training.first"])
def test_task_prompts_are_defined_once(module) -> None:
    """The summary instruction text lives in eval.tasks only; training imports it."""
    text = PACKAGE.parent.joinpath(*module.split(".")).with_suffix(".py").read_text()
    count = text.count("Summarise the following passage")
    assert count == (1 if module == "ffnskip_ext.eval.tasks" else 0)
