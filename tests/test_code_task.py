"""The code task: the bundled problems, the sandbox against hostile programs, answer
extraction, the task file loader and the harness end to end."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile

import pytest

from ffnskip_ext.eval.codetask import CODE_INSTRUCTION, code_end, code_message, extract_code
from ffnskip_ext.eval.sandbox import SandboxJob, isolation, run_batch, run_tests
from ffnskip_ext.eval.tasks import TASKS, load_task, select

linux = pytest.mark.skipif(not sys.platform.startswith("linux"),
                           reason="the sandbox's limits and checks are Linux's")

# --- the bundled problems ------------------------------------------------------------------


def test_bundled_problems_have_the_promised_shape() -> None:
    problems = load_task("code")
    assert len(problems) >= 64
    assert [p.id for p in problems] == [f"code-{i:03d}" for i in range(1, len(problems) + 1)]
    assert 0.2 <= sum(p.split == "train" for p in problems) / len(problems) <= 0.3
    assert {p.difficulty for p in problems} == {"easy", "medium", "hard"}
    assert all(p.topic for p in problems)
    for p in problems:
        assert '"""' in p.prompt and p.prompt.rstrip().endswith('"""')  # signature + docstring
        assert "assert" in p.tests and p.entry_point in p.tests
        assert p.solution.strip() not in p.prompt


@linux
def test_bundled_tests_pass_with_the_solution_and_fail_with_return_none() -> None:
    problems = load_task("code")
    solved = run_batch([SandboxJob(extract_code(p.solution, p.prompt, p.entry_point), p.tests,
                                   p.entry_point) for p in problems], workers=2)
    empty = run_batch([SandboxJob(p.prompt + "    return None\n", p.tests, p.entry_point)
                       for p in problems], workers=2)
    wrong = {p.id: (s.status, s.detail) for p, s in zip(problems, solved, strict=True)
             if not s.passed}
    assert wrong == {}
    assert [p.id for p, r in zip(problems, empty, strict=True) if r.passed] == []
    assert {r.status for r in empty} == {"failed"}


# --- the sandbox ---------------------------------------------------------------------------

TEST_CALL = "assert f() == 1\n"


@linux
def test_a_correct_program_passes_in_a_fresh_directory_that_is_removed() -> None:
    program = (
        "import asyncio, collections, dataclasses, inspect, json, logging, os, typing\n"
        "EMPTY = os.listdir('.') == []\n"
        "def f():\n"
        "    with open('notes.txt', 'w') as out:\n"
        "        out.write('kept inside')\n"
        "    assert open('notes.txt').read() == 'kept inside'\n"
        "    assert 'def dumps' in inspect.getsource(json)  # the standard library is readable\n"
        "    return 1 if EMPTY else 0\n")
    result = run_tests(program, TEST_CALL)
    assert result.passed and result.status == "passed", result
    # where the program ran, told through a failure's detail: gone afterwards
    result = run_tests("import os\ndef f():\n    raise RuntimeError('cwd=' + os.getcwd())\n",
                       TEST_CALL)
    work = result.detail.split("cwd=")[1].split()[0]
    assert os.path.basename(os.path.dirname(work)).startswith("ffnskip-sandbox-")
    assert not os.path.exists(os.path.dirname(work))


@linux
@pytest.mark.parametrize(("program", "status"), [
    ("def f():\n    return 2\n", "failed"),
    ("def f(:\n", "error"),
    ("def g():\n    return 1\n", "error"),  # the entry point is missing
    ("raise RuntimeError('at import')\n", "error"),
    ("def f():\n    return 1 // 0\n", "failed"),
])
def test_wrong_programs_fail_with_a_status_and_detail(program: str, status: str) -> None:
    result = run_tests(program, TEST_CALL, entry_point="f")
    assert not result.passed and result.status == status and result.detail, result


@linux
def test_an_infinite_loop_is_killed_at_the_time_limit() -> None:
    result = run_tests("def f():\n    while True:\n        pass\n", TEST_CALL, timeout_s=1.0)
    assert result.status == "timeout" and not result.passed
    assert result.seconds < 4.0


@linux
def test_a_huge_allocation_fails_with_memory() -> None:
    result = run_tests("def f():\n    return len(bytearray(10 * 1024 ** 3))\n", TEST_CALL,
                       memory_mb=256)
    assert result.status == "memory" and result.seconds < 5.0, result


@linux
def test_shell_and_subprocess_escapes_are_contained(tmp_path) -> None:
    for program in (
        f"import os\ndef f():\n    os.system('touch {tmp_path}/system')\n    return 1\n",
        f"import subprocess\ndef f():\n    subprocess.run(['touch', '{tmp_path}/run'])\n"
        "    return 1\n",
        f"import os\ndef f():\n    os.execv('/bin/touch', ['touch', '{tmp_path}/exec'])\n",
        f"import os\ndef f():\n    os.posix_spawn('/bin/touch', ['touch', '{tmp_path}/spawn'],"
        " {})\n    return 1\n",
    ):
        result = run_tests(program, TEST_CALL)
        assert not result.passed and result.status in ("blocked", "error"), result
    assert list(tmp_path.iterdir()) == []


@linux
def test_writes_outside_the_temporary_directory_are_refused(tmp_path) -> None:
    target = tmp_path / "escaped.txt"
    for program in (
        f"def f():\n    open('{target}', 'w').write('x')\n    return 1\n",
        f"import os\ndef f():\n    os.close(os.open('{target}', os.O_CREAT | os.O_WRONLY))\n"
        "    return 1\n",
        f"import shutil\ndef f():\n    open('mine', 'w').close()\n"
        f"    shutil.copy('mine', '{target}')\n    return 1\n",
        f"import os\ndef f():\n    open('mine', 'w').close()\n    os.rename('mine', '{target}')\n"
        "    return 1\n",
        f"import os\ndef f():\n    os.symlink('{tmp_path}', 'link')\n"
        "    open('link/escaped.txt', 'w').write('x')\n    return 1\n",
        f"import os\ndef f():\n    fd = os.open('{tmp_path}', os.O_RDONLY)\n"
        "    os.close(os.open('escaped.txt', os.O_CREAT | os.O_WRONLY, dir_fd=fd))\n"
        "    return 1\n",
        "import os\ndef f():\n    os.makedirs('a/b')\n    fd = os.open('a', os.O_RDONLY)\n"
        "    os.close(os.open('../../escaped.txt', os.O_CREAT | os.O_WRONLY, dir_fd=fd))\n"
        "    return 1\n",
        f"import os\ndef f():\n    os.mkfifo('{target}')\n    return 1\n",
        f"import os\ndef f():\n    os.chdir('{tmp_path}')\n    open('escaped.txt', 'w')\n"
        "    return 1\n",
    ):
        result = run_tests(program, TEST_CALL)
        assert not result.passed, program
        assert not target.exists(), program
    assert list(tmp_path.iterdir()) == []
    assert not os.path.exists(os.path.join(tempfile.gettempdir(), "escaped.txt"))


@linux
def test_reading_outside_python_and_the_temporary_directory_is_refused() -> None:
    # documented choice: /etc/passwd, /proc/self/* and the job file are not readable
    for path in ("/etc/passwd", "/proc/self/mem", "/proc/self/environ", "../job"):
        result = run_tests(f"def f():\n    open({path!r}, 'rb').read(1)\n    return 1\n",
                           TEST_CALL)
        assert result.status == "blocked" and "open" in result.detail, (path, result)


@linux
@pytest.mark.parametrize("namespace", [False, None])
def test_network_connections_fail(namespace: bool | None) -> None:
    if namespace is None and not isolation()["network_namespace"]:
        pytest.skip("no network namespace here")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        for program in (
            f"import socket\ndef f():\n    socket.create_connection(('127.0.0.1', {port}), 2)\n"
            "    return 1\n",
            f"import _socket\ndef f():\n    s = _socket.socket()\n"
            f"    s.connect(('127.0.0.1', {port}))\n    return 1\n",
            f"import urllib.request\ndef f():\n"
            f"    urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)\n    return 1\n",
        ):
            result = run_tests(program, TEST_CALL, network_namespace=namespace)
            assert not result.passed, result
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever connected


@linux
def test_the_network_namespace_alone_has_no_route_to_the_host() -> None:
    if not isolation()["network_namespace"]:
        pytest.skip("no network namespace here")
    # the audit hook would refuse the socket: this asks the kernel instead, before the hook
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        import subprocess

        from ffnskip_ext.eval.sandbox import _unshare_command

        probe = subprocess.run(
            [*_unshare_command(), sys.executable, "-I", "-c",
             f"import socket; socket.create_connection(('127.0.0.1', {port}), 2)"],
            capture_output=True, timeout=30)
        assert probe.returncode != 0
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()


@linux
def test_fork_bombs_are_contained() -> None:
    for program in ("import os\ndef f():\n    while True:\n        os.fork()\n",
                    "import multiprocessing\ndef f():\n    while True:\n"
                    "        multiprocessing.Process(target=f).start()\n",
                    "import pty\ndef f():\n    while True:\n        pty.fork()\n"):
        result = run_tests(program, TEST_CALL, timeout_s=5.0)
        assert result.status in ("blocked", "error") and result.seconds < 5.0, result


@linux
@pytest.mark.parametrize("program", [
    # prints what a verdict looks like and leaves with status 0 before any test ran
    "import os\nprint('passed')\nprint('ffnskip-sandbox: passed')\nos._exit(0)\n"
    "def f():\n    return 1\n",
    "import sys\nsys.exit(0)\ndef f():\n    return 1\n",
    "def f():\n    raise SystemExit(0)\n",
    "import os\ndef f():\n    os._exit(0)\n",
    "import threading, os, time\n"
    "threading.Thread(target=lambda: (time.sleep(0.05), os._exit(0))).start()\n"
    "def f():\n    time.sleep(2)\n    return 1\n",
    "import os\ndef f():\n    os.kill(os.getpid(), 9)\n",
])
def test_leaving_early_or_faking_the_marker_is_a_failure(program: str) -> None:
    assert not run_tests(program, TEST_CALL).passed


@linux
def test_the_token_is_not_reachable_through_frames_or_the_garbage_collector() -> None:
    # the token is 32 hex digits as bytes in the bootstrap's frame: print it if reachable
    program = (
        "import gc, os, sys\n"
        "def leak(values):\n"
        "    for v in values:\n"
        "        if isinstance(v, bytes) and len(v) == 32:\n"
        "            os.write(1, b'\\n' + v + b'\\n')\n"
        "            os._exit(0)\n"
        "def frames():\n"
        "    try:\n"
        "        yield sys._getframe(1)\n"
        "    except ValueError:\n"
        "        pass\n"
        "    try:\n"
        "        raise KeyError\n"
        "    except KeyError as e:\n"
        "        try:\n"
        "            yield e.__traceback__.tb_frame\n"
        "        except ValueError:\n"
        "            pass\n"
        "def f():\n"
        "    for frame in frames():\n"
        "        while frame is not None:\n"
        "            leak(frame.f_locals.values())\n"
        "            frame = frame.f_back\n"
        "    try:\n"
        "        leak(gc.get_objects())\n"
        "    except PermissionError:\n"
        "        pass\n"
        "    return 0\n")
    result = run_tests(program, TEST_CALL)
    assert not result.passed and result.status == "blocked", result


@linux
def test_the_audit_hook_survives_attempts_to_remove_it(tmp_path) -> None:
    program = (
        "import importlib, sys\n"
        "sys.addaudithook(lambda *args: None)  # no API removes a hook; this one is refused\n"
        "sys.audit = lambda *args: None\n"
        "for name in ('os', 'subprocess', 'shutil'):\n"
        "    sys.modules.pop(name, None)\n"
        "import os\n"
        "importlib.invalidate_caches()\n"
        "import builtins\n"
        "builtins.open = open\n"
        "def f():\n"
        f"    os.system('touch {tmp_path}/escaped')\n"
        "    return 1\n")
    result = run_tests(program, TEST_CALL)
    assert result.status == "blocked" and "os.system" in result.detail, result
    assert list(tmp_path.iterdir()) == []


@linux
def test_rebinding_what_the_checks_use_does_not_open_a_way_out(tmp_path) -> None:
    # the hook resolves paths with functions bound before the program ran
    program = (
        "import os, posixpath\n"
        "posixpath.realpath = os.path.realpath = lambda p, **k: os.getcwd() + '/x'\n"
        "os.path.abspath = lambda p: os.getcwd() + '/x'\n"
        "def f():\n"
        f"    open('{tmp_path}/escaped', 'w')\n"
        "    return 1\n")
    assert run_tests(program, TEST_CALL).status == "blocked"
    assert list(tmp_path.iterdir()) == []


@linux
def test_a_flood_of_output_is_capped() -> None:
    result = run_tests("def f():\n    while True:\n        print('x' * 65536)\n", TEST_CALL,
                       file_size_mb=1)
    assert not result.passed and result.output_bytes <= 1 << 20 and result.seconds < 5.0


@linux
def test_rlimits_cannot_be_raised_again() -> None:
    program = ("import resource\ndef f():\n"
               "    resource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n    return 1\n")
    assert run_tests(program, TEST_CALL).status == "blocked"


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        run_tests("", "", timeout_s=0)
    with pytest.raises(ValueError):
        run_tests("", "", memory_mb=1)
    with pytest.raises(ValueError):
        run_batch([], workers=0)


# --- extraction ----------------------------------------------------------------------------

PROMPT = ('from typing import Iterable\n\n\ndef total(values: Iterable[int]) -> int:\n'
          '    """Return the sum of `values`."""\n')
FUNCTION = "def total(values):\n    return sum(values)\n"


@pytest.mark.parametrize(("answer", "program"), [
    # a labelled block with the whole function: the prompt's imports go in front of it
    (f"```python\n{FUNCTION}```", "from typing import Iterable\n\n\n" + FUNCTION),
    (f"Here it is:\n\n```py\n{FUNCTION}```\nIt adds them up.",
     "from typing import Iterable\n\n\n" + FUNCTION),
    (f"```\n{FUNCTION}```", "from typing import Iterable\n\n\n" + FUNCTION),  # unlabelled
    # a body only: the whole prompt goes in front
    ("```python\n    return sum(values)\n```", PROMPT + "    return sum(values)\n"),
    # no fence: the continuation of the prompt's body
    ("    return sum(values)\n", PROMPT + "    return sum(values)\n"),
    (FUNCTION, "from typing import Iterable\n\n\n" + FUNCTION),
    # the python block wins over an earlier shell block, the first python block over later
    (f"```bash\npip install x\n```\n```python\n{FUNCTION}```\n```python\nprint(1)\n```",
     "from typing import Iterable\n\n\n" + FUNCTION),
    # cut off by the length limit: the block runs to the end
    ("```python\ndef total(values):\n    return sum(val", "from typing import Iterable\n\n\n"
     "def total(values):\n    return sum(val"),
    # another function name: the prompt's function is still defined (and returns None)
    ("```python\ndef add_all(values):\n    return sum(values)\n```",
     PROMPT + "def add_all(values):\n    return sum(values)\n"),
])
def test_extract_code(answer: str, program: str) -> None:
    assert extract_code(answer, PROMPT, "total") == program


@linux
def test_extracted_answers_run() -> None:
    tests = "assert total([1, 2, 3]) == 6\nassert total([]) == 0\n"
    answers = [f"```python\n{FUNCTION}```", "    return sum(values)\n",
               "```python\n    return sum(values)\n```", "```python\ndef add_all(v):\n"
               "    return 0\n```"]
    results = run_batch([SandboxJob(extract_code(a, PROMPT, "total"), tests, "total")
                         for a in answers])
    assert [r.passed for r in results] == [True, True, True, False]


@pytest.mark.parametrize(("text", "end"), [
    ("", None),
    ("```python\ndef f():\n    return 1\n", None),  # still open
    ("```python\ndef f():\n    return 1\n```", 35),
    ("```python\ndef f():\n    return 1\n```\nMore text", 35),
    ("Sure:\n```\nx = 1\n```", 19),
    ("```python\nx = 1\n  ```", 21),
])
def test_code_end_is_the_closing_fence(text: str, end: int | None) -> None:
    assert code_end(text) == end
    if end is not None:
        assert text[:end].endswith("```")


def test_code_message() -> None:
    message = code_message(PROMPT)
    assert message.startswith(CODE_INSTRUCTION) and f"```python\n{PROMPT}```" in message


# --- task files ----------------------------------------------------------------------------

GOOD = {"id": "c1", "prompt": PROMPT, "entry_point": "total",
        "tests": "assert total([1]) == 1\n", "solution": FUNCTION}


@pytest.mark.parametrize(("change", "message"), [
    ({"tests": None}, "missing field(s) tests"),
    ({"solution": None}, "missing field(s) solution"),
    ({"entry_point": "not a name"}, "entry_point must be a Python identifier"),
    ({"entry_point": "other"}, "prompt does not define function 'other'"),
    ({"tests": "assert (\n"}, "tests is not valid Python"),
    ({"prompt": "def total(:\n"}, "prompt is not valid Python"),
    ({"tests": ""}, "tests must be a non-empty string"),
    ({"hidden": True}, "unknown field(s) hidden"),
    ({"split": "dev"}, "split must be"),
])
def test_user_code_files_are_checked_line_by_line(tmp_path, change, message) -> None:
    record = {**GOOD, "id": "c2", **change}
    record = {k: v for k, v in record.items() if v is not None}
    path = tmp_path / "my_code.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError) as info:
        load_task("code", path)
    assert str(info.value).startswith(f"{path}:2: ") and message in str(info.value)


def test_a_user_code_file_loads(tmp_path) -> None:
    path = tmp_path / "my_code.jsonl"
    path.write_text(json.dumps({**GOOD, "split": "train", "difficulty": "easy"}) + "\n")
    (item,) = load_task("code", path)
    assert (item.entry_point, item.split, item.difficulty, item.topic) == (
        "total", "train", "easy", None)
    assert TASKS["code"].file == "code.jsonl"


# --- the harness ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_chat_model_dir):
    import ffnskip_ext

    decoder = ffnskip_ext.Decoder.from_pretrained(tiny_chat_model_dir, max_seq_len=1024)
    return decoder, ffnskip_ext.load_tokenizer(tiny_chat_model_dir)


def test_a_stop_rule_ends_generation_where_it_says(model) -> None:
    from ffnskip_ext.eval.harness import _Run

    decoder, tokenizer = model
    # a random model may end at once on one prompt: take the longest of a few answers
    candidates = [[{"role": "user", "content": text}] for text in (
        "Write some code.", "Hello", "Sort a list.", code_message(PROMPT), "Why?")]
    messages, free = max(((m, _Run(decoder, tokenizer).generate(m, 24)) for m in candidates),
                         key=lambda pair: len(pair[1].text))
    assert len(free.text) > 6
    stopped = _Run(decoder, tokenizer).generate(
        messages, 24, stop_at=lambda text: 5 if len(text) >= 6 else None)
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:5]
    assert stopped.token_ids == free.token_ids[:len(stopped.token_ids)]


@linux
def test_harness_scores_pass_at_1(model, tmp_path) -> None:
    from ffnskip_ext.eval.harness import EvalSettings, evaluate, read_rows

    decoder, tokenizer = model
    settings = EvalSettings(limits={"code": 2}, code_max_new_tokens=48)
    rows = evaluate(decoder, tokenizer, [], settings, out_dir=tmp_path, progress=False)
    (row,) = rows
    assert read_rows(tmp_path)[0]["metrics"] == row["metrics"]
    assert row["task"] == "code" and row["n"] == 2
    assert row["metrics"]["pass@1"] == 0.0  # a random model solves nothing
    chosen = select(load_task("code"), "test", 2, 0)
    assert [s["id"] for s in row["samples"]] == [p.id for p in chosen]
    for sample in row["samples"]:
        assert sample["passed"] is False and sample["status"] in (
            "failed", "error", "blocked", "timeout", "memory")
        assert len(sample["tokens"]) <= 48
    assert row["metrics"]["identical"] == 1.0


@linux
def test_cli_report_has_the_code_column(tiny_chat_model_dir, tmp_path) -> None:
    from ffnskip_ext import StaticFFNSkip
    from ffnskip_ext.cli import main

    policy = tmp_path / "static.json"
    policy.write_text(StaticFFNSkip([3]).to_json())
    code = tmp_path / "short_code.jsonl"  # short prompts: the tiny model has 512 positions
    code.write_text(json.dumps(GOOD) + "\n")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_chat_model_dir), "--tasks", "code",
                 "--task-file", f"code={code}", "--policies", str(policy),
                 "--speed-tokens", "0", "--no-plots", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| policy | target"))
    assert "Code pass@1" in header
    assert "code 256 tokens" in report
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [(r["policy"], r["task"]) for r in rows] == [("dense", "code"), ("static", "code")]
