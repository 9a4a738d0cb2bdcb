"""Helpers shared by the tests that drive the command line as a separate process.

* :func:`run_unprivileged`: run a program that must meet file permissions as an ordinary user does (CI runs as root,
  and root writes into read-only folders).
* :func:`run_cli`: ``python -m persam_dreambooth <command> ...`` as a subprocess (optionally with the tiny SAM
  registered as ``--sam-model tiny``, optionally unprivileged).
* :func:`run_cli_batch`: many command lines, each in its own forked process of one interpreter that imported the
  package once (a fresh ``python -m`` costs seconds of imports per case). Each case gets its own exit status, stdout,
  stderr and working folder, exactly as ``python -m persam_dreambooth`` would (same ``main``, same ``sys.exit``).
* :func:`error_lines`: stderr without argparse's usage block and INFO/DEBUG log lines: what must be one line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CliResult", "error_lines", "files_under", "run_cli", "run_cli_batch", "run_unprivileged",
           "without_root_override"]

TINY_SAM_PRELUDE = "from persam_dreambooth import testing as _tiny; _tiny.register_tiny_sam()"


def without_root_override() -> None:  # pragma: no cover - runs in the child, before exec
    """Drop root's permission overrides (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER) from the bounding set,
    so the program run next meets file modes as an ordinary user does (CI runs as root)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):  # linux/capability.h
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_unprivileged(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command that must meet file permissions as an ordinary user would (as root: without the overrides)."""
    return subprocess.run(args, capture_output=True, text=True, timeout=kwargs.pop("timeout", 300), check=False,
                          preexec_fn=without_root_override if os.geteuid() == 0 else None, **kwargs)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = env.get("PYTHONWARNINGS", "")
    return env


def run_cli(argv: list[str], *, cwd: str | os.PathLike[str] | None = None, tiny_sam: bool = False,
            unprivileged: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m persam_dreambooth *argv`` in a new process (``tiny_sam``: with ``--sam-model tiny`` registered)."""
    if tiny_sam:
        code = f"import sys; {TINY_SAM_PRELUDE}; from persam_dreambooth.cli import main; sys.exit(main())"
        args = [sys.executable, "-c", code, *argv]
    else:
        args = [sys.executable, "-m", "persam_dreambooth", *argv]
    if unprivileged:
        return run_unprivileged(args, cwd=cwd, env=_env(), timeout=timeout)
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd, env=_env())


@dataclass
class CliResult:
    """One command line's outcome."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


# The driver imports the package once, then forks one child per case: the child moves to the case's folder, points
# fds 1 and 2 at files, and runs persam_dreambooth's ``main`` as ``python -m persam_dreambooth`` does.
_DRIVER = r"""
import json, os, signal, sys, time, traceback
cases = json.load(open(sys.argv[1]))
import persam_dreambooth.cli as cli
cli.build_parser()  # import every sub-command module once, before forking
results = []
for case in cases:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(case["cwd"])
            for fd, name in ((1, case["stdout"]), (2, case["stderr"])):
                handle = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(handle, fd)
                os.close(handle)
            sys.argv = ["persam-dreambooth", *case["argv"]]
            try:
                code = cli.main(case["argv"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if exc.code is not None and not isinstance(exc.code, int):
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(code or 0))
    deadline = time.monotonic() + case["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:  # e.g. a server that started instead of refusing
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.02)
    results.append(os.waitstatus_to_exitcode(status))
print(json.dumps(results))
"""


def run_cli_batch(cases: list[tuple[list[str], Path]], *, unprivileged: bool = False, tiny_sam: bool = False,
                  timeout: float = 600, case_timeout: float = 120) -> list[CliResult]:
    """Run every ``(argv, cwd)`` command line in its own forked process of one interpreter; return the results.

    The logs of a case go to files in a hidden folder beside its ``cwd`` (not inside it, so "nothing written"
    checks on ``cwd`` stay exact). A case still running after ``case_timeout`` seconds is killed (exit code -9).
    """
    if not cases:
        return []
    spool = Path(cases[0][1]).parent / ".cli-batch"
    spool.mkdir(exist_ok=True)
    spec = []
    for index, (argv, cwd) in enumerate(cases):
        spec.append({"argv": list(argv), "cwd": str(cwd), "stdout": str(spool / f"{index}.out"),
                     "stderr": str(spool / f"{index}.err"), "timeout": case_timeout})
    (spool / "cases.json").write_text(json.dumps(spec))
    driver = (TINY_SAM_PRELUDE + "\n" if tiny_sam else "") + _DRIVER
    args = [sys.executable, "-c", driver, str(spool / "cases.json")]
    runner = run_unprivileged if unprivileged else _run
    done = runner(args, env=_env(), timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the batch driver failed ({done.returncode}): {done.stderr[-3000:]}")
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    return [CliResult(list(argv), code, Path(s["stdout"]).read_text(), Path(s["stderr"]).read_text())
            for (argv, _), code, s in zip(cases, codes, spec, strict=True)]


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=kwargs.pop("timeout", 300), check=False,
                          **kwargs)


_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|DEBUG) \S+: ")
_TQDM_LINE = re.compile(r"\d+%\|.*\| *\d+/\d+")


def error_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are not argparse's usage block, INFO/DEBUG log lines or tqdm bars (progress)."""
    lines = []
    in_usage = False
    for line in stderr.splitlines():
        if line.startswith("usage: "):
            in_usage = True
            continue
        if in_usage and line.startswith(" "):
            continue
        in_usage = False
        if not line.strip() or _LOG_LINE.match(line) or _TQDM_LINE.search(line):
            continue
        lines.append(line)
    return lines


def files_under(folder: str | os.PathLike[str]) -> list[str]:
    """Every file and folder below ``folder`` (relative paths, sorted), hidden ones included."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
