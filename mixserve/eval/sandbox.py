"""A sandbox for running generated Python against unit tests: a subprocess with resource limits.

Defence in depth against buggy or careless generated code (a stray ``rm``, an endless loop, a 2 GB
allocation), not a security boundary against code written to escape it: CPython audit hooks can
be bypassed by a determined attacker. Run the benchmark in a throwaway container or VM as well.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

# ------------------------------------------------------------------------------------------ Python

PythonReason = Literal["passed", "failed", "timeout", "error", "syntax", "killed"]


@dataclass(frozen=True)
class PythonResult:
    """Outcome of one sandboxed run: ``passed`` is True only for reason "passed".

    reason: "passed" (all tests ran), "failed" (an AssertionError), "syntax" (the code does not compile),
    "error" (any other exception, including SystemExit or a refused operation), "timeout" (wall clock or
    CPU limit), "killed" (ended by another signal). ``output`` is the tail of stdout and stderr together.
    """

    passed: bool
    reason: PythonReason
    output: str = ""


_OUTPUT_TAIL_BYTES = 4_000
_FILE_SIZE_LIMIT = 1 << 20
_SOLUTION_FILE = "solution.py"
_TESTS_FILE = "tests.py"
_RECORDED_REASONS: frozenset[str] = frozenset({"passed", "failed", "syntax", "error"})

# Runs in the child as `python -I -B -c _BOOTSTRAP work_dir result_fd cpu_s memory_bytes fsize_bytes`.
# It limits itself (no preexec_fn: that is unsafe with the thread pool in run_python_tests_many),
# reads and compiles the sources, installs the audit hook, runs code then tests in one namespace, and
# reports its verdict on result_fd. Exit code alone is not trusted: sys.exit(0) or os._exit(0) in the
# code would otherwise "pass" without running the tests.
_BOOTSTRAP = r"""
import os, resource, signal, sys, traceback

work, result_fd = sys.argv[1], int(sys.argv[2])
cpu_s, memory_bytes, fsize_bytes = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
sys.argv = ["solution.py"]


def limit(which, soft, hard):
    try:
        resource.setrlimit(which, (soft, hard))
    except (ValueError, OSError):
        pass  # above the inherited hard limit, or unknown here: keep the inherited one


limit(resource.RLIMIT_CPU, cpu_s, cpu_s + 1)  # SIGXCPU at the soft limit, SIGKILL one second later
limit(resource.RLIMIT_AS, memory_bytes, memory_bytes)
limit(resource.RLIMIT_FSIZE, fsize_bytes, fsize_bytes)
limit(resource.RLIMIT_CORE, 0, 0)
limit(resource.RLIMIT_NPROC, 0, 0)  # no fork, no threads; root ignores it, the audit hook covers that case
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over-long writes raise OSError instead of killing


def finish(reason, code):
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    try:
        os.write(result_fd, reason.encode())
    except OSError:
        pass
    os._exit(code)


sources = []
for name in ("solution.py", "tests.py"):
    path = os.path.join(work, name)
    with open(path, "rb") as f:
        sources.append((name, f.read()))
    os.remove(path)  # the code has no business reading the tests
try:
    code_obj = compile(sources[0][1], "solution.py", "exec", dont_inherit=True)
except (SyntaxError, ValueError):
    traceback.print_exc()
    finish("syntax", 2)
except BaseException:
    traceback.print_exc()
    finish("error", 3)
tests_obj = compile(sources[1][1], "tests.py", "exec", dont_inherit=True)  # the parent compiled it already

prefix = work.rstrip(os.sep) + os.sep
write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
denied = frozenset({
    "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "subprocess.Popen",
    "os.kill", "os.killpg", "signal.pthread_kill", "os.link", "os.symlink", "shutil.rmtree",
    "resource.setrlimit", "resource.prlimit", "webbrowser.open", "urllib.Request",
})
denied_prefixes = ("socket.", "ctypes.")
denied_modules = frozenset({"ctypes", "_ctypes", "_posixsubprocess"})  # _posixsubprocess.fork_exec is not audited
path_events = frozenset({
    "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "os.chown", "os.utime", "os.mkfifo",
    "os.mknod", "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags",
})


def inside(path):
    if isinstance(path, int):
        return True  # an already-open descriptor: its opening was checked, or it is a standard stream
    try:
        # abspath only: realpath would stat and readlink from inside the hook. Symlinks cannot be made.
        full = os.path.abspath(os.fsdecode(path))
    except Exception:
        return False
    return full == prefix[:-1] or full.startswith(prefix)


def hook(event, args):
    if event in denied or event.startswith(denied_prefixes):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import":
        if args[0].partition(".")[0] in denied_modules:
            raise PermissionError(f"sandbox: import {args[0]} is not allowed")
    elif event == "open":
        mode = args[1] if len(args) > 1 else None
        flags = args[2] if len(args) > 2 else 0
        writes = isinstance(flags, int) and flags & write_flags
        writes = writes or (isinstance(mode, str) and any(c in mode for c in "wax+"))
        if writes and not inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} is not allowed")
    elif event in path_events:
        if not inside(args[0]):
            raise PermissionError(f"sandbox: {event} {args[0]!r} is not allowed")
    elif event == "os.rename":
        if not (inside(args[0]) and inside(args[1])):
            raise PermissionError(f"sandbox: renaming {args[0]!r} is not allowed")


sys.addaudithook(hook)
# Not "__main__": a model's `if __name__ == "__main__": main()` would read the empty stdin and fail.
namespace = {"__name__": "solution", "__builtins__": __builtins__}
try:
    exec(code_obj, namespace)
    exec(tests_obj, namespace)
except AssertionError:
    traceback.print_exc()
    finish("failed", 1)
except BaseException:  # SystemExit and KeyboardInterrupt too: the tests did not run to the end
    traceback.print_exc()
    finish("error", 3)
finish("passed", 0)
"""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's whole session (it is its group leader), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _read_verdict(fd: int) -> str:
    """What the bootstrap reported on the result pipe ("" if nothing); never blocks."""
    os.set_blocking(fd, False)  # a stray holder of the write end must not hang us
    try:
        return os.read(fd, 64).decode("ascii", "replace")
    except BlockingIOError:
        return ""


def _output_tail(stream: Any) -> str:
    stream.seek(0, os.SEEK_END)
    stream.seek(max(0, stream.tell() - _OUTPUT_TAIL_BYTES))
    return stream.read().decode("utf-8", "replace")


def _classify(returncode: int, timed_out: bool, verdict: str) -> PythonReason:
    if timed_out:
        return "timeout"
    if returncode < 0:
        # SIGXCPU is the CPU-time limit: a timeout by another clock.
        return "timeout" if -returncode == signal.SIGXCPU else "killed"
    if verdict not in _RECORDED_REASONS or (verdict == "passed" and returncode != 0):
        return "error"  # e.g. os._exit() before the tests ran
    return verdict  # type: ignore[return-value]  # checked against _RECORDED_REASONS


def run_python_tests(code: str, tests: str, *, timeout_s: float = 3.0, memory_mb: int = 512) -> PythonResult:
    """Run ``code`` then ``tests`` (assert statements) in one namespace, in a limited subprocess.

    The child is ``python -I -B`` in a fresh temporary directory (its cwd, HOME and TMPDIR) with a minimal
    environment, no stdin, its own session, and limits: ``timeout_s`` wall clock (the whole process
    group is killed), CPU ``ceil(timeout_s)`` s, ``memory_mb`` address space, 1 MB per written file, no
    core dumps, no child processes. An audit hook refuses sockets, ctypes, subprocesses, exec, fork,
    signals to other processes, and writing, removing or renaming anything outside the directory.
    ``__name__`` is "solution" in the child. Never raises for bad code; raises ``ValueError`` if ``tests``
    does not compile (a task bug).
    """
    try:
        compile(tests, _TESTS_FILE, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as error:
        raise ValueError(f"tests do not compile: {error}") from error
    cpu_s = max(1, math.ceil(timeout_s))
    with tempfile.TemporaryDirectory(prefix="mixserve-sandbox-") as tmp, tempfile.TemporaryFile() as output:
        work = os.path.realpath(tmp)  # the hook compares absolute paths; /tmp may itself be a symlink
        for name, source in ((_SOLUTION_FILE, code), (_TESTS_FILE, tests)):
            with open(os.path.join(work, name), "wb") as f:
                # surrogatepass: lone surrogates reach the child, whose compile() reports them as a syntax error.
                f.write(source.encode("utf-8", "surrogatepass"))
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work}
        verdict_r, verdict_w = os.pipe()
        limits = [str(cpu_s), str(memory_mb << 20), str(_FILE_SIZE_LIMIT)]
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, work, str(verdict_w), *limits],
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                pass_fds=(verdict_w,),
                start_new_session=True,  # own process group, so killpg reaches anything it started
            )
        except BaseException:
            os.close(verdict_r)
            raise
        finally:
            os.close(verdict_w)  # only the child holds the write end: EOF once it is gone
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.returncode is None:  # timeout, or we were interrupted: never leave it running
                _kill_group(proc)
            verdict = _read_verdict(verdict_r)
            os.close(verdict_r)
        reason = _classify(proc.returncode, timed_out, verdict)
        return PythonResult(passed=reason == "passed", reason=reason, output=_output_tail(output))


def run_python_tests_many(
    items: Sequence[tuple[str, str]], *, timeout_s: float = 3.0, memory_mb: int = 512, workers: int = 2
) -> list[PythonResult]:
    """:func:`run_python_tests` over ``(code, tests)`` pairs, ``workers`` subprocesses at a time, in input order."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")

    def run(item: tuple[str, str]) -> PythonResult:
        return run_python_tests(item[0], item[1], timeout_s=timeout_s, memory_mb=memory_mb)

    # Threads suffice: each one only waits on its own subprocess.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run, items))
