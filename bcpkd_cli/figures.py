"""Figures for a paper: PNG files drawn with matplotlib (the optional `plot` extra), each with its data beside it
as CSV. Inputs are evaluate reports (see stages/evaluate.py) and the held-out curves students and teachers log.

Every figure's title names the checkpoints (files or run folders) it shows.

- reliability.png: reliability diagrams (accuracy against confidence per bin) of teachers and students, each with
  the examples per bin underneath; bins with too few examples to read an accuracy from (fewer than 10, or than
  1% of the examples when that is more: `min_bin_count`) are grey;
- per-class.png: test accuracy per class (reports carry it);
- confusion.png: confusion matrices, counts in the cells (reports carry them up to 20 classes);
- curves-<metric>.png: held-out NLL and accuracy of students (and, in a panel beside them, teachers) against the
  step, mean and band (±1 std) over seeds, from the second logged point on (the first, an untrained network,
  would dwarf the convergence noise; the CSV keeps it), NLL on a log axis;
- noise-vs-alpha.png: gradient noise against Dirichlet(alpha P) targets, measured at the exact-BCP student's
  weights, as excess over exact BCPs relative to one-hot's, beside the theory 1 / (alpha + 1);
- accuracy-vs-draws.png: student accuracy against the number of cached Monte Carlo draws it averaged.
"""

from __future__ import annotations

import csv
import math
import statistics
import textwrap
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
    """The figure as PNG and its data as CSV of the same name (both written atomically); the figure is closed."""
    import matplotlib.pyplot as plt

    try:
        artifacts.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)

    def write_csv(p: Path) -> None:
        with open(p, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)

    artifacts.atomic_write(path.with_suffix(".csv"), write_csv)
    return path


MIN_BIN_EXAMPLES = 10  # a reliability bin with fewer examples than this (or than MIN_BIN_SHARE of them) is grey
MIN_BIN_SHARE = 0.01
MAX_PANELS = 12  # models drawn in the figures with one panel per model (the first ones)
MAX_BAR_CLASSES = 100  # per-class accuracy is drawn up to this many classes


def min_bin_count(n_examples: int) -> int:
    """The fewest examples a reliability bin needs for its accuracy to be drawn as a measurement: 10, or 1% of the
    `n_examples` when that is more."""
    return max(MIN_BIN_EXAMPLES, math.ceil(MIN_BIN_SHARE * n_examples))


def sources(paths: list[str], most: int = 4) -> str:
    """The files or run folders a figure shows, for its title: the first `most` of them, and how many more."""
    shown = ", ".join(str(p) for p in paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


def _title(fig, what: str, source: str, caption: str = "") -> None:
    """The figure's title: what it shows, of which checkpoints; `caption`: how to read it, under the panels."""
    fig.suptitle(textwrap.fill(f"{what} of {source}" if source else what, 110), fontsize=8)
    if caption:
        fig.supxlabel(textwrap.fill(caption, 130), fontsize=7)


def _short(path: str, width: int = 56) -> str:
    return path if len(path) <= width else "…" + path[-(width - 1):]


def panel_name(name: str, report: dict) -> str:
    """A panel's title: the model's name (its label where the name is its file) and its file."""
    first = report.get("label", report["kind"]) if name == report["checkpoint"] else name
    return textwrap.fill(first, 60) + "\n" + _short(report["checkpoint"])


def _panels(plt, n: int, width: float, height: float, cols: int = 4, ratios: tuple[float, ...] = (1.0,)):
    """A grid of n panels (each `len(ratios)` axes tall, stacked with those height ratios): the figure and, per
    panel, its axes; axes of unused cells are switched off."""
    cols = min(n, cols)
    n_rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(n_rows * len(ratios), cols, figsize=(width * cols, height * n_rows), squeeze=False,
                             gridspec_kw={"height_ratios": list(ratios) * n_rows}, constrained_layout=True)
    panels = [[axes[r * len(ratios) + k][c] for k in range(len(ratios))] for r in range(n_rows) for c in range(cols)]
    for unused in panels[n:]:
        for ax in unused:
            ax.axis("off")
    return fig, panels[:n]


def reliability(named_reports: list[tuple[str, dict]], out: Path, source: str = "") -> Path:
    """One panel per report: per-bin accuracy against mean confidence, the diagonal of perfect calibration, and
    the examples per bin underneath (log scale); bins with fewer than `min_bin_count` examples are grey, with
    their count written beside them. The CSV has every bin: its edges, mean confidence, accuracy, count, the
    panel's min_count and whether it is greyed (1: fewer than min_count examples, empty bins too)."""
    plt = pyplot()
    fig, panels = _panels(plt, len(named_reports), 3.4, 4.6, ratios=(3.0, 1.0))
    rows = []
    for (ax, counts_ax), (name, report) in zip(panels, named_reports):
        bins = report["reliability"]
        n_bins, least = len(bins["count"]), min_bin_count(sum(bins["count"]))
        greyed = [k < least for k in bins["count"]]
        kept = [(c, a) for c, a, g in zip(bins["confidence"], bins["accuracy"], greyed) if c is not None and not g]
        thin = [(c, a, k) for c, a, k, g in zip(bins["confidence"], bins["accuracy"], bins["count"], greyed)
                if c is not None and g]
        ax.plot([0, 1], [0, 1], color="0.6", linewidth=1)
        ax.plot([c for c, _ in kept], [a for _, a in kept], marker="o", markersize=3, label=f"≥ {least} examples")
        if thin:
            ax.plot([c for c, _, _ in thin], [a for _, a, _ in thin], linestyle="none", marker="o", markersize=3,
                    markerfacecolor="none", color="0.65", label=f"< {least} examples (too few)")
            for c, a, k in thin:
                ax.annotate(str(k), (c, a), textcoords="offset points", xytext=(3, 3), fontsize=5, color="0.5")
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{panel_name(name, report)}\nECE {report['metrics']['ece']:.3f}, "
                     f"{sum(bins['count'])} examples", fontsize=6)
        ax.set_ylabel("accuracy", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5, loc="upper left")
        edges = [b / n_bins for b in range(n_bins)]
        counts_ax.bar(edges, bins["count"], width=1 / n_bins, align="edge",
                      color=["0.75" if g else "C0" for g in greyed], edgecolor="white", linewidth=0.3)
        counts_ax.axhline(least, color="0.5", linewidth=0.6, linestyle="--")
        counts_ax.set_yscale("log")
        counts_ax.set_ylim(bottom=0.5)
        counts_ax.set_xlim(0, 1)
        counts_ax.set_xlabel("confidence", fontsize=7)
        counts_ax.set_ylabel("examples", fontsize=6)
        counts_ax.tick_params(labelsize=6)
        rows += [[name, report["checkpoint"], b / n_bins, (b + 1) / n_bins, c, a, k, least, int(g)]
                 for b, (c, a, k, g) in enumerate(zip(bins["confidence"], bins["accuracy"], bins["count"], greyed))]
    _title(fig, "reliability", source, f"grey: bins with fewer than max({MIN_BIN_EXAMPLES}, {MIN_BIN_SHARE:.0%} of "
                                        f"the examples) examples, too few to read an accuracy from (their count "
                                        f"beside them); bars under each panel: examples per bin (log scale), "
                                        f"dashed: that minimum")
    return _save(fig, out / "reliability.png", ["model", "checkpoint", "bin_low", "bin_high", "confidence", "accuracy",
                                                "count", "min_count", "greyed"], rows)


def per_class(named_reports: list[tuple[str, dict]], out: Path, source: str = "") -> Path | None:
    """One panel per report with `per_class` (up to MAX_BAR_CLASSES classes): test accuracy of each class, its test
    count beside its name (no bar where it has none)."""
    named_reports = [(n, r) for n, r in named_reports if r.get("per_class") and len(r["per_class"]) <= MAX_BAR_CLASSES]
    if not named_reports:
        return None
    plt = pyplot()
    n_classes = max(len(r["per_class"]) for _, r in named_reports)
    fig, panels = _panels(plt, len(named_reports), 3.4, 1.2 + 0.18 * n_classes)
    rows = []
    for (ax,), (name, report) in zip(panels, named_reports):
        entries = report["per_class"]
        ax.barh(range(len(entries)), [e["accuracy"] or 0.0 for e in entries], color="C0")
        ax.set_yticks(range(len(entries)), [f"{e['class']} ({e['n']})" for e in entries], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("test accuracy", fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
        ax.set_title(f"{panel_name(name, report)}\naccuracy {report['metrics']['accuracy']:.3f}", fontsize=6)
        rows += [[name, report["checkpoint"], e["class"], e["n"], e["accuracy"]] for e in entries]
    _title(fig, "test accuracy per class", source, "in brackets: the test examples of the class")
    return _save(fig, out / "per-class.png", ["model", "checkpoint", "class", "n", "accuracy"], rows)


def confusion(named_reports: list[tuple[str, dict]], out: Path, source: str = "") -> Path | None:
    """One panel per report with `confusion`: counts of (true class, predicted class) in the cells, shaded by the
    share of the true class's examples."""
    named_reports = [(n, r) for n, r in named_reports if r.get("confusion")]
    if not named_reports:
        return None
    plt = pyplot()
    n_classes = max(len(r["confusion"]) for _, r in named_reports)
    side = max(3.4, 1.4 + 0.32 * n_classes)
    fig, panels = _panels(plt, len(named_reports), side, side + 0.4, cols=3)
    rows = []
    for (ax,), (name, report) in zip(panels, named_reports):
        counts = report["confusion"]
        classes = [e["class"] for e in report["per_class"]] if report.get("per_class") else \
            [str(c) for c in range(len(counts))]
        shares = [[v / max(sum(row), 1) for v in row] for row in counts]
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for i, row in enumerate(counts):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=5 if n_classes > 10 else 7,
                        color="white" if shares[i][j] > 0.6 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=6)
        ax.set_yticks(range(len(classes)), classes, fontsize=6)
        ax.set_xlabel("predicted class", fontsize=7)
        ax.set_ylabel("true class", fontsize=7)
        ax.set_title(panel_name(name, report), fontsize=6)
        rows += [[name, report["checkpoint"], classes[i], classes[j], v]
                 for i, row in enumerate(counts) for j, v in enumerate(row)]
    _title(fig, "confusion matrices", source, "cells: test examples of the true class (row) predicted as the "
                                              "class of the column; shade: their share of the true class")
    return _save(fig, out / "confusion.png", ["model", "checkpoint", "true", "predicted", "count"], rows)


def curves(groups: dict[str, list[list[dict]]], key: str, out: Path, source: str = "",
           teachers: frozenset[str] = frozenset()) -> Path:
    """Held-out `key` (heldout_nll or heldout_accuracy) against the step: per group (a student over its seeds, a
    teacher, a phase of one), mean and ±1 std over its logs (the steps every log shares). The groups named in
    `teachers` go in a panel of their own beside the students' (teachers train for other steps, and an over-fitting
    teacher's NLL would flatten the students' convergence noise). Drawn from the second logged step on where there
    are three or more (the first, an untrained network, would set the axis), NLL on a log axis; the CSV has every
    step (`drawn` 0 for the one left out)."""
    plt = pyplot()
    panels = [(title, {name: logs for name, logs in groups.items() if (name in teachers) == of_teachers})
              for title, of_teachers in (("students", False), ("teachers", True))]
    panels = [(title, members) for title, members in panels if members]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False, constrained_layout=True)
    what = key.replace("heldout_", "held-out ").replace("nll", "NLL")
    rows = []
    for ax, (title, members) in zip(axes[0], panels):
        skipped = set()
        for name, logs in members.items():
            steps = sorted(set.intersection(*({e["step"] for e in log if key in e} for log in logs)))
            if not steps:
                continue
            series = [[{e["step"]: e[key] for e in log}[s] for s in steps] for log in logs]
            mean = [statistics.fmean(v) for v in zip(*series)]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*series)]
            start = 1 if len(steps) >= 3 else 0
            skipped.update(steps[:start])
            ax.plot(steps[start:], mean[start:], label=f"{name} ({len(logs)} seed{'s' if len(logs) > 1 else ''})",
                    linewidth=1)
            ax.fill_between(steps[start:], [m - s for m, s in zip(mean[start:], std[start:])],
                            [m + s for m, s in zip(mean[start:], std[start:])], alpha=0.2)
            rows += [[name, s, m, d, len(logs), int(i >= start)] for i, (s, m, d) in enumerate(zip(steps, mean, std))]
        if key == "heldout_nll":
            from matplotlib.ticker import FormatStrFormatter

            ax.set_yscale("log")
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis(FormatStrFormatter("%.3g"))
        left_out = f" (from the second logged point; step {', '.join(map(str, sorted(skipped)))} is in the CSV)" \
            if skipped else ""
        ax.set_xlabel(f"step{left_out}", fontsize=8)
        ax.set_ylabel(what + (" (log scale)" if key == "heldout_nll" else ""))
        ax.tick_params(which="both", labelsize=7)
        ax.legend(fontsize=7)
        if len(panels) > 1:
            ax.set_title(title, fontsize=8)
    _title(fig, what, source)
    return _save(fig, out / f"curves-{key.removeprefix('heldout_')}.png",
                 ["model", "step", "mean", "std", "seeds", "drawn"], rows)


def noise_vs_alpha(reports: list[dict], out: Path, source: str = "") -> Path | None:
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
    _title(fig, "gradient noise against alpha", source)
    return _save(fig, out / "noise-vs-alpha.png", ["alpha", "measured_mean", "measured_std", "theory", "seeds"], rows)


def accuracy_vs_draws(points: dict[int, list[float]], out: Path, source: str = "") -> Path | None:
    """Student test accuracy (mean ± std over seeds) against the number of cached draws it averaged."""
    if len(points) < 2:
        return None
    plt = pyplot()
    rows = [[k, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)] for k, v in sorted(points.items())]
    fig, ax = plt.subplots(figsize=(5, 3.6), constrained_layout=True)
    ax.errorbar([r[0] for r in rows], [r[1] for r in rows], yerr=[r[2] for r in rows], fmt="o-")
    ax.set_xlabel("Monte Carlo draws averaged per target")
    ax.set_ylabel("student test accuracy")
    _title(fig, "accuracy against draws", source)
    return _save(fig, out / "accuracy-vs-draws.png", ["draws", "accuracy_mean", "accuracy_std", "seeds"], rows)
