"""`--resume`: training states saved at epoch ends, and the settings a resumed run must repeat."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bcpkd_cli import artifacts
from bcpkd_cli.config import Recipe, drop_other_kinds, recipe_record
from bcpkd_cli.console import line
from bcpkd_cli.errors import BcpkdError

TEACHER_SECTIONS = ("data", "teacher", "precision", "compile")  # what decides a teacher's training
STUDENT_SECTIONS = ("data", "distill", "calibrate", "precision", "compile")  # a student's, and its targets'

# Paths, whose files are identified by their hashes or fingerprints instead (a folder spelled another
# way is the same run), and settings that do not change what is trained.
BY_CONTENT = ("teacher.base", "teacher.ensemble.checkpoints", "data.root", "data.download", "calibrate.batch_size",
              "data.skip_unreadable", "distill.grad_noise_examples")
DATA_KEYS = ("data_fingerprint", "targets")  # settings that change with the files of the data (and its cache)


@dataclass(frozen=True)
class Resume:
    """Resumable training: `save(state)` keeps the loop's state at the end of every epoch (rank 0);
    `start`, a state saved by an interrupted run, continues it from there with the same result as an
    uninterrupted run (weights, optimiser and schedule, batch-order and torch RNG, logs)."""

    save: Callable[[dict], None]
    start: dict | None = None


@dataclass
class Progress:
    """How far the command under way got, for the message of a Ctrl-C or a preemption (cli.main): `out`, the
    folder its --out names (given, or generated), and the last epoch end a training loop saved (`epoch` of
    `epochs`, 0: none yet) in `folder` (out itself, or under `bcpkd run` (`whole_run`) the folder of the
    teacher or student in training), of training phase `phase` (a teacher's: member2, mcmi, ...)."""

    out: Path
    whole_run: bool = False
    folder: Path | None = None
    epoch: int = 0
    epochs: int = 0
    phase: str = ""

    @property
    def resumable(self) -> bool:
        """Whether `--out out --resume` continues the command: a stage needs a saved state; `bcpkd run` reuses
        what it finished and continues what was saved."""
        return self.out.is_dir() if self.whole_run else has_saved_state(self.out)


progress: Progress | None = None  # this process's command under way (set by track, updated by every save)


def begin_command() -> None:
    """A new command in this process: nothing claimed or saved yet."""
    global progress
    progress = None


def track(folder: Path, whole_run: bool = False) -> None:
    """A command claimed `folder`: a training stage its output folder, `bcpkd run` (`whole_run`) its own, below
    which its stages then claim theirs."""
    global progress
    if progress is not None and progress.whole_run and not whole_run:
        progress.folder, progress.epoch, progress.epochs, progress.phase = folder, 0, 0, ""
    else:
        progress = Progress(folder, whole_run, None if whole_run else folder)


def _saved(path: Path, state: dict) -> None:
    """The training state of `path` holds `state` (saved now, or found by --resume)."""
    if progress is not None:
        progress.folder, progress.epoch, progress.epochs = path.parent, state["epoch"], state.get("epochs", 0)
        progress.phase = path.stem.removeprefix("train-state").lstrip("-")  # train-state-PHASE.pt


def settings_of(recipe: Recipe | dict, sections: tuple[str, ...], without: tuple[str, ...] = BY_CONTENT) -> dict:
    """The recipe sections that decide a stage's training (not where it writes, its device or what it
    evaluates), from a recipe or the plain config an artifact stores, less the dotted keys `without`."""
    plain = recipe if isinstance(recipe, dict) else recipe_record(recipe, sections)
    kept = {k: copy.deepcopy(plain.get(k)) for k in sections}
    if isinstance(kept.get("teacher"), dict):  # artifacts stored before configs dropped the other kinds' settings
        drop_other_kinds(kept["teacher"])
    for section in ("teacher", "distill"):  # configs stored before normalize's choices had names: true, false
        if isinstance(kept.get(section), dict) and isinstance(kept[section].get("normalize"), bool):
            kept[section]["normalize"] = "data" if kept[section]["normalize"] else "none"
    for dotted in without:
        *parents, last = dotted.split(".")
        node = kept
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return kept


def require_saved_state(folder: Path) -> None:
    """--resume needs a folder that an interrupted run left its state in."""
    if not has_saved_state(folder):
        raise BcpkdError(f"--resume: {folder} holds no train-state*.pt of an interrupted run; give the --out "
                         f"folder of that run, or run without --resume")


def claim_folder(folder: Path, artifacts_made: list[Path], resume: bool, force: bool) -> None:
    """Before any work: refuse to replace a finished artifact, or to restart an interrupted run in `folder`
    silently; `force` replaces both (the interrupted run's states are deleted now, so that a later
    --resume cannot mix them with the new run's)."""
    done = [path for path in artifacts_made if path.is_file()]
    if done and not force:
        again = "; --resume continues only an unfinished run" if resume else ""
        raise BcpkdError(f"{done[0]}: a finished run is there already; give another --out, or add --force to "
                         f"replace it{again}")
    if has_saved_state(folder) and not resume:
        if not force:
            raise BcpkdError(f"--out {folder}: holds an interrupted run (train-state*.pt, no finished artifact); "
                             f"add --resume to continue it, or --force to start afresh")
        finish(folder)
    track(folder)


def resumable(path: Path, settings: dict, resume: bool, files_left_out: bool = False) -> Resume:
    """Save the loop's state to `path` at every epoch end (the loop saves on rank 0 only); with `resume`,
    continue from it if it exists. `files_left_out` (data.skip_unreadable): the data may have lost files since
    (unreadable, or gone mid-run); the run goes on with those that remain, and says so."""
    start = None
    if resume and path.is_file():
        start, changed = artifacts.load_training_state(path, settings, DATA_KEYS if files_left_out else ())
        if changed:
            line(f"warning: the data changed since {path} was saved (data.skip_unreadable: files left out); "
                 f"continuing on the files that remain")
        _saved(path, start)

    def save(state: dict) -> None:
        artifacts.save_training_state(path, state, settings)
        _saved(path, state)

    return Resume(save, start)


def finished_artifact(path: Path, expected_format: str, recipe: Recipe, sections: tuple[str, ...],
                      without: tuple[str, ...] = ()) -> dict | None:
    """For `bcpkd run --resume`: the payload of an artifact an earlier run finished at `path` (None if
    there is none); one made with other settings in `sections` (less the dotted keys `without`) is refused."""
    if not path.is_file():
        return None
    payload = artifacts.load_checkpoint(path, expected_format)
    sections = tuple(s for s in sections if s in payload["config"])  # it stores the sections that made it
    differ = artifacts.differing_keys(settings_of(payload["config"], sections, without),
                                      settings_of(recipe, sections, without))
    if differ:
        raise BcpkdError(f"--resume: {path} was made with other settings ({', '.join(differ[:6])}); resume with "
                         f"the recipe of that run, or start afresh in another --out")
    return payload


def has_saved_state(folder: Path) -> bool:
    return any(folder.glob("train-state*.pt"))


def finish(folder: Path) -> None:
    """The run's artifacts are written: its training states are no longer needed."""
    for path in folder.glob("train-state*.pt"):
        path.unlink(missing_ok=True)
    if progress is not None and progress.folder == folder:
        progress.folder, progress.epoch, progress.epochs, progress.phase = None, 0, 0, ""
