"""Tuning a teacher's predictive on held-out data (Laplace's prior precision, a temperature) and saying what it
did: the report, its one-line summary, and the note when a posterior adds nothing to the network."""

from __future__ import annotations

import torch

from bcpkd_cli import metrics
from bcpkd_cli.choices import TemperatureFit
from bcpkd_cli.config import CalibrateConfig
from bcpkd_cli.console import console
from bcpkd_cli.data import Dataset
from bcpkd_cli.models import predict_logits
from bcpkd_cli.teachers import Teacher
from bcpkd_cli.teachers.temperature import fit_temperature


def heldout_report(teacher: Teacher, data: Dataset, n_bins: int) -> dict[str, float]:
    held = data.heldout
    if len(held) == 0:
        return {}
    probs = teacher.predict_probs(held.inputs, torch.arange(len(held)))
    return metrics.classification_report(probs, held.labels, held.true_bcp, n_bins)


def calibrate(teacher: Teacher, data: Dataset, cfg: CalibrateConfig, n_bins: int = 15) -> dict:
    """Tune the kind's own settings (Laplace: the prior precision) and/or a temperature (any teacher) on
    held-out data, in place."""
    held = data.heldout
    report: dict = {"heldout_examples": len(held), "before": heldout_report(teacher, data, n_bins)}
    report.update(teacher.tune(cfg, held))
    if "prior_precision" in report:
        note = no_posterior_note(report, network_distance(teacher, held))
        if note:
            console.print(f"[yellow]note:[/] {note}")
            report["no_posterior"] = note
    if cfg.temperature == TemperatureFit.fit:
        teacher.calibration_temperature = 1.0
        teacher.calibration_temperature = fit_temperature(
            teacher.predictive_at(held.inputs, torch.arange(len(held))), held.labels)
        report["temperature"] = teacher.calibration_temperature
    report["after"] = heldout_report(teacher, data, n_bins)
    console.print(calibration_line(report))
    return report


def calibration_line(report: dict) -> str:
    """What calibration chose and did, in one line: `calibrated: prior precision 15.8; held-out NLL 0.4198 -> 0.4195,
    ECE 0.0523 -> 0.0491 (200 examples)`, or that there was nothing to tune."""
    chosen = [f"{name} {report[key]:.4g}" for key, name in (("prior_precision", "prior precision"),
                                                             ("temperature", "temperature")) if key in report]
    if report.get("prior_kept"):
        chosen[0] += " (the teacher's own: no grid point lowered held-out NLL)"
    before, after = report["before"], report["after"]
    change = "; ".join(f"held-out {m.upper()} {before[m]:.4f} -> {after[m]:.4f}" for m in ("nll", "ece")
                       if m in before) if before else "no held-out examples"
    if not chosen:
        return f"calibrated: nothing to tune for this teacher with these settings ({change})"
    return f"calibrated: {', '.join(chosen)}; {change} ({report['heldout_examples']} examples)"


NO_POSTERIOR_TOL = 1e-6  # a posterior predictive this close to the network's softmax adds nothing


@torch.no_grad()
def network_distance(teacher: Teacher, held) -> float:
    """The largest difference, over held-out examples and classes, between the teacher's predictive and the
    softmax of its network (the MAP network of a Laplace posterior), both at the teacher's T_cal."""
    probs = teacher.predict_probs(held.inputs, torch.arange(len(held)))
    logits = predict_logits(teacher.model, held.inputs, teacher.batch_size)
    return (probs.double() - torch.softmax(logits.double() / teacher.calibration_temperature, dim=1)).abs().max().item()


def no_posterior_note(report: dict, distance: float) -> str | None:
    """One line when tuning left a posterior no part in the predictive: the prior precision chosen is the largest
    the grid search tried, or the predictive equals the network's softmax within NO_POSTERIOR_TOL on held-out
    data (`distance`); None otherwise."""
    precision = report["prior_precision"]
    at_top = report.get("prior_method") == "gridsearch" and "prior_grid" in report and \
        precision >= report["prior_grid"][1] * (1 - 1e-6)
    same = distance <= NO_POSTERIOR_TOL
    if at_top and same:
        return f"held-out NLL prefers the network: the Laplace posterior adds nothing here (prior precision " \
               f"{precision:.3g}, the largest tried)"
    if at_top:
        return f"held-out NLL prefers the network: the Laplace posterior adds little here (prior precision " \
               f"{precision:.3g}, the largest tried; its held-out predictive is within {distance:.1g} of the " \
               f"network's softmax)"
    if same:
        return f"the Laplace posterior adds nothing here: its held-out predictive equals the network's softmax " \
               f"within {NO_POSTERIOR_TOL:g} (prior precision {precision:.3g})"
    return None


def describe_tuning(report: dict) -> str | None:
    """What calibration tuned, as a sentence (None when nothing was tuned)."""
    tuned = []
    if "prior_precision" in report:
        how = "marginal likelihood" if report.get("prior_method") == "marglik" else "held-out NLL over a grid " \
            f"{report['prior_grid'][0]:.3g} .. {report['prior_grid'][1]:.3g}" + \
            (" and the teacher's own, kept" if report.get("prior_kept") else "")
        tuned.append(f"prior precision {report['prior_precision']:.4g} (by {how})")
    if "temperature" in report:
        tuned.append(f"temperature {report['temperature']:.4g} (by held-out NLL)")
    if not tuned:
        return None
    return f"tuned on {report.get('heldout_examples', '?')} held-out examples: {' and '.join(tuned)}"

