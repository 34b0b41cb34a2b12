"""plot: the figures of a run folder (`bcpkd run`'s reports) or of checkpoints (evaluated here), as PNG + CSV."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bcpkd_cli import artifacts, figures
from bcpkd_cli.choices import teacher_label
from bcpkd_cli.console import console
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.stages import evaluate

REPORTS = "reports.json"  # what `bcpkd run` leaves in its folder for plotting: [{"name", "seed", "report"}]


def _entries(paths: list[Path], tree: dict) -> list[tuple[str, dict]]:
    """(name, report) of every model: a run folder's saved reports (students named as in its recipe), or each
    checkpoint evaluated now (named by its path)."""
    entries = []
    for path in paths:
        if path.is_dir() and (path / REPORTS).is_file():
            entries += [(e["name"], e["report"]) for e in json.loads((path / REPORTS).read_text())]
        else:
            checkpoint = artifacts.resolve_checkpoint(path, evaluate.CHECKPOINT_FORMATS, "plot")
            entries.append((str(checkpoint), evaluate.evaluate_one(checkpoint, tree)))
    return entries


def source_of(entries: list[tuple[str, dict]]) -> str:
    """What the figures show, for their titles, when not told: the folder all checkpoints lie under (a run
    folder), else the checkpoint files."""
    files = list(dict.fromkeys(report["checkpoint"] for _, report in entries))
    try:
        common = os.path.commonpath(files) if len(files) > 1 else ""
    except ValueError:  # absolute and relative paths
        common = ""
    return f"{common} ({len(files)} checkpoints)" if common not in ("", ".", "/") else figures.sources(files)


def teacher_curves(name: str, report: dict) -> dict[str, list[dict]]:
    """A teacher's held-out curves as the checkpoint's `log` keeps them, by curve name: its name in the run (a
    checkpoint given as a file: `laplace teacher runs/t/teacher.pt`), and the phase where the log has several
    (ensemble members, MCMI fine-tuning); none for a calibrated teacher (calibrate trains nothing) or a teacher
    saved before teachers logged."""
    log = artifacts.load_checkpoint(report["checkpoint"], artifacts.TEACHER_FORMAT, mmap=True).get("log", [])
    if name == report["checkpoint"]:
        name = f"{teacher_label(report['teacher_kind'])} {name}"
    curves: dict[str, list[dict]] = {}
    for entry in log:
        curves.setdefault(f"{name} ({entry['phase']})" if "phase" in entry else name, []).append(entry)
    return curves


def draw(entries: list[tuple[str, dict]], out: Path, source: str = "") -> list[Path]:
    """Every figure the reports allow, into `out`; `source` (the run folders or checkpoints given) goes into the
    figures' titles (default: `source_of` the reports). Checkpoints are named relative to the working folder where
    they lie under it (calibrated teachers' paths, beside their caches, are absolute)."""
    figures.pyplot()  # the extra is missing: said before any work
    entries = [(evaluate.shown(name) if name == report["checkpoint"] else name,
                {**report, "checkpoint": evaluate.shown(report["checkpoint"])}) for name, report in entries]
    source = source or source_of(entries)
    first: dict[str, dict] = {}
    logs: dict[str, list[list[dict]]] = {}
    teachers: dict[str, list[dict]] = {}  # curve -> a teacher's log
    draws: dict[int, list[float]] = {}
    for name, report in entries:
        first.setdefault(name, report)
        if report["kind"] == "teacher":
            for curve, log in teacher_curves(name, report).items():
                same = next((drawn for drawn, known in teachers.items() if known == log), None)
                if same is None:
                    teachers[curve] = log
                else:  # a teacher around a base has the base's network and log: one curve, named after both
                    teachers[f"{same}, {curve}"] = teachers.pop(same)
        if report["kind"] != "student":
            continue
        logs.setdefault(name, []).append(artifacts.load_checkpoint(report["checkpoint"], artifacts.STUDENT_FORMAT)["log"])
        draw_mode, kept = report["config"]["distill"].get("draw", "mean"), report["config"].get("calibrate", {})
        if kept.get("draws"):
            k = kept["draws"] if draw_mode == "mean" else 1 if draw_mode == "one" else int(draw_mode)
            draws.setdefault(k, []).append(report["metrics"]["accuracy"])
    models = list(first.items())[:figures.MAX_PANELS]
    made = [figures.reliability(models, out, source), figures.per_class(models, out, source),
            figures.confusion(models, out, source)]
    if logs or teachers:
        made += [figures.curves({**logs, **{curve: [log] for curve, log in teachers.items()}}, key, out, source,
                                frozenset(teachers)) for key in ("heldout_nll", "heldout_accuracy")]
    made += [figures.noise_vs_alpha([r for _, r in entries if r.get("targets") == "true"], out, source),
             figures.accuracy_vs_draws(draws, out, source)]
    return [m for m in made if m is not None]


def run(paths: list[Path], out: str, tree: dict, force: bool = False) -> list[Path]:
    """Draw the figures of `paths` into `out`; figures already there are replaced only with `force`."""
    if not out:
        raise BcpkdError("plot: give --out DIR, the folder the figures go to")
    drawn = sorted(Path(out).glob("*.png")) if Path(out).is_dir() else []
    if drawn and not force:
        raise BcpkdError(f"{drawn[0]}: figures are there already; give another --out, or add --force to replace them")
    figures.pyplot()  # a missing extra is said before anything is evaluated
    entries = _entries(paths, tree)
    if not entries:
        raise BcpkdError("plot: nothing to draw; give run folders or teacher.pt / student.pt files")
    made = draw(entries, Path(out), figures.sources([str(p) for p in paths]))
    console.print(f"{len(made)} figures (PNG, with their data as CSV) in {out}")
    return made
