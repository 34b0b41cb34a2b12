"""evaluate: accuracy, NLL, ECE, Brier, distance to the true BCPs, convergence and gradient noise."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from rich.table import Table
from rich.text import Text

from bcpkd_cli import artifacts, metrics, targets
from bcpkd_cli.config import Recipe, recipe_for_checkpoint, to_plain
from bcpkd_cli.data import Dataset, announce, decoding_workers, load_dataset, require_classes
from bcpkd_cli.console import line, show_table
from bcpkd_cli.deployable import model_input
from bcpkd_cli.engine import resolve_device
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.grad_noise import grad_noise, sample_rows
from bcpkd_cli.losses import kd_loss
from bcpkd_cli.models import build_model, inference_batch_size, predict_logits, scaling_name
from bcpkd_cli.runners import MANIFEST, open_model
from bcpkd_cli.teachers import load_teacher
from bcpkd_cli.threads import apply_threads

CHECKPOINT_FORMATS = (artifacts.STUDENT_FORMAT, artifacts.TEACHER_FORMAT)
MAX_CONFUSION_CLASSES = 20  # reports carry a confusion matrix up to this many classes


def pure_kd(logits, labels, target_probs):
    return kd_loss(logits, labels, target_probs, alpha=1.0, t_teacher=1.0, t_student=1.0)


def grad_noise_against(model, data: Dataset, which: str, seed: int, device: torch.device,
                       examples: str = "all") -> float | None:
    """Mean squared per-example gradient norm of pure KD at the model's weights against other targets, on
    `examples` training rows drawn by `seed` (grad_noise.sample_rows; None for 0)."""
    train = data.train
    if which == "onehot":
        target_probs = targets.onehot(train.labels, data.n_classes)
    elif train.true_bcp is None:
        raise BcpkdError(f"evaluate.grad_targets {which}: this dataset has no true BCPs; use onehot")
    elif which == "true":
        target_probs = train.true_bcp
    else:
        target_probs = targets.dirichlet_noised(train.true_bcp.cpu(), float(which.split(":")[1]), seed)
    target_probs = target_probs.to(device)
    return grad_noise(model, train, sample_rows(len(train), examples, seed),
                      lambda part, rows: target_probs[rows.to(device)], pure_kd)


def evaluate_student(payload: dict, recipe: Recipe, data: Dataset, device: torch.device) -> tuple[dict, torch.Tensor]:
    """A student's test metrics, convergence and gradient noise, and its test probabilities [N, C]."""
    model = build_model(payload["model"], payload["state_dict"]).to(device)
    test = data.test
    probs = torch.softmax(predict_logits(model, test.inputs, recipe.evaluate.batch_size), dim=1)
    report = metrics.classification_report(probs, test.labels, test.true_bcp, recipe.evaluate.ece_bins)
    for key in ("nll", "accuracy"):
        noise = metrics.convergence_noise([entry[f"heldout_{key}"] for entry in payload["log"]
                                           if f"heldout_{key}" in entry])
        report[f"convergence_noise_{key}"] = None if math.isnan(noise) else noise  # null: log too short
    report["grad_noise"] = payload["history"]["grad_noise"]
    report["grad_noise_examples"] = payload["history"].get("grad_noise_examples")  # null: an older student (all)
    seed = payload["config"]["distill"]["seed"]  # the rows of the student's own grad_noise, where the sizes agree
    for which in recipe.evaluate.grad_targets:
        report[f"grad_noise_{which}"] = grad_noise_against(model, data, which, seed, device,
                                                           recipe.evaluate.grad_noise_examples)
    if recipe.evaluate.grad_targets:
        report["grad_targets_examples"] = len(sample_rows(len(data.train), recipe.evaluate.grad_noise_examples, seed))
    return report, probs


def evaluate_teacher(payload: dict, recipe: Recipe, data: Dataset, device: torch.device) -> tuple[dict, torch.Tensor]:
    """A teacher's test metrics and its test probabilities [N, C]."""
    teacher = load_teacher(payload, device)
    test = data.test
    probs = teacher.predict_probs(test.inputs, torch.arange(len(test)))
    return metrics.classification_report(probs, test.labels, test.true_bcp, recipe.evaluate.ece_bins), probs


def shown(path: str | Path) -> str:
    """A path as a person reads it: relative to the working folder when it lies under it."""
    relative = os.path.relpath(path) if Path(path).is_absolute() else str(path)
    return str(path) if relative.startswith("..") else relative


def teacher_row_label(bayes: str, calibration: dict | None) -> str:
    """What a teacher is: its kind, raw (as trained) or calibrated (by calibrate) with what was tuned."""
    kind = "deterministic" if bayes == "none" else bayes
    if calibration is None:
        return f"{kind} teacher (raw)"
    tuned = ([f"T={calibration['temperature']:.3g}"] if "temperature" in calibration else []) + \
        ([f"prior precision {calibration['prior_precision']:.3g}"] if "prior_precision" in calibration else [])
    return f"{kind} teacher (calibrated, {', '.join(tuned) or 'nothing tuned'})"


def student_row_label(provenance: dict) -> str:
    """What a student learned from: the teacher (which, how calibrated, its file) or the labels / exact BCPs."""
    kind = provenance["kind"]
    if kind in ("teacher", "online"):
        teacher = teacher_row_label(provenance.get("teacher_kind") or "?", provenance.get("calibration") or None)
        return f"student{' (online)' if kind == 'online' else ''} of {teacher} {shown(provenance['teacher'])}"
    if kind == "noisy":
        return f"student of Dirichlet-noised exact BCPs (alpha {provenance.get('dirichlet_alpha', '?'):g})"
    return {"onehot": "student of one-hot labels", "true": "student of the exact BCPs"}.get(kind, f"student of {kind}")


def describe(path: Path, payload: dict, data: Dataset) -> dict:
    """What a script filters reports on: the checkpoint, its kind and architecture, and for a student its targets,
    KD settings and teacher; for a teacher its kind and whether calibrate made it."""
    config, is_student = payload["config"], payload["format"] == artifacts.STUDENT_FORMAT
    head = {"checkpoint": str(path), "sha256": artifacts.sha256_file(path),
            "kind": "student" if is_student else "teacher", "arch": payload["model"]["arch"],
            "normalize": scaling_name(payload["model"])}
    if is_student:
        distill, provenance = config["distill"], payload["targets"]
        head.update({"targets": provenance["kind"], "alpha": distill["alpha"], "t_teacher": distill["t_teacher"],
                     "t_student": distill["t_student"], "teacher": provenance.get("teacher"),
                     "teacher_sha256": provenance.get("teacher_sha256"), "teacher_kind": provenance.get("teacher_kind"),
                     "calibrated": bool(provenance.get("calibration")), "cache": provenance.get("cache"),
                     "label": student_row_label(provenance)})
    else:
        calibration = payload["history"].get("calibration")
        head.update({"teacher_kind": payload["bayes"], "calibrated": calibration is not None,
                     "label": teacher_row_label(payload["bayes"], calibration)})
        if calibration and calibration.get("no_posterior"):  # calibrate found the posterior adds nothing
            head["no_posterior"] = calibration["no_posterior"]
    return {**head, "split": "test", "n_examples": len(data.test)}


def class_reports(probs: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Per-class test accuracy, and up to MAX_CONFUSION_CLASSES classes the confusion matrix (rows: true class,
    columns: predicted, in label order)."""
    counts, accuracies = metrics.per_class_accuracy(probs, labels)
    report: dict = {"per_class": [{"class": name, "n": n, "accuracy": acc}
                                  for name, n, acc in zip(classes, counts, accuracies)]}
    if probs.shape[1] <= MAX_CONFUSION_CLASSES:
        report["confusion"] = metrics.confusion_matrix(probs, labels)
    return report


def evaluate_one(path: Path, tree: dict, announced: set[str] | None = None) -> dict:
    """The report of one checkpoint: `describe`, then its metrics, the config and data it was made with (its own,
    as stored), and the settings of this evaluation. `announced`: the fingerprints of the data already described
    on stderr (this checkpoint's data is described unless it is there; None: never)."""
    payload = artifacts.load_checkpoint(path, CHECKPOINT_FORMATS)
    recipe = recipe_for_checkpoint(tree, payload)
    device = resolve_device(recipe.device)
    apply_threads(recipe.threads, decoding_workers(recipe.data))
    data = load_dataset(recipe.data).to(device)
    if announced is not None and data.fingerprint not in announced:
        announced.add(data.fingerprint)
        announce(data)
    measure = evaluate_student if payload["format"] == artifacts.STUDENT_FORMAT else evaluate_teacher
    require_classes(str(path), payload["data"].get("classes"), data)
    measured, probs = measure(payload, recipe, data, device)
    return {**describe(path, payload, data), "metrics": measured,
            **class_reports(probs, data.test.labels, data.classes),
            "reliability": metrics.reliability(probs, data.test.labels, recipe.evaluate.ece_bins),
            "config": payload["config"], "data": {**payload["data"], "classes": list(data.classes)},
            "evaluate": {"device": str(device), "data_fingerprint": data.fingerprint, "noise_seed": recipe.distill.seed,
                         **to_plain(recipe.evaluate)}}


def is_export(path: Path) -> bool:
    """An exported model.onnx / model.pt2, an export folder or its hf/ folder (not a checkpoint)."""
    path = Path(path)
    return path.suffix in (".onnx", ".pt2") or (path / MANIFEST).is_file() or \
        path.is_dir() and (path / "config.json").is_file() and (path.parent / MANIFEST).is_file()


def evaluate_export(path: Path, tree: dict, announced: set[str]) -> dict:
    """The report of an exported file, run as the user's code runs it (onnxruntime, torch.export), on the test
    split of the data its export records: the same metrics as for its checkpoint, so parity is a report."""
    runner = open_model(path)
    manifest = runner.manifest
    recipe = recipe_for_checkpoint(tree, {"data": manifest["data"]}, f"{path}")
    apply_threads(recipe.threads, decoding_workers(recipe.data))
    data = load_dataset(recipe.data)
    if data.fingerprint not in announced:
        announced.add(data.fingerprint)
        announce(data)
    require_classes(str(path), manifest["classes"], data)
    test, batch = data.test, recipe.evaluate.batch_size or inference_batch_size("cpu")  # the runtimes run on CPUs
    chunks = [test.inputs[start:start + batch] for start in range(0, len(test), batch)]
    probs = torch.cat([runner.run(model_input(x, runner.preprocess))[1] for x in chunks])
    return {"checkpoint": str(path), "sha256": artifacts.sha256_file(path) if Path(path).is_file() else None,
            "kind": f"export ({runner.description})", "arch": manifest["model"]["arch"],
            "label": f"export ({runner.description}) of {shown(manifest['source']['checkpoint'])}",
            "source": manifest["source"], "predictive": manifest["predictive"], "split": "test",
            "n_examples": len(test), "metrics": metrics.classification_report(probs, test.labels, test.true_bcp,
                                                                              recipe.evaluate.ece_bins),
            **class_reports(probs, test.labels, data.classes),
            "reliability": metrics.reliability(probs, test.labels, recipe.evaluate.ece_bins),
            "data": {**manifest["data"], "classes": list(data.classes)},
            "evaluate": {"device": "cpu", "data_fingerprint": data.fingerprint, **to_plain(recipe.evaluate)}}


def print_table(reports: list[dict]) -> None:
    """One row per report: what the model is (its label) above its file, then its metrics; below the table, a line
    for each calibrated teacher whose posterior adds nothing."""
    keys: list[str] = []
    for r in reports:
        keys += [k for k, v in r["metrics"].items() if k not in keys and v is not None]
    table = Table(title=f"test-split evaluation ({reports[0]['n_examples']} examples)", show_lines=True)
    table.add_column("model")
    for key in keys:
        table.add_column(key, justify="right")
    for r in reports:
        table.add_row(Text(f"{r.get('label', r['kind'])}\n{shown(r['checkpoint'])}"),
                      *(f"{r['metrics'][k]:.4g}" if r["metrics"].get(k) is not None else "-" for k in keys))
    show_table(table)
    for r in reports:
        if r.get("no_posterior"):
            line(f"{shown(r['checkpoint'])}: {r['no_posterior']}")


def with_teachers(reports: list[dict], tree: dict, announced: set[str]) -> list[dict]:
    """Give each student that learned from a teacher's cache `teacher_report`: the report of the calibrated
    teacher.pt beside that cache (evaluated once, or the report of that file where it was given too), or
    {"checkpoint", "missing": true} when the file is gone (said in one line). Returns the table's rows: the
    reports, each student followed by its teacher's where that file was not given."""
    known = {Path(r["checkpoint"]).resolve(): r for r in reports if r["kind"] in ("student", "teacher")}
    rows = []
    for r in reports:
        rows.append(r)
        if r["kind"] != "student" or not r.get("cache"):
            continue
        path = Path(r["cache"]).parent / "teacher.pt"
        if not path.is_file():
            line(f"{shown(r['checkpoint'])}: the calibrated teacher it learned from, {shown(path)}, is gone; "
                 f"evaluating the student alone")
            r["teacher_report"] = {"checkpoint": str(path), "missing": True}
            continue
        if path.resolve() not in known:
            known[path.resolve()] = evaluate_one(path, tree, announced)
            rows.append(known[path.resolve()])
        r["teacher_report"] = known[path.resolve()]
    return rows


def print_per_class(reports: list[dict]) -> None:
    """Test accuracy per class (rows) of every checkpoint (columns), with the class's test count."""
    table = Table(title="test accuracy per class")
    table.add_column("class")
    table.add_column("n", justify="right")
    for r in reports:
        table.add_column((Path(r["checkpoint"]).parent.name or r["checkpoint"]) +
                         (" (calibrated)" if r["kind"] == "teacher" and r.get("calibrated") else ""), justify="right")
    for i, entry in enumerate(reports[0]["per_class"]):
        table.add_row(entry["class"], str(entry["n"]),
                      *("-" if r["per_class"][i]["accuracy"] is None else f"{r['per_class'][i]['accuracy']:.3f}"
                        for r in reports))
    show_table(table)


def run(tree: dict, paths: list[Path], out: str, force: bool = False,
        per_class: bool = False) -> tuple[Path | None, list[dict]]:
    """Evaluate every checkpoint (all are checked before any is evaluated); with `out`, write out/report.json
    (a list of reports), refusing to replace one unless `force`."""
    report_path = Path(out) / "report.json" if out else None
    if report_path is not None and report_path.is_file() and not force:
        raise BcpkdError(f"{report_path}: a report is there already; give another --out, or add --force to replace it")
    for p in paths:
        if is_export(p):
            open_model(p)
        else:
            artifacts.load_checkpoint(p, CHECKPOINT_FORMATS)
    announced: set[str] = set()
    reports = [evaluate_export(Path(p), tree, announced) if is_export(p) else evaluate_one(Path(p), tree, announced)
               for p in paths]
    rows = with_teachers(reports, tree, announced)
    print_table(rows)
    if per_class:
        if len({tuple(e["class"] for e in r["per_class"]) for r in rows}) > 1:
            raise BcpkdError("--per-class: the checkpoints were made for different classes; evaluate them apart")
        print_per_class(rows)
    if report_path is not None:
        artifacts.write_json(report_path, reports)
    return report_path, reports
