"""Running the real CLI in a subprocess, as a shell script does."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bcpkd_cli.cli import main

STAGE_HEADER = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d [a-z-]+: ")  # a stage's first line: its time, command


def bcpkd(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "bcpkd_cli", *args], cwd=cwd, capture_output=True,
                            text=True, env=env, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"bcpkd {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def torchrun(*args: str, cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """The CLI under `torchrun --standalone` (gloo on the CPU, one thread per process); asserts exit code 0."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "bcpkd_cli", *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, f"torchrun bcpkd {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
    return result


def default_sigint() -> None:
    """preexec_fn of a job that a test interrupts with SIGINT: handled as in a terminal (KeyboardInterrupt), also where
    the test run was started in the background (a shell's `&` job) and its jobs would inherit SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def here(*args: str, cwd: Path) -> str:
    """The CLI in this process (no new interpreter: a fast reference run); its stdout."""
    with pytest.MonkeyPatch.context() as patch:
        stdout = _in_process(patch, args, cwd, "stdout")
        main()
    return stdout.getvalue()


def here_run(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """The CLI in this process, as `bcpkd` runs it in a new one (without an interpreter and a torch import to pay
    for): its exit code, stdout and stderr; with `check`, asserts exit code 0."""
    with pytest.MonkeyPatch.context() as patch:
        stdout = _in_process(patch, args, cwd, "stdout")
        stderr = io.StringIO()
        patch.setattr(sys, "stderr", stderr)
        try:
            main()
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code if isinstance(exit_info.code, int) else (0 if exit_info.code is None else 1)
    result = subprocess.CompletedProcess(["bcpkd", *args], code, stdout.getvalue(), stderr.getvalue())
    if check and code != 0:
        raise AssertionError(f"bcpkd {' '.join(args)} exited {code}:\n{result.stderr}")
    return result


def refused_here(*args: str, cwd: Path) -> str:
    """The CLI in this process on bad input: asserts exit code 2 and one error line on stderr (after the lines that
    describe the data, where it was read before the refusal), which it returns."""
    with pytest.MonkeyPatch.context() as patch:
        stderr = _in_process(patch, args, cwd, "stderr")
        with pytest.raises(SystemExit) as exit_info:
            main()
    lines = stderr.getvalue().splitlines(keepends=True)
    errors = [text for text in lines if text.startswith("error: ")]
    described = [text for text in lines[:-1] if text.startswith(("data: ", "train ", "inputs: ", "no test images",
                                                                 "training classes under", "predict: ", "threads: "))
                 or STAGE_HEADER.match(text)]  # (threads: said once per process, by whichever command runs first)
    assert exit_info.value.code == 2 and errors == lines[-1:] and len(described) == len(lines) - 1, stderr.getvalue()
    return lines[-1]


def failed_here(*args: str, cwd: Path, code: int = 2) -> str:
    """The CLI in this process stopped after it started work: asserts the exit code, no traceback, and that the
    last line on stderr is the one error line, which it returns."""
    with pytest.MonkeyPatch.context() as patch:
        stderr = _in_process(patch, args, cwd, "stderr")
        with pytest.raises(SystemExit) as exit_info:
            main()
    lines = stderr.getvalue().splitlines(keepends=True)
    errors = [text for text in lines if text.startswith(("error: ", "failed: "))]
    assert exit_info.value.code == code and errors == lines[-1:] and "Traceback" not in stderr.getvalue(), \
        stderr.getvalue()
    return lines[-1]


def _in_process(patch: pytest.MonkeyPatch, args: tuple[str, ...], cwd: Path, captured: str) -> io.StringIO:
    patch.chdir(cwd)
    patch.setattr(sys, "argv", ["bcpkd", *args])
    stream = io.StringIO()
    patch.setattr(sys, captured, stream)
    return stream


def run_fresh(snippets: dict[str, str], folder, without_bcpkd: bool = True) -> dict[str, str]:
    """Each snippet as written, in its own namespace, in one fresh interpreter in `folder` (where bcpkd_cli cannot be
    imported, unless not `without_bcpkd`); what each printed."""
    runner = ["import contextlib, io, json, sys", "sys.modules['bcpkd_cli'] = None" if without_bcpkd else "",
              "printed = {}", f"for name, code in {snippets!r}.items():", "    out = io.StringIO()",
              "    with contextlib.redirect_stdout(out):", "        exec(compile(code, name, 'exec'), {})",
              "    printed[name] = out.getvalue().strip()", "print(json.dumps(printed))"]
    result = subprocess.run([sys.executable, "-c", "\n".join(runner)], cwd=folder, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])
