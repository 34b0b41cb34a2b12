"""train-teacher: train a network the way the teacher kind asks (or take a trained one), fit its posterior, save.

How each kind trains lives with its class (bcpkd_cli/teachers/); this stage prepares the run, lets the
kind train, measures the result on held-out data and writes the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from bcpkd_cli import artifacts, metrics
from bcpkd_cli.config import TEACHER_RECORD, Recipe, recipe_record, require_arch
from bcpkd_cli.choices import Bayes, Normalize, teacher_label
from bcpkd_cli.console import console, header, line, training_summary
from bcpkd_cli.data import announce, brief, decoding_workers, load_dataset
from bcpkd_cli.engine import device_label, join_process_group, resolve_device
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.models import build_model, describe_inputs, huggingface, model_spec, scaling_name
from bcpkd_cli.resumption import (TEACHER_SECTIONS, claim_folder, finish, require_saved_state, resumable,
                                  settings_of)
from bcpkd_cli.teachers import TEACHER_KINDS, teacher_payload
from bcpkd_cli.teachers.training import TrainingRun
from bcpkd_cli.threads import apply_threads


def run(recipe: Recipe, resume: bool = False, force: bool = False) -> Path | None:
    """Train (or assemble) the teacher; `resume` continues an interrupted run in recipe.out from the last
    epoch end of its unfinished training phase, `force` replaces a finished or interrupted one. Under
    torchrun the processes share every batch (DDP) and rank 0 writes the teacher (the others return None)."""
    kind = TEACHER_KINDS[recipe.teacher.bayes]
    if not recipe.teacher.base:
        require_arch("teacher.arch", recipe.teacher.arch)
    problems = kind.problems(recipe.teacher)
    if problems:
        raise BcpkdError("; ".join(problems))
    device = resolve_device(recipe.device)
    threads, _ = apply_threads(recipe.threads, decoding_workers(recipe.data))
    place = join_process_group(device)
    data = load_dataset(recipe.data).to(device)  # its fingerprint is the one on the device (nvJPEG)
    if len(data.heldout) == 0 and kind.needs_heldout(recipe.teacher):
        raise BcpkdError(f"data.n_heldout=0: a {recipe.teacher.bayes.value} teacher tunes on held-out data "
                         f"(teacher.laplace.prior=gridsearch or bayes=temperature); keep a held-out split or use "
                         f"--set teacher.laplace.prior=marglik")
    starts = kind.starting_points(recipe.teacher, data.fingerprint)
    if starts:  # the stored config describes the network actually used
        used, scaling = starts[0]["model"], scaling_name(starts[0]["model"])
        recipe = replace(recipe, teacher=replace(recipe.teacher, arch=used["arch"], hidden=tuple(used["hidden"]),
                                                 arch_kwargs=dict(used.get("arch_kwargs", {})),
                                                 normalize=dict(used["stats"]) if scaling == "custom" else
                                                 Normalize(scaling)))
    cfg = recipe.teacher
    out = artifacts.new_run_dir(recipe.out, f"teacher-{cfg.bayes.value}")
    claim_folder(out, [out / "teacher.pt"], resume, force)
    if resume:
        require_saved_state(out)
    init = artifacts.read_weights(cfg.init, "teacher.init") if cfg.init else None  # a missing file: said first
    parent_sha = artifacts.sha256_file(Path(cfg.base)) if cfg.base else None
    settings = {**settings_of(recipe, TEACHER_SECTIONS), "data_fingerprint": data.fingerprint,
                "base_sha256": parent_sha, "processes": place.size,
                "init_sha256": artifacts.sha256_file(Path(cfg.init)) if cfg.init else None}
    spec = starts[0]["model"] if starts else model_spec(cfg.arch, data.input_shape, data.n_classes, cfg.hidden,
                                                        kind.dropout(cfg), cfg.arch_kwargs, data.stats, cfg.normalize)
    if "hf" in spec:
        huggingface.require_length(spec["arch"], spec["hf"], recipe.data.max_length)
        if not starts and init is None:  # a network that starts from NAME_OR_DIR's weights
            huggingface.require_weights(spec["arch"], spec["arch_kwargs"])
    if init is not None:
        build_model(spec, init=init)  # weights that do not fit the network: refused before any line or work
    if place.is_main:
        header("train-teacher", _header(recipe), brief(data), device_label(device, recipe.precision), place.size,
               out)
        announce(data)
        if describe_inputs(spec, "teacher.normalize"):
            line(describe_inputs(spec, "teacher.normalize"))
    run = TrainingRun(recipe, data, device, spec, tuple(starts),  # one resumable state file per training phase
                      phase=lambda name: resumable(out / f"train-state-{name}.pt", settings, resume,
                                                   recipe.data.skip_unreadable), folder=out, init=init)
    teacher, history = kind.train(run)
    if init is not None:
        history["init_sha256"] = artifacts.sha256_file(Path(cfg.init))

    held = data.heldout
    history["heldout"] = metrics.classification_report(teacher.predict_probs(held.inputs, torch.arange(len(held))),
                                                       held.labels, held.true_bcp) if len(held) else {}
    if not place.is_main:
        return None
    history["processes"] = place.size
    if run.pretrained:  # what pretrained weights gave its networks
        history["pretrained"] = sorted(run.pretrained)
    chosen = _chosen(threads, run, history)
    record = recipe_record(recipe, TEACHER_RECORD)
    log = _log(run.logs)  # the held-out curve, as a student's (metrics.jsonl and the checkpoint's `log`)
    artifacts.write_text(out / "metrics.jsonl", "".join(json.dumps(entry) + "\n" for entry in log))
    path = artifacts.save_checkpoint(out / "teacher.pt", {**teacher_payload(teacher, spec, record, data.info(),
                                                                            parent_sha, history), "log": log})
    artifacts.write_config(out, record, {**chosen, **data.sizes(), "out": str(out)}, sorted(run.pretrained))
    finish(out)
    summary = ", ".join(f"{k} {v:.4f}" for k, v in history["heldout"].items()) or "none (data.n_heldout=0)"
    predictive = "the network's softmax" if cfg.bayes == Bayes.none else "its predictive"
    console.print(f"{teacher_label(cfg.bayes)} ({predictive} on all {len(held):,} held-out examples): held-out "
                  f"{summary}")
    return path


def _header(recipe: Recipe) -> str:
    """What a train-teacher run trains, for its first line: the kind and network, where it starts from, the
    training."""
    cfg = recipe.teacher
    start = f" around {cfg.base}" if cfg.base else f" from {cfg.init}" if cfg.init else ""
    if cfg.base and cfg.bayes in (Bayes.laplace, Bayes.temperature):  # fitted around the base network, not trained
        fitted = f"{cfg.laplace.subset.value} {cfg.laplace.hessian.value} posterior, prior {cfg.laplace.prior.value}" \
            if cfg.bayes == Bayes.laplace else "a temperature on held-out NLL"
        return f"{teacher_label(cfg.bayes)} {cfg.arch}{start}: {fitted} (nothing trained)"
    return f"{teacher_label(cfg.bayes)} {cfg.arch}{start}, {training_summary(cfg)}"


def _chosen(threads: int, run: TrainingRun, history: dict) -> dict:
    """What this run used where the recipe lets bcpkd choose (0: automatic), into `history` (`threads`, and
    `log_every` and `log_examples` of the phases trained here: one number, or per phase where the log names its
    phases); returned as config.yaml says it beside those keys (a teacher around a base logged nothing: its log
    and plan are the base's)."""
    history["threads"] = threads
    chosen: dict = {"threads": threads}
    for key in ("log_every", "log_examples"):
        values = {phase: plan.interval if key == "log_every" else plan.examples
                  for phase, plan in run.log_plans.items()}
        if values:
            history[key] = next(iter(values.values())) if len(run.logs) == 1 else values
            chosen[f"teacher.{key}"] = next(iter(values.values())) if len(set(values.values())) == 1 else \
                ", ".join(f"{phase} {value}" for phase, value in values.items())
    return chosen


def _log(logs: dict[str, list[dict]]) -> list[dict]:
    """The log entries of the training phases; where there were several (ensemble members, mcmi fine-tuning after
    the network's training), each entry names its phase."""
    if len(logs) == 1:
        return next(iter(logs.values()))
    return [{"phase": phase, **entry} for phase, entries in logs.items() for entry in entries]
