r"""Task sets: the JSONL formats, their loaders and the bundled files.

Every file has one JSON object per line (blank lines are ignored). Fields common to all:

- ``id`` (string, unique within the file);
- ``split`` (optional, ``"train"`` or ``"test"``, default ``"test"``): about a quarter of every
  bundled set is ``train``, for calibration and for training routers; evaluation uses ``test``.

Task-specific fields (all required unless marked optional):

===============  ==========================  ================================================
task             file (bundled)              fields
===============  ==========================  ================================================
``qa``           ``qa.jsonl``                ``question`` (string), ``answers`` (non-empty
                                             list of strings: accepted short answers),
                                             ``topic``, ``difficulty`` (optional strings)
``summarization`` ``summarization.jsonl``    ``passage`` (string), ``summary`` (reference)
``chat``         ``chat.jsonl``              ``turns`` (non-empty list of user messages; the
                                             model's own answers go between them),
                                             ``system`` (optional string)
``perplexity``   ``prose.jsonl``             ``text`` (string of ordinary prose)
``code``         ``code.jsonl``              ``prompt`` (Python source: imports if needed,
                                             then the signature of function
                                             ``entry_point`` with a docstring that states its
                                             behaviour; the model writes the body),
                                             ``entry_point`` (the function's name), ``tests``
                                             (Python source of plain ``assert`` statements
                                             calling it; never shown to the model),
                                             ``solution`` (a reference function that passes
                                             the tests; never shown either),
                                             ``difficulty``, ``topic`` (optional strings)
===============  ==========================  ================================================

The code task scores pass@1 under greedy decoding: the answer's code (see
``codetask.extract_code``) and the tests run in a separate, limited process
(``ffnskip_ext.eval.sandbox``). The tests see only the entry point and what they import
themselves, and must not depend on set or dict-of-hash order (hash seeds are random).

Example lines::

    {"id": "qa-001", "split": "test", "question": "What is the capital of France?",
     "answers": ["Paris"], "topic": "geography", "difficulty": "easy"}
    {"id": "chat-01", "split": "test", "turns": ["Give me three ideas ...", "Which of ..."]}
    {"id": "code-001", "split": "test", "entry_point": "add",
     "prompt": "def add(a: int, b: int) -> int:\n    \"\"\"Return a + b.\"\"\"\n",
     "tests": "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n",
     "solution": "def add(a: int, b: int) -> int:\n    return a + b\n"}

A malformed line raises ``ValueError("FILE:LINE: what is wrong")``; unknown fields are
rejected too, so a misspelt field name does not pass silently.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import random
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from ..runtime.generate import Message

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class QAItem:
    id: str
    split: str
    question: str
    answers: tuple[str, ...]
    topic: str | None = None
    difficulty: str | None = None


@dataclasses.dataclass(frozen=True)
class SummaryItem:
    id: str
    split: str
    passage: str
    summary: str


@dataclasses.dataclass(frozen=True)
class ChatItem:
    id: str
    split: str
    turns: tuple[str, ...]
    system: str | None = None


@dataclasses.dataclass(frozen=True)
class ProseItem:
    id: str
    split: str
    text: str


@dataclasses.dataclass(frozen=True)
class CodeItem:
    id: str
    split: str
    prompt: str
    entry_point: str
    tests: str
    solution: str
    difficulty: str | None = None
    topic: str | None = None


def _check_code(item: CodeItem) -> str | None:
    """What is wrong with a code item beyond its field types, or None."""
    from .codetask import defines

    if not item.entry_point.isidentifier():
        return f"entry_point must be a Python identifier, got {item.entry_point!r}"
    for name in ("prompt", "tests", "solution"):
        try:
            ast.parse(getattr(item, name))
        except SyntaxError as e:
            return f"{name} is not valid Python ({e.msg}, line {e.lineno})"
    if not defines(item.prompt, item.entry_point):
        return f"prompt does not define function {item.entry_point!r}"
    return None


@dataclasses.dataclass(frozen=True)
class TaskFormat:
    item: type
    file: str
    required: dict[str, str]  # field -> "str" or "list" (of non-empty strings)
    optional: dict[str, str]
    check: Callable[[Any], str | None] | None = None  # further checks of a parsed item


TASKS: dict[str, TaskFormat] = {
    "qa": TaskFormat(QAItem, "qa.jsonl", {"question": "str", "answers": "list"},
                     {"topic": "str", "difficulty": "str"}),
    "summarization": TaskFormat(SummaryItem, "summarization.jsonl",
                                {"passage": "str", "summary": "str"}, {}),
    "chat": TaskFormat(ChatItem, "chat.jsonl", {"turns": "list"}, {"system": "str"}),
    "perplexity": TaskFormat(ProseItem, "prose.jsonl", {"text": "str"}, {}),
    "code": TaskFormat(CodeItem, "code.jsonl",
                       {"prompt": "str", "entry_point": "str", "tests": "str", "solution": "str"},
                       {"difficulty": "str", "topic": "str"}, _check_code),
}


# --------------------------------------------------------------------------- prompts
# How every task is put to the model, defined once: the harness and router training use these.

SUMMARY_INSTRUCTION = "Summarise the following passage in one or two sentences.\n\n"
QA_STOP = ("\n",)  # a QA answer ends at its first line break


def qa_messages(item: QAItem) -> list[Message]:
    return [{"role": "user", "content": item.question}]


def summary_messages(item: SummaryItem) -> list[Message]:
    return [{"role": "user", "content": SUMMARY_INSTRUCTION + item.passage}]


def chat_opening(item: ChatItem) -> list[Message]:
    """The conversation before the first turn: the item's system message, if any."""
    return [{"role": "system", "content": item.system}] if item.system else []


@dataclasses.dataclass(frozen=True)
class Window:
    """A window of prose tokens for perplexity (``select`` needs ``split``)."""

    id: str
    split: str
    tokens: tuple[int, ...]


def prose_windows(items: Sequence[Any], tokenizer: Any, window: int) -> list[Window]:
    """Each text cut into consecutive windows of ``window`` tokens; a text shorter than one
    window gives a single shorter window."""
    out = []
    for item in items:
        ids = [int(i) for i in tokenizer.encode(item.text)]
        starts = range(0, max(1, len(ids) - window + 1), window)
        out.extend(Window(f"{item.id}@{s // window}", item.split, tuple(ids[s:s + window]))
                   for s in starts if len(ids[s:s + window]) >= 2)
    return out


def bundled_path(task: str) -> str:
    """The task file shipped with the package."""
    return str(resources.files("ffnskip_ext.eval") / "data" / _format(task).file)


def load_task(task: str, path: str | os.PathLike[str] | None = None) -> list[Any]:
    """The items of a task file (the bundled one when ``path`` is None)."""
    fmt = _format(task)
    path = os.fspath(path) if path is not None else bundled_path(task)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{task} task file not found: {path}")
    items: list[Any] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            item = _parse(fmt, line, where)
            if item.id in seen:
                raise ValueError(f"{where}: duplicate id {item.id!r}")
            seen.add(item.id)
            items.append(item)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def select(items: Sequence[Any], split: str | None, limit: int | None, seed: int) -> list[Any]:
    """Items of ``split`` (None: all), in an order shuffled by ``seed``, the first ``limit``
    (None: all). The same seed and limit always give the same subset."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    chosen = [item for item in items if split is None or item.split == split]
    random.Random(seed).shuffle(chosen)
    return chosen[:limit] if limit is not None else chosen


def _format(task: str) -> TaskFormat:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    return TASKS[task]


def _parse(fmt: TaskFormat, line: str, where: str) -> Any:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg})") from e
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    known = {"id", "split", *fmt.required, *fmt.optional}
    unknown = sorted(set(record) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} "
                         f"(expected {', '.join(sorted(known))})")
    missing = [k for k in ("id", *fmt.required) if k not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    split = record.get("split", "test")
    if split not in SPLITS:
        raise ValueError(f"{where}: split must be one of {SPLITS}, got {split!r}")
    values: dict[str, Any] = {"id": _string(record, "id", where), "split": split}
    for name, kind in {**fmt.required, **fmt.optional}.items():
        if name not in record:
            continue
        values[name] = _string(record, name, where) if kind == "str" else _strings(
            record, name, where)
    item = fmt.item(**values)
    problem = fmt.check(item) if fmt.check is not None else None
    if problem:
        raise ValueError(f"{where}: {problem}")
    return item


def _string(record: dict[str, Any], name: str, where: str) -> str:
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {name} must be a non-empty string, got {value!r}")
    return value


def _strings(record: dict[str, Any], name: str, where: str) -> tuple[str, ...]:
    value = record[name]
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, str) and v.strip() for v in value)):
        raise ValueError(f"{where}: {name} must be a non-empty list of non-empty strings, "
                         f"got {value!r}")
    return tuple(value)
