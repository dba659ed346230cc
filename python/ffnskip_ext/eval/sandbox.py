"""Runs untrusted Python (model-written code and its hidden tests) in a separate process.

``run_tests(program, tests)`` starts ``sys.executable -I -B -u`` with a small bootstrap, never
``exec`` in the calling process. The child gets an empty environment (a few locale and
directory variables aside), a fresh temporary working directory that is removed afterwards,
and its output goes to files capped in size. The program runs first, then every top-level
statement of the tests; the result is ``passed`` only when the child wrote a random per-run
token, which it reads from its stdin (a file the program cannot reach any more), after the
last test statement ran, and exited with status 0. ``run_batch`` runs several jobs, at most
``workers`` (default 2) child processes at a time.

What contains the code, layer by layer:

- **Process and time**: its own session (process group), killed as a whole with SIGKILL once
  ``timeout_s`` of wall-clock time has passed (status ``timeout``); RLIMIT_CPU a little above
  the timeout as a second stop.
- **Resource limits** (set by the bootstrap before the program runs, soft = hard; raising
  them again is refused by the audit hook): RLIMIT_AS ``memory_mb`` (an allocation beyond it
  raises MemoryError: status ``memory``), RLIMIT_FSIZE ``file_size_mb`` for every file the
  child writes, stdout and stderr included (a flood of output fails with EFBIG instead of
  filling the disk or the caller's memory), RLIMIT_NOFILE 64, RLIMIT_CORE 0.
- **Network namespace**: where ``unshare --net`` works (root or CAP_SYS_ADMIN on Linux) the
  child runs in a new network namespace, which has only a loopback interface that is down:
  no connection to anything, the host's 127.0.0.1 included. ``isolation()`` says whether it
  is in use.
- **Audit hook** (``sys.addaudithook``, installed in the child before the program runs; no
  Python API removes it, and it refuses further hooks): refuses (``PermissionError``, status
  ``blocked`` when the run then fails) ``socket.*``, ``subprocess.Popen``, ``os.system``,
  ``os.exec*``, ``os.spawn*``, ``os.fork``/``os.forkpty``/``os.posix_spawn*``, ``os.kill``/
  ``os.killpg``/``signal.pthread_kill``, ``ctypes.*`` and imports of ``ctypes``,
  ``cffi``, the ``_test*`` and sub-interpreter modules and re-imports of ``posix``/
  ``resource``/``_signal``/``_posixsubprocess`` (whose ``fork_exec``, which has no audit
  event, is replaced by one that refuses); ``resource.setrlimit``/``prlimit``;
  ``sys.settrace``/``setprofile``/``monitoring.register_callback``,
  ``sys._current_frames``, ``gc.get_objects``/
  ``get_referrers``/``get_referents`` and the frame attributes ``tb_frame``/``gi_frame``/
  ``cr_frame``/``ag_frame`` and ``sys._getframe`` (these raise ``ValueError``, which the
  standard library already handles as "no frame").
  Files: writing, creating, removing, renaming, chmod/chown/utime/truncate, ``mkdir`` and
  ``sqlite3.connect`` only inside the temporary directory (a ``dir_fd`` argument is looked
  up in ``/proc/self/fd``), at most ``max_files`` file creations; ``chdir`` only to the
  temporary directory itself; ``os.link``/``os.symlink`` refused, and directories outside
  the temporary directory cannot be opened (the ``open`` event does not show a ``dir_fd``,
  so relative paths are checked against the working directory and only descriptors of
  directories below it exist). Reading and listing only inside the Python installation
  (prefixes and ``sys.path``), the temporary directory, ``/dev/null`` and ``/dev/urandom``:
  the standard library imports and reads its sources normally, but ``/etc/passwd``,
  ``/proc/self/*`` and the job file holding the token are refused.
  Paths are resolved with symlinks followed by C functions bound before the program runs,
  so rebinding ``os.path`` or builtins does not change the checks. ``os.mkfifo``,
  ``os.mknod``, ``os.chroot`` and the ``set*id`` functions, which have no audit event, are
  removed from ``os`` and ``posix``.
- **Verdict**: the program and the tests run in a thread of their own whose frames cannot
  be reached (the frame accessors above are refused, and signal handlers, which receive the
  main thread's frame, cannot be installed from that thread), so the token is not readable
  from Python code; the tests see only ``entry_point`` (or, without one, a copy of the
  program's names) and the builtins as they were before the program ran; everything the
  bootstrap calls after the program has run was bound to a local beforehand. Exiting early
  (``sys.exit``, ``os._exit(0)``), printing a fake marker or killing the tests is a failure.

What it is not: a security boundary against a determined attacker. The child runs with the
caller's user id (dropping to an unprivileged user would need an interpreter that user can
read) and sees the real file system; every file-system and process rule except the
namespace and the rlimits is enforced by the audit hook inside the same interpreter, so code
that reaches native execution or reads memory (hand-made bytecode through ``code.replace`` or
``marshal``, which the standard library needs and the hook allows, a memory-corruption bug in
an extension module, ``_imp.create_builtin`` to get an unpatched ``posix`` back) can bypass
them. Without the network namespace, the hook is the only network barrier. Results can also
be cheated without escaping, e.g. by returning an object whose ``__eq__`` is always true or
by patching a module the tests import; the sandbox contains harm, it does not prove honesty.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import math
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

STATUSES = ("passed", "failed", "error", "timeout", "memory", "blocked")
# Exit codes of the bootstrap (the parent still requires the token for "passed").
_EXIT_STATUS = {0: "failed", 1: "failed", 2: "error", 3: "memory", 4: "blocked"}
_VERDICT = "ffnskip-sandbox: "  # prefix of the bootstrap's last stderr line
_TAIL_BYTES = 64 * 1024  # the token is looked for in this much of the end of stdout
_DETAIL_CHARS = 300

# The child. It reads the job (JSON with the token) from stdin, a file, then replaces stdin
# with /dev/null; sets the limits; installs the hook; runs the program and the tests in a
# thread whose frames the program cannot reach; writes the token only after the last test.
_BOOTSTRAP = r'''
import _thread, ast, builtins, json, os, posix, resource, signal, sys
import types  # imported before the hook: its import reads a traceback's frame

def _main():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_ = os._exit
    done = _thread.allocate_lock()
    done.acquire()
    _thread.start_new_thread(_worker, (done,))
    done.acquire()  # the worker always exits the process itself; this is a fallback
    exit_(70)

def _worker(done):
    try:
        _sandboxed()
    finally:
        done.release()

def _sandboxed():
    write, exit_, exec_, str_, type_, len_ = os.write, os._exit, exec, str, type, len
    BaseException_, MemoryError_ = BaseException, MemoryError
    PermissionError_, ValueError_, OSError_, ImportError_ = (PermissionError, ValueError, OSError,
                                                             ImportError)
    startswith, join, split, decode = str.startswith, str.join, str.split, bytes.decode
    int_, bytes_, tuple_, dict_, reversed_, isinstance_ = (int, bytes, tuple, dict, reversed,
                                                          isinstance)
    getcwd, lstat, stat_, readlink = posix.getcwd, posix.lstat, posix.stat, posix.readlink

    raw = b""
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        raw += chunk
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    job = json.loads(raw)
    del raw
    token = job["token"].encode()
    state = [False, 0, 0]  # something refused, files created, refusal lines written

    def verdict(code, message):
        try:
            line = "\n" + "ffnskip-sandbox: " + message[:600] + "\n"
            write(2, line.encode("utf-8", "replace"))
        except BaseException_:
            pass
        exit_(4 if state[0] and code in (1, 2) else code)

    def describe(error):
        try:
            name = type_(error).__name__
        except BaseException_:
            name = "exception"
        try:
            message = str_(error)
        except BaseException_:
            message = ""
        return name + (": " + message[:200] if message else "")

    for name, value in (("RLIMIT_CORE", 0), ("RLIMIT_FSIZE", job["file_size"]),
                        ("RLIMIT_NOFILE", 64), ("RLIMIT_AS", job["memory"]),
                        ("RLIMIT_CPU", job["cpu"])):
        kind = getattr(resource, name)
        hard = resource.getrlimit(kind)[1]
        soft = value if hard == resource.RLIM_INFINITY else min(value, hard)
        top = soft + 1 if name == "RLIMIT_CPU" else soft  # CPU: SIGXCPU, then SIGKILL
        resource.setrlimit(kind, (soft, top if hard == resource.RLIM_INFINITY
                                  else min(top, hard)))

    try:
        source = job["tests"]
        tests = tuple_((compile(ast.Module([node], []), "<tests>", "exec"),
                        (ast.get_source_segment(source, node) or "").split("\n")[0][:160])
                       for node in ast.parse(source, "<tests>").body)
    except SyntaxError as error:
        verdict(2, "error: the tests do not compile: " + describe(error))
    try:
        program = compile(job["program"], "<program>", "exec")
    except (SyntaxError, ValueError) as error:  # ValueError: a null byte in the source
        verdict(2, "error: the program does not compile: " + describe(error))
    entry_point, max_files = job["entry_point"], job["max_files"]
    pristine = dict(builtins.__dict__)

    work = getcwd()
    roots = []
    for path in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                 *sys.path):
        real = os.path.realpath(path) if path else ""
        if real not in ("", "/") and real not in roots:
            roots.append(real)
    roots = tuple_(r + "/" for r in roots) + (work + "/",)
    devices = ("/dev/null", "/dev/urandom")
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    create_flag = os.O_CREAT
    refused_events = frozenset((
        "os.system", "os.exec", "os.spawn", "os.fork", "os.forkpty", "os.posix_spawn",
        "os.posix_spawnp", "subprocess.Popen", "os.kill", "os.killpg", "os.link",
        "os.symlink", "os.startfile", "os.add_dll_directory", "signal.pthread_kill",
        "resource.setrlimit", "resource.prlimit", "sys.addaudithook", "sys.setprofile",
        "sys.settrace", "sys._current_frames", "sys._current_exceptions", "sys.remote_exec",
        "sys.monitoring.register_callback",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "sqlite3.enable_load_extension", "sqlite3.load_extension", "webbrowser.open",
        "cpython.PyInterpreterState_New", "os.unshare", "os.setns"))
    refused_prefixes = ("socket.", "ctypes.", "urllib.", "http.", "ftplib.", "smtplib.",
                        "poplib.", "imaplib.", "nntplib.", "telnetlib.", "_winapi.",
                        "winreg.", "msvcrt.")
    refused_modules = frozenset((
        "ctypes", "_ctypes", "_posixsubprocess", "posix", "resource", "_signal",
        "cffi", "_cffi_backend", "_testcapi", "_testinternalcapi", "_testmultiphase",
        "_testsinglephase", "_testimportmultiple", "_testbuffer", "_testclinic",
        "_xxsubinterpreters", "_xxinterpchannels", "_interpreters", "_interpchannels",
        "_interpqueues"))
    frame_attributes = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame"))
    # event -> ((index of a path argument, index of its dir_fd argument or None), ...)
    writes = {
        "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
        "os.rename": ((0, 2), (1, 3)), "os.chmod": ((0, 2),), "os.chown": ((0, 3),),
        "os.utime": ((0, 3),), "os.truncate": ((0, None),), "os.chflags": ((0, None),),
        "os.lchflags": ((0, None),), "os.setxattr": ((0, None),),
        "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),),
        "sqlite3.connect": ((0, None),),
    }
    reads = {"os.listdir": (0,), "os.scandir": (0,), "os.getxattr": (0,),
             "os.listxattr": (0,)}

    def text(path):
        # exact str copies: a str subclass could override the methods used below
        if type_(path) is str_:
            return path
        if isinstance_(path, str_):
            return join("", (path,))
        if isinstance_(path, bytes_):
            return decode(path, "utf-8", "surrogateescape")
        return None

    def resolve(path):
        # os.path.realpath with C functions only: absolute, symlinks followed
        if not startswith(path, "/"):
            path = getcwd() + "/" + path
        pending = [part for part in reversed_(split(path, "/")) if part]
        done = []
        links = 0
        while pending:
            part = pending.pop()
            if part == ".":
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            candidate = "/" + join("/", done + [part])
            try:
                link = (lstat(candidate).st_mode & 0o170000) == 0o120000
            except OSError_:
                link = False
            if not link:
                done.append(part)
                continue
            links += 1
            if links > 40:
                return None
            target = readlink(candidate)
            if startswith(target, "/"):
                done = []
            pending.extend(p for p in reversed_(split(target, "/")) if p)
        return "/" + join("/", done)

    def inside(real, prefixes):
        return real is not None and (startswith(real + "/", prefixes))

    def is_directory(real):
        try:
            return (stat_(real).st_mode & 0o170000) == 0o040000
        except OSError_:
            return False

    def check_write(path, dir_fd=None):
        name = text(path)
        if name is None:
            return "path of type " + type_(path).__name__
        if dir_fd not in (None, -1):
            # relative to a directory descriptor: find where it points
            if type_(dir_fd) is not int_:
                return "dir_fd"
            base = readlink("/proc/self/fd/" + str_(dir_fd))
            if not inside(resolve(base), (work + "/",)):
                return "dir_fd outside the temporary directory"
            if not startswith(name, "/"):
                name = base + "/" + name
        real = resolve(name)
        return None if inside(real, (work + "/",)) else "writes outside the temporary directory"

    def check_read(path):
        if path is None or type_(path) is int_:
            return None
        name = text(path)
        if name is None:
            return "path of type " + type_(path).__name__
        real = resolve(name)
        return None if real in devices or inside(real, roots) else "reads " + name[:80]

    def decide(event, args):
        if event in refused_events or startswith(event, refused_prefixes):
            return ""
        if event == "open":
            path, flags = args[0], args[2]
            if type_(path) is int_:
                return None
            name = text(path)
            if name is None:
                return "path of type " + type_(path).__name__
            real = resolve(name)
            if real is None:
                return "too many symbolic links"
            if is_directory(real):
                # a directory descriptor makes later relative paths (dir_fd, not in the
                # event) start there: only directories of the temporary directory
                return None if inside(real, (work + "/",)) else "opens a directory"
            if flags & write_flags:
                if flags & create_flag:
                    state[1] += 1
                    if state[1] > max_files:
                        return f"creates more than {max_files} files"
                return check_write(name)
            return check_read(name)
        if event in writes:
            if event == "os.mkdir":
                state[1] += 1
                if state[1] > max_files:
                    return f"creates more than {max_files} files"
            for i, fd in writes[event]:
                reason = check_write(args[i], None if fd is None or len_(args) <= fd
                                     else args[fd])
                if reason is not None:
                    return reason
            return None
        if event == "os.chdir":
            # the working directory stays put: relative paths are checked against it, and
            # a deeper one would let a descriptor of an upper directory escape
            name = text(args[0]) if type_(args[0]) is not int_ else None
            return None if name is not None and resolve(name) == work else "chdir"
        if event in reads:
            return check_read(args[reads[event][0]])
        if event == "import":
            top = split(args[0], ".")[0] if type_(args[0]) is str_ else ""
            return "module " + top if top in refused_modules else None
        if event == "object.__getattr__":
            return "frame" if len_(args) > 1 and args[1] in frame_attributes else None
        if event == "sys._getframe":
            return "frame"
        return None

    def hook(event, args):
        try:
            reason = decide(event, args)
        except BaseException_:
            reason = "unchecked"
        if reason is None:
            return
        if reason == "frame":  # the standard library treats ValueError as "no frame"
            raise ValueError_("frame access is refused in the sandbox")
        state[0] = True
        if state[2] < 20:
            state[2] += 1
            try:
                write(2, ("ffnskip-sandbox refused: " + event + (" (" + reason + ")" if reason
                          else "") + "\n").encode("utf-8", "replace"))
            except BaseException_:
                pass
        if startswith(reason, "module "):  # an ImportError lets code fall back, as usual
            raise ImportError_(reason[7:] + " cannot be imported in the sandbox")
        raise PermissionError_(event + " is refused in the sandbox")

    for name in ("chroot", "mkfifo", "mknod", "setuid", "seteuid", "setreuid", "setresuid",
                 "setgid", "setegid", "setregid", "setresgid", "setgroups", "initgroups",
                 "unshare", "setns"):
        for module in (os, posix):
            if hasattr(module, name):
                delattr(module, name)
    # fork_exec spawns without an audit event: replaced, so that importing subprocess (as
    # asyncio does) still works; Popen is refused by its own event
    import _posixsubprocess

    def fork_exec(*args, **kwargs):
        raise PermissionError_("fork_exec is refused in the sandbox")

    _posixsubprocess.fork_exec = fork_exec
    sys.addaudithook(hook)
    del job

    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec_(program, namespace)
    except MemoryError_:
        verdict(3, "memory: the program ran out of memory")
    except BaseException_ as error:
        verdict(2, "error: the program raised " + describe(error))
    if entry_point is None:
        names = dict_(namespace)
    else:
        try:
            names = {entry_point: namespace[entry_point]}
        except BaseException_:
            verdict(2, "error: the program does not define " + entry_point)
    names["__name__"], names["__builtins__"] = "__tests__", pristine
    for code, source in tests:
        try:
            exec_(code, names)
        except MemoryError_:
            verdict(3, "memory: " + source)
        except BaseException_ as error:
            verdict(1, "failed: " + source + " -> " + describe(error))
    try:
        write(1, b"\n" + token + b"\n")
    except BaseException_:
        exit_(1)
    exit_(0)

_main()
'''


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """``status`` is one of ``STATUSES``; ``passed`` is ``status == "passed"``. ``detail``
    is a short reason (the failing test statement, the exception, the refused operation);
    ``output_bytes`` the size of what the child wrote to stdout (capped by the file limit)."""

    passed: bool
    status: str
    detail: str
    seconds: float
    output_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class SandboxJob:
    program: str
    tests: str
    entry_point: str | None = None


@functools.cache
def _unshare_command() -> tuple[str, ...]:
    """``unshare --net --`` when a new network namespace can be made here, else ()."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return ()
    try:
        probe = subprocess.run([exe, "--net", "--", sys.executable, "-I", "-c", ""],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ()
    return (exe, "--net", "--") if probe.returncode == 0 else ()


def isolation() -> dict[str, bool]:
    """Which optional layers are in use on this machine."""
    return {"network_namespace": bool(_unshare_command())}


def run_tests(
    program: str,
    tests: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    *,
    entry_point: str | None = None,
    file_size_mb: int = 16,
    max_files: int = 64,
    network_namespace: bool | None = None,
) -> SandboxResult:
    """Runs ``program`` and then ``tests`` (plain ``assert`` statements) in a child process;
    see the module docstring for what is contained and how. ``network_namespace``: None uses
    one where the OS allows it, True requires one (RuntimeError when it cannot be made),
    False never uses one."""
    if not isinstance(program, str) or not isinstance(tests, str):
        raise TypeError("program and tests must be strings")
    if not timeout_s > 0 or memory_mb < 64 or file_size_mb < 1 or max_files < 0:
        raise ValueError(f"bad limits: timeout_s={timeout_s}, memory_mb={memory_mb}, "
                         f"file_size_mb={file_size_mb}, max_files={max_files}")
    prefix = () if network_namespace is False else _unshare_command()
    if network_namespace and not prefix:
        raise RuntimeError("a network namespace cannot be made here (unshare --net failed)")
    token = secrets.token_hex(16)
    job = {"token": token, "program": program, "tests": tests, "entry_point": entry_point,
           "memory": memory_mb << 20, "file_size": file_size_mb << 20,
           "cpu": max(1, math.ceil(timeout_s)) + 1, "max_files": max_files}
    root = tempfile.mkdtemp(prefix="ffnskip-sandbox-")
    try:
        work = os.path.join(root, "work")
        os.mkdir(work, 0o700)
        paths = {name: os.path.join(root, name) for name in ("job", "stdout", "stderr")}
        with open(paths["job"], "w", encoding="utf-8") as f:
            json.dump(job, f)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        start = time.monotonic()
        with open(paths["job"], "rb") as stdin, open(paths["stdout"], "wb") as stdout, \
                open(paths["stderr"], "wb") as stderr:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-I", "-B", "-u", "-c", _BOOTSTRAP],
                stdin=stdin, stdout=stdout, stderr=stderr, cwd=work, env=env,
                start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)
                code = proc.wait()
        seconds = time.monotonic() - start
        out_size = os.path.getsize(paths["stdout"])
        tail = _read_tail(paths["stdout"], _TAIL_BYTES)
        errors = _read_tail(paths["stderr"], 8192).decode("utf-8", "replace")
        return _result(timed_out, code, token.encode() in tail, errors, timeout_s, seconds,
                       out_size)
    finally:
        _remove_tree(root)


def run_batch(jobs: Sequence[SandboxJob], workers: int = 2,
              **limits: object) -> list[SandboxResult]:
    """``run_tests`` of every job, at most ``workers`` child processes at a time (threads
    here only wait for them); results in the order of ``jobs``."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not jobs:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        futures = [pool.submit(run_tests, j.program, j.tests, entry_point=j.entry_point,
                               **limits) for j in jobs]  # type: ignore[arg-type]
        return [f.result() for f in futures]


def _result(timed_out: bool, code: int, token_seen: bool, errors: str, timeout_s: float,
            seconds: float, out_size: int) -> SandboxResult:
    def result(status: str, detail: str) -> SandboxResult:
        return SandboxResult(status == "passed", status, detail[:_DETAIL_CHARS], seconds,
                             out_size)

    verdicts = [line[len(_VERDICT):] for line in errors.splitlines()
                if line.startswith(_VERDICT)]
    said = verdicts[-1] if verdicts else ""
    said = said.split(": ", 1)[1] if ": " in said else said
    last = next((line for line in reversed(errors.splitlines()) if line.strip()), "")
    if timed_out:
        return result("timeout", f"killed after the {timeout_s:g} s wall-clock limit")
    if code < 0:
        name = _signal_name(-code)
        if -code in (signal.SIGXCPU, signal.SIGKILL):
            return result("timeout", f"killed by {name} (CPU time limit)")
        return result("error", f"killed by {name}" + (f": {last}" if last else ""))
    if code == 0 and token_seen:
        return result("passed", "")
    if code == 0:
        return result("failed", "exited with status 0 before the tests finished")
    status = _EXIT_STATUS.get(code, "error")
    return result(status, said or last or f"exited with status {code}")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(pgid, signal.SIGKILL)


def _read_tail(path: str, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - size))
        return f.read()


def _remove_tree(path: str) -> None:
    """Removes the run's directory, also when the program took permissions away from the
    directories it made (which stops a non-root caller)."""
    for parent, dirs, _ in os.walk(path):
        for name in dirs:
            child = os.path.join(parent, name)
            if not os.path.islink(child):  # chmod would follow a link
                with contextlib.suppress(OSError):
                    os.chmod(child, stat.S_IRWXU)
    shutil.rmtree(path, ignore_errors=True)
