"""Training and inference loops: device choice, seeded batches of in-memory tensors, progress, logging."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.func import functional_call, grad, vmap

from bcpkd_cli.config import Optimizer
from bcpkd_cli.errors import BcpkdError

# Human output goes to stderr; logs of batch jobs get wide tables instead of rich's 80-column default.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

# loss_fn(logits [B, C], labels [B], target_probs [B, C] | None) -> per-example losses [B]
LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# batch_fn(rows [B], epoch) -> (inputs [B, ...], target_probs [B, C] | None): augmentation views, online targets
BatchFn = Callable[[torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor | None]"]


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; an unavailable CUDA device is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BcpkdError(f"--device {name}: no CUDA device is visible here; use --device cpu or auto")
    return torch.device(name)


@dataclass(frozen=True)
class TrainSpec:
    """What a training loop needs from a teacher or distill config."""

    epochs: int
    batch_size: int
    optimizer: Optimizer
    lr: float
    momentum: float
    weight_decay: float
    seed: int
    lr_milestones: tuple[int, ...] = ()


def make_optimizer(params, spec: TrainSpec) -> torch.optim.Optimizer:
    if spec.optimizer == Optimizer.sgd:
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                               foreach=True)  # foreach: one kernel per step for all tensors
    return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay, foreach=True)


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


def train(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    target_probs: torch.Tensor | None,
    loss_fn: LossFn,
    spec: TrainSpec,
    desc: str,
    log_every: int = 0,
    log_fn: Callable[[int, nn.Module], None] | None = None,
    batch_fn: BatchFn | None = None,
    penalty: Callable[[int], torch.Tensor] | None = None,
) -> int:
    """Minimise mean loss_fn (+ penalty(epoch), e.g. a KL term) over seeded shuffled batches.

    Batches are rows of tensors already on the device; `batch_fn(rows, epoch)` builds a batch's
    inputs and targets (default: the rows of `inputs` and `target_probs`). Calls log_fn(step, model)
    at step 0 and every `log_every` steps. Returns the number of steps.
    """
    if batch_fn is None:
        def batch_fn(rows: torch.Tensor, epoch: int):
            return inputs[rows], (None if target_probs is None else target_probs[rows])

    torch.manual_seed(spec.seed)
    order_gen = torch.Generator().manual_seed(spec.seed)
    optimizer = make_optimizer(model.parameters(), spec)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(spec.lr_milestones), gamma=0.1)
    n = len(labels)
    steps_per_epoch = (n + spec.batch_size - 1) // spec.batch_size
    total = spec.epochs * steps_per_epoch
    step = 0
    model.train()
    console.print(f"training {desc}: {total} steps ({spec.epochs} epochs of {n} examples, batch {spec.batch_size})")
    with progress_bar() as bar:
        task = bar.add_task(desc, total=total)
        for epoch in range(spec.epochs):
            order = torch.randperm(n, generator=order_gen).to(inputs.device)
            for start in range(0, n, spec.batch_size):
                if log_fn is not None and log_every and step % log_every == 0:
                    log_fn(step, model)
                    model.train()
                rows = order[start:start + spec.batch_size]
                batch_inputs, batch_targets = batch_fn(rows, epoch)
                loss = loss_fn(model(batch_inputs), labels[rows], batch_targets).mean()
                if penalty is not None:
                    loss = loss + penalty(epoch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if step % 200 == 0 or step == total:
                    bar.update(task, completed=step)
            schedule.step()
    if log_fn is not None and log_every:
        log_fn(step, model)
    return step


@torch.inference_mode()
def predict_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Logits [N, C] of an eval-mode model, computed in chunks."""
    model.eval()
    return torch.cat([model(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])


def per_example_grad_sq_norms(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    target_probs: torch.Tensor | None,
    loss_fn: LossFn,
    floats_per_chunk: int = 32_000_000,
) -> torch.Tensor:
    """||grad_w loss_i(w)||^2 for every example i at the model's current weights -> [N].

    Examples are taken in chunks whose per-example gradients hold about `floats_per_chunk` numbers
    (128 MB in float32), so memory stays bounded for large networks."""
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    chunk = max(1, min(4096, floats_per_chunk // sum(p.numel() for p in params.values())))

    def one_loss(p, x, y, t):
        logits = functional_call(model, p, (x[None],))
        return loss_fn(logits, y[None], None if t is None else t[None]).sum()

    in_dims = (None, 0, 0, None if target_probs is None else 0)
    per_example_grad = vmap(grad(one_loss), in_dims=in_dims)
    norms = []
    for i in range(0, len(labels), chunk):
        t = None if target_probs is None else target_probs[i:i + chunk]
        grads = per_example_grad(params, inputs[i:i + chunk], labels[i:i + chunk], t)
        norms.append(sum(g.flatten(1).square().sum(1) for g in grads.values()))
    return torch.cat(norms)
