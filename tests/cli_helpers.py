"""Running the real CLI in a subprocess, as a shell script does."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bcpkd_cli.cli import main


def bcpkd(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "bcpkd_cli", *args], cwd=cwd, capture_output=True,
                            text=True, env=env, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"bcpkd {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def here(*args: str, cwd: Path) -> str:
    """The CLI in this process (no new interpreter: a fast reference run); its stdout."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setattr(sys, "argv", ["bcpkd", *args])
        stdout = io.StringIO()
        patch.setattr(sys, "stdout", stdout)
        main()
    return stdout.getvalue()
