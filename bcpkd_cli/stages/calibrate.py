"""calibrate: tune the teacher's predictive on held-out data and cache its BCPs for the training split."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from bcpkd_cli import artifacts
from bcpkd_cli.calibration import ensure_cache
from bcpkd_cli.tuning import describe_tuning
from bcpkd_cli.config import Recipe
from bcpkd_cli.data import announce, brief, decoding_workers, load_dataset
from bcpkd_cli.choices import teacher_label
from bcpkd_cli.console import console, header, show_table
from bcpkd_cli.engine import join_process_group, resolve_device
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.threads import apply_threads


def run(recipe: Recipe, teacher_path: Path, force: bool = False) -> Path | None:
    """Find or build the cache for this teacher, data and settings (`force`: build it again); show the
    held-out calibration. Under torchrun the processes build the cache in shards; rank 0 returns its path (the
    others None)."""
    if recipe.out and Path(recipe.out).resolve() == Path(teacher_path).resolve().parent:
        raise BcpkdError(f"--out {recipe.out}: is the folder of {teacher_path}, whose calibrated teacher.pt would "
                         f"replace it; give another folder (or leave --out out: caches go to <teacher folder>/bcp/)")
    payload = artifacts.load_checkpoint(teacher_path, artifacts.TEACHER_FORMAT)
    device = resolve_device(recipe.device)
    apply_threads(recipe.threads, decoding_workers(recipe.data))
    place = join_process_group(device)
    data = load_dataset(recipe.data).to(device)
    if place.is_main:
        cfg = recipe.calibrate
        header("calibrate", f"{teacher_label(payload['bayes'])} {teacher_path} (prior {cfg.prior.value}, temperature "
                            f"{cfg.temperature.value}, T_t {recipe.distill.t_teacher}, views {cfg.views})", brief(data),
               device, place.size, recipe.out or Path(teacher_path).parent / "bcp")
        announce(data)
    path, built = ensure_cache(Path(teacher_path), payload, data, recipe.calibrate, recipe.distill.t_teacher,
                               device, recipe.out, recipe.evaluate.ece_bins, force)
    if not place.is_main:
        return None
    if not built:
        artifacts.load_cache(path, {})  # its rows too (ensure_cache checked the metadata)
        console.print(f"cache for this teacher, data and settings already exists: {path}")
    report = json.loads((path.parent / "report.json").read_text())
    table = Table(title=f"held-out calibration of {teacher_path}")
    table.add_column("")
    for key in report["before"]:
        table.add_column(key, justify="right")
    for when in ("before", "after"):
        table.add_row(when, *(f"{v:.4f}" for v in report[when].values()))
    show_table(table)
    tuned = describe_tuning(report)
    if tuned:
        console.print(tuned)
    return path
