"""Figures for a paper: PNG files drawn with matplotlib (the optional `plot` extra), each with its data beside it
as CSV. Inputs are evaluate reports (see stages/evaluate.py) and students' logged held-out curves.

- reliability.png: reliability diagrams (accuracy against confidence per bin) of teachers and students;
- curves-<metric>.png: held-out NLL and accuracy of several students against the step, mean and band (±1 std)
  over seeds;
- noise-vs-alpha.png: gradient noise against Dirichlet(alpha P) targets, measured at the exact-BCP student's
  weights, as excess over exact BCPs relative to one-hot's, beside the theory 1 / (alpha + 1);
- accuracy-vs-draws.png: student accuracy against the number of cached Monte Carlo draws it averaged.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from bcpkd_cli import artifacts
from bcpkd_cli.errors import BcpkdError


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or a one-line error naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise BcpkdError("figures need matplotlib: pip install -e '.[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, header: list[str], rows: list[list]) -> Path:
    """The figure as PNG and its data as CSV of the same name (both written atomically)."""
    artifacts.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))

    def write_csv(p: Path) -> None:
        with open(p, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)

    artifacts.atomic_write(path.with_suffix(".csv"), write_csv)
    return path


def reliability(named_reports: list[tuple[str, dict]], out: Path) -> Path:
    """One panel per report: per-bin accuracy against mean confidence, and the diagonal of perfect calibration."""
    plt = pyplot()
    n = len(named_reports)
    cols = min(n, 4)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.4 * cols, 3.4 * ((n + cols - 1) // cols)),
                             squeeze=False, constrained_layout=True)
    rows = []
    for ax, (name, report) in zip(axes.flat, named_reports):
        bins = report["reliability"]
        points = [(c, a) for c, a in zip(bins["confidence"], bins["accuracy"]) if c is not None]
        ax.plot([0, 1], [0, 1], color="0.6", linewidth=1)
        ax.plot([c for c, _ in points], [a for _, a in points], marker="o", markersize=3)
        ax.set_title(f"{name}\nECE {report['metrics']['ece']:.3f}", fontsize=7)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        rows += [[name, c, a, k] for c, a, k in zip(bins["confidence"], bins["accuracy"], bins["count"])]
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return _save(fig, out / "reliability.png", ["model", "confidence", "accuracy", "count"], rows)


def curves(groups: dict[str, list[list[dict]]], key: str, out: Path) -> Path:
    """Held-out `key` (heldout_nll or heldout_accuracy) against the step: per group, mean and ±1 std over its
    seeds' logs (the steps every log shares)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    rows = []
    for name, logs in groups.items():
        steps = sorted(set.intersection(*({e["step"] for e in log if key in e} for log in logs)))
        if not steps:
            continue
        series = [[{e["step"]: e[key] for e in log}[s] for s in steps] for log in logs]
        mean = [statistics.fmean(v) for v in zip(*series)]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*series)]
        ax.plot(steps, mean, label=f"{name} ({len(logs)} seed{'s' if len(logs) > 1 else ''})", linewidth=1)
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        rows += [[name, s, m, d, len(logs)] for s, m, d in zip(steps, mean, std)]
    ax.set_xlabel("step")
    ax.set_ylabel(key.replace("heldout_", "held-out "))
    ax.legend(fontsize=7)
    return _save(fig, out / f"curves-{key.removeprefix('heldout_')}.png", ["student", "step", "mean", "std", "seeds"],
                 rows)


def noise_vs_alpha(reports: list[dict], out: Path) -> Path | None:
    """From exact-BCP students evaluated with grad_targets onehot, true and noisy:ALPHA: the excess gradient noise
    of Dirichlet(alpha P) targets over exact BCPs, relative to one-hot's, against alpha, with 1 / (alpha + 1)."""
    alphas = sorted({float(k.split(":")[1]) for r in reports for k in r["metrics"] if k.startswith("grad_noise_noisy:")})
    usable = [r["metrics"] for r in reports if {"grad_noise_onehot", "grad_noise_true"} <= set(r["metrics"])]
    if not alphas or not usable:
        return None
    plt = pyplot()
    rows = []
    for alpha in alphas:
        key = next(k for k in usable[0] if k.startswith("grad_noise_noisy:") and float(k.split(":")[1]) == alpha)
        ratios = [(m[key] - m["grad_noise_true"]) / (m["grad_noise_onehot"] - m["grad_noise_true"]) for m in usable]
        rows.append([alpha, statistics.fmean(ratios), statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
                     1.0 / (alpha + 1.0), len(ratios)])
    fig, ax = plt.subplots(figsize=(5, 3.6), constrained_layout=True)
    grid = [min(alphas) * (max(alphas) / min(alphas)) ** (i / 100) for i in range(101)]
    ax.plot(grid, [1 / (a + 1) for a in grid], color="0.5", label="theory 1 / (alpha + 1)")
    ax.errorbar([r[0] for r in rows], [r[1] for r in rows], yerr=[r[2] for r in rows], fmt="o", label="measured")
    ax.set_xscale("log")
    ax.set_xlabel("Dirichlet concentration alpha")
    ax.set_ylabel("excess gradient noise / one-hot's")
    ax.legend(fontsize=8)
    return _save(fig, out / "noise-vs-alpha.png", ["alpha", "measured_mean", "measured_std", "theory", "seeds"], rows)


def accuracy_vs_draws(points: dict[int, list[float]], out: Path) -> Path | None:
    """Student test accuracy (mean ± std over seeds) against the number of cached draws it averaged."""
    if len(points) < 2:
        return None
    plt = pyplot()
    rows = [[k, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)] for k, v in sorted(points.items())]
    fig, ax = plt.subplots(figsize=(5, 3.6), constrained_layout=True)
    ax.errorbar([r[0] for r in rows], [r[1] for r in rows], yerr=[r[2] for r in rows], fmt="o-")
    ax.set_xlabel("Monte Carlo draws averaged per target")
    ax.set_ylabel("student test accuracy")
    return _save(fig, out / "accuracy-vs-draws.png", ["draws", "accuracy_mean", "accuracy_std", "seeds"], rows)
