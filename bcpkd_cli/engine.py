"""Training and inference loops: device choice, seeded batches of in-memory tensors, progress, logging,
and data-parallel training across the processes that torchrun starts (DDP: NCCL on CUDA, gloo on CPU)."""

from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bcpkd_cli.choices import Optimizer, Precision, Schedule
from bcpkd_cli.console import TrainingReport, console
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.optim import make_optimizer, make_schedule, per_step, restore_schedule, schedule_state
from bcpkd_cli.resumption import Resume
from bcpkd_cli.steps import CurveFn, HeldoutCurve, accumulation_groups, batch_bounds, run_log_interval

# loss_fn(logits [B, C], labels [B], target_probs [B, C] | None) -> per-example losses [B]
LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# batch_fn(rows [B], epoch) -> (inputs [B, ...], target_probs [B, C] | None): augmentation views, online targets
BatchFn = Callable[[torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor | None]"]
LINE_KEYS = ("heldout_accuracy", "heldout_nll")  # what an epoch line shows of the curve, in this order


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """The process that writes artifacts and prints."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    if not dist.is_initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size())


def join_process_group(device: torch.device) -> World:
    """Under torchrun, join its process group once (NCCL on CUDA, gloo on CPU); the other ranks go quiet."""
    if launched_by_torchrun() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        console.quiet = dist.get_rank() != 0
    return world()


def leave_process_group() -> None:
    """Leave torchrun's process group together: the other ranks wait while rank 0 writes the artifact, so that
    no process tears its connections down under another one (a gloo rank leaving early could abort at exit)."""
    if dist.is_initialized():
        gc.collect()  # DDP wrappers (their reducers and hooks) go while their group is alive, not at interpreter exit
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def in_process_group():
    """A command's work, after which its processes leave torchrun's process group together (leave_process_group);
    after a Ctrl-C or SIGTERM each leaves at once, without waiting for the others: they may be in the middle of a
    step, or gone, and a process waiting for them would not end until torchrun kills it."""
    try:
        yield
    except KeyboardInterrupt:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    finally:
        leave_process_group()


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; an unavailable CUDA device is a user error. Under torchrun each
    process takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BcpkdError(f"--device {name}: no CUDA device is visible here; use --device cpu or auto")
    if launched_by_torchrun() and name.startswith("cuda"):
        if name != "cuda":
            raise BcpkdError(f"--device {name}: under torchrun each process uses the GPU of its LOCAL_RANK; "
                             f"use --device cuda or auto (CUDA_VISIBLE_DEVICES chooses the GPUs)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


def autocasts(device: torch.device, precision: Precision) -> bool:
    """Training runs under bf16 autocast: on CUDA unless float32 is asked for, on a CPU where bf16 is asked for."""
    return precision == Precision.bf16 or (device.type == "cuda" and precision == Precision.auto)


def device_label(device: torch.device, precision: Precision) -> str:
    """The device as a stage's first line names it, with its arithmetic where that is not float32."""
    return f"{device} (bf16 autocast)" if autocasts(device, precision) else str(device)


def training_precision(device: torch.device, precision: Precision):
    """The context a training forward pass runs in (`autocasts`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if autocasts(device, precision) \
        else contextlib.nullcontext()


def prepare_for_device(model: nn.Module, device: torch.device, precision: Precision) -> nn.Module:
    """Move to the device; on CUDA under bf16 autocast, convolution weights go channels_last (image inputs follow
    in ImageInput), which bf16 convolutions run fastest in."""
    model = model.to(device)
    if device.type == "cuda" and autocasts(device, precision):
        model = model.to(memory_format=torch.channels_last)
    return model


@dataclass(frozen=True)
class TrainSpec:
    """What a training loop needs from a teacher or distill config (its optimiser and schedule: optim.py)."""

    epochs: int
    batch_size: int
    optimizer: Optimizer
    lr: float
    momentum: float
    weight_decay: float
    seed: int
    lr_milestones: tuple[int, ...] = ()
    precision: Precision = Precision.auto
    compile: bool = False
    schedule: Schedule = Schedule.step
    warmup: float = 0.0  # optimizer steps, or a fraction < 1 of all of them
    accumulate: int = 1  # batches per optimizer step


def train(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    target_probs: torch.Tensor | None,
    loss_fn: LossFn,
    spec: TrainSpec,
    desc: str,
    log_every: int = 0,
    curve: CurveFn | None = None,
    batch_fn: BatchFn | None = None,
    penalty: Callable[[int], "torch.Tensor | float"] | None = None,
    resume: Resume | None = None,
    report: TrainingReport | None = None,
    log: list[dict] | None = None,
) -> int:
    """Minimise mean loss_fn (+ penalty(epoch), e.g. a KL term) over seeded shuffled batches.

    Batches are rows of tensors already on the device; `batch_fn(rows, epoch)` builds a batch's
    inputs and targets (default: the rows of `inputs` and `target_probs`). Appends {"step", **curve(model)}
    to `log` at step 0, every `log_every` optimizer steps (0: automatic, `log_interval`) and at the end (a resumed
    run's `log` holds the entries before the interruption too). Returns the number of optimizer steps.
    """
    if batch_fn is None:
        def batch_fn(rows: torch.Tensor, epoch: int):
            return inputs[rows], (None if target_probs is None else target_probs[rows])

    def group_batch(rows: torch.Tensor, epoch: int):
        batch_inputs, batch_targets = batch_fn(rows, epoch)
        return batch_inputs, [batch_targets]

    member = Member(model, loss_fn, spec, curve, penalty, log=[] if log is None else log)
    return train_lockstep([member], labels, spec.epochs, spec.batch_size, spec.seed, desc, group_batch, log_every,
                          resume, report, getattr(inputs, "plan", None), spec.accumulate)


@dataclass
class Member:
    """One network of a lockstep group: its loss, optimiser settings, held-out curve and penalty.
    `curve(model)` measures the held-out metrics of each `log` entry ({"step", **curve(model)}); the progress
    report shows them at epoch ends (the entry of the epoch's last step where there is one)."""

    model: nn.Module
    loss_fn: LossFn
    spec: TrainSpec
    curve: CurveFn | None = None
    penalty: Callable[[int], "torch.Tensor | float"] | None = None
    log: list[dict] = field(default_factory=list)


# group_batch_fn(rows [B], epoch) -> (inputs [B, ...], one target tensor [B, C] (or None) per member)
GroupBatchFn = Callable[[torch.Tensor, int], "tuple[torch.Tensor, list[torch.Tensor | None]]"]


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """The module that training steps call: a DDP wrapper across torchrun's processes (BatchNorm
    synchronised across GPUs; on CPU each process normalises its own share of the batch), else the model."""
    if world().size == 1:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces BatchNorm layers in place
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _synced(module: nn.Module, last: bool):
    """DDP's gradient allreduce on the last batch of an optimizer step only (no_sync on the others)."""
    return module.no_sync() if isinstance(module, DistributedDataParallel) and not last else contextlib.nullcontext()


def train_lockstep(members: list[Member], labels: torch.Tensor, epochs: int, batch_size: int, order_seed: int,
                   desc: str, group_batch_fn: GroupBatchFn, log_every: int = 0, resume: Resume | None = None,
                   report: TrainingReport | None = None,
                   plan: Callable[[list[torch.Tensor]], None] | None = None, accumulate: int = 1) -> int:
    """Train several networks on the same batches in one pass over the data: each step builds the batch
    once (rows, views, inputs) and then steps every member with its own loss, targets and optimiser.
    A member's weights are exactly those of training it alone with the same batch order.

    Under torchrun every process draws the same batch order and takes every world-size-th row of each
    batch; gradients are averaged so that a step is the step of the whole batch (the mean over all its
    rows), as in one process. Each optimizer step takes `accumulate` consecutive batches (the epoch's last step
    may take fewer): their gradients sum to that of the mean loss over all their rows, the step of one batch
    `accumulate` times as large; under torchrun gradients are averaged across processes on the last of them only.
    Steps count optimizer steps (logs, schedules, the returned total). Only rank 0 logs (every `log_every` steps,
    0: automatic) and saves the state of `resume`. `report` shows the progress (default: a progress bar on a
    terminal, a line per epoch in batch jobs). `plan(batches)` is told each epoch's row batches of this process in
    advance (images read per batch read them ahead)."""
    place = world()
    torch.manual_seed(order_seed)
    order_gen = torch.Generator().manual_seed(order_seed)
    optimizers = [make_optimizer(m.model.parameters(), m.spec) for m in members]
    wrapped = [data_parallel(m.model, labels.device) for m in members]
    forwards = [torch.compile(w) if m.spec.compile else w for m, w in zip(members, wrapped)]  # same parameters
    n = len(labels)
    bounds = batch_bounds(n, batch_size)
    groups = accumulation_groups(bounds, accumulate)
    total = epochs * len(groups)
    schedules = [make_schedule(o, m.spec, epochs, len(groups)) for m, o in zip(members, optimizers)]
    stepwise = [per_step(m.spec) for m in members]
    log_every = run_log_interval(log_every, n, batch_size, epochs, accumulate)
    step, first_epoch = 0, 0
    if resume is not None and resume.start is not None:
        first_epoch, step = _restore(resume.start, members, optimizers, schedules, order_gen, labels.device)
    for m in members:
        m.model.train()
    report = report or TrainingReport(desc, [""] * len(members))
    curves = {m.curve.describe(log_every) for m in members if isinstance(m.curve, HeldoutCurve)}
    report.start(total, step, epochs, first_epoch, n, batch_size, place.size, accumulate, ", ".join(sorted(curves)))
    loss_sums = [torch.zeros((), device=labels.device) for _ in members]  # this epoch's, summed over steps
    epoch_steps = 0

    def mean_losses() -> list[float]:
        return [float(s) / max(1, epoch_steps) for s in loss_sums]

    def log_all(at_step: int) -> None:  # once per step (a resumed run logged its epoch end before saving)
        for m in members:
            if m.curve is not None and place.is_main and not (m.log and m.log[-1].get("step") == at_step):
                m.log.append({"step": at_step, **_measured(m, labels.device)})

    try:
        for epoch in range(first_epoch, epochs):
            order = torch.randperm(n, generator=order_gen).to(labels.device)
            if plan is not None:
                in_order = order.cpu()  # one copy from the device, not one per batch
                plan([in_order[start:stop][place.rank::place.size] for start, stop in bounds])
            epoch_steps = 0
            for loss_sum in loss_sums:
                loss_sum.zero_()
            for group in groups:
                if step % log_every == 0:
                    log_all(step)
                group_rows = group[-1][1] - group[0][0]
                share = group_rows / place.size  # the DDP mean over processes of sum / share = the group's mean
                whole = place.size == 1 and len(group) == 1  # one batch in one process: its mean
                for k, (start, stop) in enumerate(group):
                    last = k == len(group) - 1
                    rows = order[start:stop]
                    weight = len(rows) / group_rows  # this batch's part of the step (of its penalty)
                    rows = rows[place.rank::place.size]
                    fetch_started = time.perf_counter()
                    batch_inputs, batch_targets = group_batch_fn(rows, epoch)
                    report.data_seconds += time.perf_counter() - fetch_started
                    batch_labels = labels[rows]
                    for m, module, forward, optimizer, schedule, targets, loss_sum, moves in zip(
                            members, wrapped, forwards, optimizers, schedules, batch_targets, loss_sums, stepwise):
                        if k == 0:
                            optimizer.zero_grad(set_to_none=True)
                        with _synced(module, last):
                            with training_precision(labels.device, m.spec.precision):
                                losses = m.loss_fn(forward(batch_inputs).float(), batch_labels, targets)  # [B / size]
                                loss = losses.mean() if whole else losses.sum() / share
                                if m.penalty is not None:
                                    loss = loss + m.penalty(epoch) * weight
                            loss.backward()
                        loss_sum.add_(loss.detach())
                        if last:
                            optimizer.step()
                            if moves:
                                schedule.step()
                step += 1
                epoch_steps += 1
                report.step(step, epoch, mean_losses)
            for schedule, moves in zip(schedules, stepwise):
                if not moves:
                    schedule.step()
            if step % log_every == 0 or epoch == epochs - 1:
                log_all(step)  # before the state is saved: a resumed run's log holds it (the last: the end's entry)
            if place.is_main:
                report.epoch_end(epoch, step, [{"loss": loss, **_epoch_heldout(m, step, report, labels.device)}
                                               for m, loss in zip(members, mean_losses())])
            if resume is not None:
                rng = _every_process(_rng_state(labels.device))  # each process's dropout/VI noise stream
                if place.is_main:
                    resume.save(_state(epoch + 1, epochs, step, members, optimizers, schedules, order_gen, rng))
    finally:
        report.close()
    log_all(step)
    return step


def _measured(member: Member, device: torch.device) -> dict:
    """The member's held-out metrics, measured without touching the training's RNG streams (dropout, VI noise: a
    run with a curve equals one without)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        values = member.curve(member.model)
    member.model.train()
    return values


def _epoch_heldout(member: Member, step: int, report: TrainingReport, device: torch.device) -> dict:
    """The held-out metrics of an epoch's end for the progress report: the log entry of that step, else (when
    the report asks for them) measured on the curve's examples, else none."""
    if member.log and member.log[-1].get("step") == step:
        measured = member.log[-1]
    elif member.curve is None or not report.wants_heldout:
        return {}
    else:
        measured = _measured(member, device)
    return {key: measured[key] for key in LINE_KEYS if key in measured}


def _rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _every_process(value: dict) -> list[dict]:
    """[value of rank 0, rank 1, ...] (every process calls this at the same point)."""
    if world().size == 1:
        return [value]
    gathered: list = [None] * world().size
    dist.all_gather_object(gathered, {k: v if v is None else v.cpu() for k, v in value.items()})
    return gathered


def broadcast_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm statistics), e.g. before an eval-mode pass whose
    result steers training. Every process must call it at the same point."""
    if world().size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _state(epochs_done: int, epochs: int, step: int, members: list[Member], optimizers: list, schedules: list,
           order_gen: torch.Generator, rng: list[dict]) -> dict:
    """Everything the next epoch depends on, as tensors and plain values (loads with weights_only);
    `rng` holds each process's torch (and CUDA) generator state; `epochs`, the run's, says how far it got."""
    return {
        "epoch": epochs_done, "epochs": epochs, "step": step, "order_rng": order_gen.get_state(), "rng": rng,
        "members": [{"model": m.model.state_dict(), "optimizer": o.state_dict(), "schedule": schedule_state(s),
                     "log": list(m.log)} for m, o, s in zip(members, optimizers, schedules)],
    }


def _restore(state: dict, members: list[Member], optimizers: list, schedules: list, order_gen: torch.Generator,
             device: torch.device) -> tuple[int, int]:
    if len(state["members"]) != len(members):
        raise BcpkdError(f"the saved training state holds {len(state['members'])} networks, this run trains "
                         f"{len(members)}; resume with the options of the interrupted run")
    for m, o, s, saved in zip(members, optimizers, schedules, state["members"]):
        m.model.load_state_dict(saved["model"])
        o.load_state_dict(saved["optimizer"])
        restore_schedule(s, saved["schedule"])
        m.log[:] = saved["log"]
    order_gen.set_state(state["order_rng"])
    rng = state["rng"][world().rank]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    return state["epoch"], state["step"]
