"""`--resume`: training states saved at epoch ends, and the settings a resumed run must repeat."""

from __future__ import annotations

from pathlib import Path

from bcpkd_cli import artifacts
from bcpkd_cli.config import Recipe, to_plain
from bcpkd_cli.engine import Resume, console, world
from bcpkd_cli.errors import BcpkdError

_FREE = ("out", "device", "evaluate", "experiment")  # may change between the interrupted and the resumed run


def settings_of(recipe: Recipe) -> dict:
    """What decides a run's training (all but where it writes, which device, what it evaluates)."""
    return {k: v for k, v in to_plain(recipe).items() if k not in _FREE}


def require_saved_state(folder: Path) -> None:
    """--resume needs a folder that an interrupted run left its state in."""
    if not any(folder.glob("train-state*.pt")):
        raise BcpkdError(f"--resume: {folder} holds no train-state*.pt of an interrupted run; give the --out "
                         f"folder of that run, or run without --resume")


def resumable(path: Path, settings: dict, resume: bool) -> Resume:
    """Save the loop's state to `path` at every epoch end (rank 0); with `resume`, continue from it if it exists."""
    start = artifacts.load_training_state(path, settings) if resume and path.is_file() else None
    if not resume and path.is_file():
        console.print(f"[yellow]note:[/] {path.parent} holds an interrupted run; it starts afresh "
                      f"(add --resume to continue it)")

    def save(state: dict) -> None:
        if world().is_main:
            artifacts.save_training_state(path, state, settings)

    return Resume(save, start)


def finish(folder: Path) -> None:
    """The run's artifacts are written: its training states are no longer needed."""
    for path in folder.glob("train-state*.pt"):
        path.unlink(missing_ok=True)
