"""The code task's text handling: the message the model gets, where its answer ends and the
program that is tested (the tests run in ``sandbox``)."""

from __future__ import annotations

import re

# The one instruction of the code task; the problem's prompt follows it in a python fence.
CODE_INSTRUCTION = ("Complete the following Python function. Reply with the complete function "
                    "in a single ```python code block, without explanations, examples or tests.")

_FENCE = re.compile(r"^[ \t]*```[ \t]*([^\s`]*)[^\n]*$", re.MULTILINE)
_PYTHON_TAGS = ("python", "py", "python3")


def code_message(prompt: str) -> str:
    """The user message of one problem."""
    return f"{CODE_INSTRUCTION}\n\n```python\n{prompt.rstrip()}\n```"


def code_end(text: str) -> int | None:
    """Where an answer's first code block closes: the index just past the backticks of the
    fence that follows an opening fence; None while no block has closed. Generation stops
    there (a stop string cannot tell an opening fence from a closing one)."""
    fences = list(_FENCE.finditer(text))
    if len(fences) < 2:
        return None
    closing = fences[1]
    return closing.start() + closing.group(0).index("```") + 3


def _blocks(answer: str) -> list[tuple[str, str]]:
    """(language tag, code) of the fenced blocks, fences paired in order; an unclosed last
    block runs to the end of the answer."""
    fences = list(_FENCE.finditer(answer))
    blocks = []
    for i in range(0, len(fences), 2):
        opening = fences[i]
        end = fences[i + 1].start() if i + 1 < len(fences) else len(answer)
        blocks.append((opening.group(1).lower(), answer[opening.end() + 1:end]))
    return blocks


def defines(code: str, name: str) -> bool:
    """Whether ``code`` defines a top-level function ``name``."""
    return re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code,
                     re.MULTILINE) is not None


def extract_code(answer: str, prompt: str, entry_point: str) -> str:
    """The program to test from a model's answer.

    The code is the first fenced block labelled python (``python``, ``py``, ``python3``), or
    else the first unlabelled one; an answer without such a block is taken as the
    continuation of the prompt's function body. When that code defines ``entry_point``
    itself, the part of the prompt above the function (its imports and helpers) is put in
    front of it; when it does not (a body only), the whole prompt is.
    """
    blocks = _blocks(answer)
    code = next((c for tag, c in blocks if tag in _PYTHON_TAGS), None)
    if code is None:
        code = next((c for tag, c in blocks if not tag), None)
    if code is None:
        code = answer
    prompt = prompt if prompt.endswith("\n") else prompt + "\n"
    if not defines(code, entry_point):
        return prompt + code
    match = re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", prompt,
                      re.MULTILINE)
    header = prompt[:match.start()] if match else ""
    return header + code
