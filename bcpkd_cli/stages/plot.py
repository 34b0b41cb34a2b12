"""plot: the figures of a run folder (`bcpkd run`'s reports) or of checkpoints (evaluated here), as PNG + CSV."""

from __future__ import annotations

import json
from pathlib import Path

from bcpkd_cli import artifacts, figures
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


def draw(entries: list[tuple[str, dict]], out: Path) -> list[Path]:
    """Every figure the reports allow, into `out`."""
    figures.pyplot()  # the extra is missing: said before any work
    first: dict[str, dict] = {}
    logs: dict[str, list[list[dict]]] = {}
    draws: dict[int, list[float]] = {}
    for name, report in entries:
        first.setdefault(name, report)
        if report["kind"] != "student":
            continue
        logs.setdefault(name, []).append(artifacts.load_checkpoint(report["checkpoint"], artifacts.STUDENT_FORMAT)["log"])
        draw_mode, kept = report["config"]["distill"].get("draw", "mean"), report["config"].get("calibrate", {})
        if kept.get("draws"):
            k = kept["draws"] if draw_mode == "mean" else 1 if draw_mode == "one" else int(draw_mode)
            draws.setdefault(k, []).append(report["metrics"]["accuracy"])
    made = [figures.reliability(list(first.items())[:12], out)]
    if logs:
        made += [figures.curves(logs, key, out) for key in ("heldout_nll", "heldout_accuracy")]
    made += [figures.noise_vs_alpha([r for _, r in entries if r.get("targets") == "true"], out),
             figures.accuracy_vs_draws(draws, out)]
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
    made = draw(entries, Path(out))
    console.print(f"{len(made)} figures (PNG, with their data as CSV) in {out}")
    return made
