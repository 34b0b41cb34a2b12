"""distill: train a student on the teacher's cached BCPs (or on one-hot, true or noisy BCP targets).

Several students (a sweep over alpha, temperatures, seeds, ...) can train in lockstep: one pass over
the data, each batch and view drawn once, every student stepped on it (`run_lockstep`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bcpkd_cli import artifacts
from bcpkd_cli.choices import TARGET_LABELS, Targets, teacher_label
from bcpkd_cli.config import STUDENT_RECORD, DistillConfig, Recipe, recipe_record, require_arch
from bcpkd_cli.console import TrainingReport, header, line, training_summary
from bcpkd_cli.data import (Dataset, Split, announce, brief, decoding_workers, few_shot_rows, load_dataset,
                            views)
from bcpkd_cli.engine import (Member, TrainSpec, device_label, join_process_group, prepare_for_device,
                              resolve_device, train_lockstep)
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.grad_noise import grad_noise, sample_rows
from bcpkd_cli.losses import kd_loss
from bcpkd_cli.models import build_model, describe_inputs, huggingface, model_spec, settle_pretrained
from bcpkd_cli.resumption import (STUDENT_SECTIONS, claim_folder, finish, require_saved_state, resumable,
                                  settings_of)
from bcpkd_cli.steps import HeldoutCurve, log_plan
from bcpkd_cli.targets import TargetSource, student_targets, view_batches
from bcpkd_cli.teachers import Teacher
from bcpkd_cli.threads import apply_threads


def data_seed(cfg: DistillConfig) -> int:
    """The seed of batch order, view draws and the few-shot subset (distill.seed unless data_seed is set)."""
    return cfg.data_seed if cfg.data_seed >= 0 else cfg.seed


# a lockstep group shares these (and the data): its batches and optimizer steps
SHARED_KEYS = ("epochs", "batch_size", "accumulate", "few_shot", "log_every", "log_examples")


def check_group(recipes: list[Recipe]) -> None:
    """Students trained in lockstep see the same data, views and batches: refuse groups that differ there."""
    first = recipes[0]
    for recipe in recipes[1:]:
        differ = [f"distill.{k}" for k in SHARED_KEYS if getattr(recipe.distill, k) != getattr(first.distill, k)]
        differ += [name for name, a, b in (("data", recipe.data, first.data), ("device", recipe.device, first.device),
                                           ("precision", recipe.precision, first.precision),
                                           ("calibrate.views", recipe.calibrate.views, first.calibrate.views),
                                           ("distill.data_seed", data_seed(recipe.distill), data_seed(first.distill)))
                   if a != b]
        if differ:
            raise BcpkdError(f"students trained in lockstep must share {', '.join(differ)}; sweep only per-student "
                             f"settings (alpha, temperatures, seed with a fixed distill.data_seed, lr, arch, ...)")


def student_label(cfg: DistillConfig, teacher: str, arch: str = "", settings: str = "") -> str:
    """What logs call a student: `student of laplace teacher runs/t/teacher.pt` (`teacher`: its label and file),
    `student (one-hot labels)`, `student (exact BCPs)`, `student (noisy BCPs)`; with `arch`, `student resnet20 of
    ...`; `settings` join the parentheses."""
    network = f"student {arch}" if arch else "student"
    learns = f" of {teacher}" if cfg.targets in (Targets.teacher, Targets.online) else ""
    notes = [note for note in ("online" if cfg.targets == Targets.online else TARGET_LABELS.get(cfg.targets.value),
                               settings) if note]
    return f"{network}{learns}" + (f" ({', '.join(notes)})" if notes else "")


def _teacher_named(teacher_path: Path | None) -> str:
    """`laplace teacher runs/t/teacher.pt`: the kind read from the checkpoint (its tensors mapped, not read)."""
    if teacher_path is None:
        return "a teacher (none given)"
    payload = artifacts.load_checkpoint(teacher_path, artifacts.TEACHER_FORMAT, mmap=True)
    return f"{teacher_label(payload['bayes'])} {teacher_path}"


def _student_spec(recipe: Recipe, data: Dataset) -> dict:
    """A student's model spec; a Hugging Face network that cannot read the data (max_length beyond its positions)
    or a local folder without the weights it is to start from is refused here."""
    cfg = recipe.distill
    spec = model_spec(cfg.arch, data.input_shape, data.n_classes, cfg.hidden, arch_kwargs=cfg.arch_kwargs,
                      stats=data.stats, normalize=cfg.normalize)
    if "hf" in spec:
        huggingface.require_length(spec["arch"], spec["hf"], recipe.data.max_length)
        if not cfg.init:
            huggingface.require_weights(spec["arch"], spec["arch_kwargs"])
    return spec


def _header(recipes: list[Recipe], teacher: str, names: list[str]) -> str:
    """What a distill run trains, for its first line: the student(s) and their targets, the training."""
    cfg = recipes[0].distill
    settings = f"targets {cfg.targets.value}, alpha {cfg.alpha}, T_t {cfg.t_teacher}, T_s {cfg.t_student}"
    parts = [student_label(cfg, teacher, cfg.arch, settings), training_summary(cfg)]
    if cfg.few_shot:
        parts.append(f"{cfg.few_shot} examples per class")
    if len(recipes) > 1:
        parts.append(f"{len(recipes)} students in lockstep" + (f" ({'; '.join(names)})" if any(names) else ""))
    return ", ".join(parts)


@dataclass
class _Student:
    recipe: Recipe
    model: torch.nn.Module
    spec: dict
    source: TargetSource
    provenance: dict
    label: str  # what logs call it (student_label)
    pretrained: str | None  # what pretrained weights gave its network (`settle_pretrained`), None: none were read


def run(recipe: Recipe, teacher_path: Path | None, cache: Path | None = None, resume: bool = False,
        force: bool = False, label: str = "") -> Path | None:
    """One student; its student.pt (None on the ranks other than 0 under torchrun). `label` names the job in
    progress and finish lines (e.g. `laplace seed=1`)."""
    paths = run_lockstep([recipe], teacher_path, cache, resume=resume, force=force, names=[label])
    return paths[0] if paths else None


def run_sweep(recipes: list[Recipe], grid: list[dict], teacher_path: Path | None, cache: Path | None,
              out: str, resume: bool = False, force: bool = False) -> list[Path]:
    """The students of a grid in lockstep, each in OUT/KEY=V-... (a new folder under `out`, which also
    keeps the group's training state)."""
    check_group(recipes)  # before anything is written
    base = artifacts.new_run_dir(out, "distill-sweep")
    outs = [str(base / "-".join(f"{k}={v}" for k, v in point.items())) for point in grid]
    names = [" ".join(f"{k}={v}" for k, v in point.items()) for point in grid]
    return run_lockstep(recipes, teacher_path, cache, outs, state_dir=base, resume=resume, force=force, names=names)


def run_lockstep(recipes: list[Recipe], teacher_path: Path | None, cache: Path | None = None,
                 outs: list[str] | None = None, state_dir: Path | None = None, resume: bool = False,
                 force: bool = False, names: list[str] | None = None) -> list[Path]:
    """Distill one student per recipe in one pass over the data (same batches and views), into `outs`
    (default: each recipe's out); returns the student.pt paths. Each student's weights equal a separate
    run with the same seeds. Under torchrun the processes share every batch; rank 0 writes the students
    (the others return no paths). The group's training state is saved in `state_dir` (default: the
    first student's folder) at every epoch end; `resume` continues from it; `force` replaces finished
    students. `names` label the students in progress and finish lines."""
    check_group(recipes)
    for recipe in recipes:
        require_arch("distill.arch", recipe.distill.arch)
    first = recipes[0]
    names = names or [""] * len(recipes)
    outs = outs or [r.out for r in recipes]
    folders = [artifacts.new_run_dir(out, f"student-{r.distill.targets.value}") for out, r in zip(outs, recipes)]
    state_dir = Path(state_dir) if state_dir else folders[0]
    claim_folder(state_dir, [folder / "student.pt" for folder in folders], resume, force)
    if resume:
        require_saved_state(state_dir)
    device = resolve_device(first.device)
    threads, _ = apply_threads(first.threads, decoding_workers(first.data))
    place = join_process_group(device)
    data = load_dataset(first.data).to(device)
    teacher_path = Path(teacher_path) if teacher_path else None
    teacher = _teacher_named(teacher_path) if first.distill.targets in (Targets.teacher, Targets.online) else ""
    if place.is_main:
        header("distill", _header(recipes, teacher, names), brief(data), device_label(device, first.precision),
               place.size, state_dir)
        announce(data)
    specs = [_student_spec(recipe, data) for recipe in recipes]  # a network's mistakes: said before any cache
    online: dict[str, Teacher] = {}  # one teacher object per calibrated teacher file, shared by students
    sources = [student_targets(recipe, data, teacher_path, cache, device, online) for recipe in recipes]
    seed = data_seed(first.distill)
    example_index = torch.arange(len(data.train))
    if first.distill.few_shot:  # the students see K examples per class; the teacher's cache covers them all
        example_index = few_shot_rows(data.train.labels, first.distill.few_shot, seed)
        data = replace(data, train=data.train.subset(example_index))
        sources = [source.subset(example_index) for source in sources]
    group, said = [], set()
    for recipe, source, spec in zip(recipes, sources, specs):
        provenance = dict(source.provenance)
        if first.distill.few_shot:
            provenance["few_shot_rows"] = example_index.tolist()
        cfg = recipe.distill
        inputs = describe_inputs(spec, "distill.normalize")  # said once for the students in lockstep that share it
        if place.is_main and inputs and inputs not in (describe_inputs(s.spec, "distill.normalize") for s in group):
            line(inputs)
        init = artifacts.read_weights(cfg.init, "distill.init") if cfg.init else None
        if init is not None:
            provenance["init_sha256"] = artifacts.sha256_file(Path(cfg.init))
        torch.manual_seed(cfg.seed)
        model = prepare_for_device(build_model(spec, init=init), device, recipe.precision)
        weights = settle_pretrained(model, data.classes)  # every process: a loaded head's rows in the data's order
        if weights and weights not in said:  # once for the students in lockstep that share it
            said.add(weights)
            line(weights)
        group.append(_Student(recipe, model, spec, source, provenance, student_label(cfg, teacher), weights))
    held, shared = data.heldout, first.distill  # the students in lockstep share the training's shape and log
    plan = log_plan(shared.log_every, shared.log_examples, len(data.train), len(held), shared.batch_size,
                    shared.epochs, shared.accumulate)
    curve = HeldoutCurve(held.inputs, held.labels, plan.examples)
    members = [Member(s.model, _kd(s.recipe.distill), _train_spec(s.recipe), curve) for s in group]
    log = first.log
    desc = group[0].label if len({s.label for s in group}) == 1 else "students"  # names tell them apart
    report = TrainingReport(desc, names, log.line_seconds,
                            [folder / "tensorboard" for folder in folders] if log.tensorboard else None)
    settings = {"students": [settings_of(r, STUDENT_SECTIONS) for r in recipes], "processes": place.size,
                "data_fingerprint": data.fingerprint,
                "targets": [{k: s.provenance.get(k) for k in ("teacher_sha256", "cache_sha256")} for s in sources]}
    started = time.perf_counter()
    steps = train_lockstep(members, data.train.labels, first.distill.epochs, first.distill.batch_size, seed, desc,
                           view_batches(data, first.calibrate, seed, [s.source for s in group], device, example_index),
                           log_every=plan.interval,
                           resume=resumable(state_dir / artifacts.TRAINING_STATE, settings, resume,
                                            first.data.skip_unreadable), report=report,
                           plan=getattr(data.train.inputs, "plan", None), accumulate=first.distill.accumulate)
    seconds = time.perf_counter() - started
    noise = [_grad_noise(s, data, example_index, member) for s, member in zip(group, members)]  # every process
    if not place.is_main:
        return []
    chosen = {"threads": threads, "log_every": plan.interval, "log_examples": plan.examples}  # where bcpkd chose
    paths = [_save(s, folder, data, steps, seconds / len(group), member, place.size, name, measured, chosen)
             for s, folder, member, name, measured in zip(group, folders, members, names, noise)]
    finish(state_dir)
    return paths


def _kd(cfg: DistillConfig):
    def loss_fn(logits, labels, teacher_probs):
        return kd_loss(logits, labels, teacher_probs, cfg.alpha, cfg.t_teacher, cfg.t_student)

    return loss_fn


def _train_spec(recipe: Recipe) -> TrainSpec:
    cfg = recipe.distill
    return TrainSpec(cfg.epochs, cfg.batch_size, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.seed,
                     cfg.lr_milestones, recipe.precision, recipe.compile, cfg.schedule, cfg.warmup, cfg.accumulate)


def _grad_noise(student: _Student, data: Dataset, example_index: torch.Tensor, member: Member) -> dict:
    """The gradient noise at the final weights against the student's own unaugmented targets (view 0), on
    distill.grad_noise_examples training rows drawn by distill.seed (under torchrun each process measures its
    share of them), and how many rows that is."""
    cfg = student.recipe.distill
    rows = sample_rows(len(data.train), cfg.grad_noise_examples, cfg.seed)

    def targets(part: Split, part_rows: torch.Tensor) -> torch.Tensor:
        ids = example_index[part_rows]  # ids in the whole training split (few-shot students: not the row numbers)
        return student.source.view_zero(part.inputs, views.sample_index(ids, 0 * ids), part_rows)

    return {"grad_noise": grad_noise(student.model, data.train, rows, targets, member.loss_fn),
            "grad_noise_examples": len(rows)}


def _save(student: _Student, out: Path, data: Dataset, steps: int, seconds: float, member: Member, processes: int,
          name: str, noise: dict, chosen: dict) -> Path:
    """student.pt, metrics.jsonl and config.yaml; `chosen`: the threads and held-out curve (interval, examples)
    used, in the history and beside their keys in config.yaml."""
    recipe, cfg = student.recipe, student.recipe.distill
    artifacts.write_text(out / "metrics.jsonl", "".join(json.dumps(entry) + "\n" for entry in member.log))
    with_cache = cfg.targets in (Targets.teacher, Targets.online)  # the calibration settings made its targets
    record = recipe_record(recipe, (*STUDENT_RECORD, "calibrate") if with_cache else STUDENT_RECORD)
    payload = {
        "format": artifacts.STUDENT_FORMAT, "version": artifacts.VERSION, "model": student.spec,
        "state_dict": student.model.state_dict(), "config": record, "data": data.info(),
        "targets": {"kind": cfg.targets.value, **student.provenance}, "log": member.log,
        "history": {"steps": steps, "seconds": round(seconds, 2), "processes": processes, **noise, **chosen,
                    **({"pretrained": student.pretrained} if student.pretrained else {})},
    }
    path = artifacts.save_checkpoint(out / "student.pt", payload)
    made_from = [f"{student.label}: {cfg.targets.value} targets"] + \
        [f"{name} {student.provenance[key]} (SHA-256 {student.provenance[key + '_sha256']})"
         for name, key in (("teacher", "teacher"), ("calibrated teacher", "calibrated_teacher"), ("cache", "cache"))
         if student.provenance.get(key)] + ([student.pretrained] if student.pretrained else [])
    artifacts.write_config(out, record, {"threads": chosen["threads"], "distill.log_every": chosen["log_every"],
                                         "distill.log_examples": chosen["log_examples"], **data.sizes(),
                                         "out": str(out)}, made_from)
    label = f" [{name}]" if name else ""
    final = member.log[-1].get("heldout_accuracy") if member.log else None
    said = [f"{steps} steps in {seconds:.1f}s"]
    if final is not None:
        said.append(f"final held-out accuracy {final:.4f}")
    if noise["grad_noise"] is not None:
        said.append(f"gradient noise {noise['grad_noise']:.3g} ({noise['grad_noise_examples']} examples)")
    line(f"{student.label}{label}: {', '.join(said)} -> {path}")
    return path
