"""Gradient noise at the solution (the theory's sigma*, design.md sec. 3): the mean squared per-example gradient
norm of the training loss at the final weights, against the targets used.

It costs one per-example gradient per example measured (about three forward passes of the network each), so it
is measured on a seeded sample of the training examples (distill.grad_noise_examples, evaluate.
grad_noise_examples): K rows drawn without replacement from the seed, the same for the same seed and training
split, or all of them. Under torchrun the sample is shared out: each process takes a contiguous block of it and
the sums and counts of all processes are added up.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call, grad, vmap

from bcpkd_cli.data import Split
from bcpkd_cli.data.text import is_text
from bcpkd_cli.engine import LossFn, broadcast_buffers, world
from bcpkd_cli.models.huggingface import text_grad_sq_norms

# targets(part, rows) -> the targets [K, C] of training rows `rows` [K] (`part`: the split's rows `rows`), or None
TargetsFn = Callable[[Split, torch.Tensor], "torch.Tensor | None"]


def sample_rows(n_examples: int, examples: str, seed: int) -> torch.Tensor:
    """The training rows measured -> sorted row ids [K]: `all` (or a K >= n_examples) every row; a number K, K rows
    drawn without replacement by a generator seeded by `seed` (apart from the seed's other draws); `0` none."""
    if examples == "all" or int(examples) >= n_examples:
        return torch.arange(n_examples)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 104_729)  # not the batch order's permutation
    return torch.randperm(n_examples, generator=generator)[:int(examples)].sort().values


def rows_of(split: Split, rows: torch.Tensor) -> Split:
    """The split's rows `rows` (sorted, distinct); a contiguous block of tensors as views of them (a
    memory-mapped store is not copied)."""
    if len(rows) and int(rows[-1]) - int(rows[0]) + 1 == len(rows) and isinstance(split.inputs, torch.Tensor):
        block = slice(int(rows[0]), int(rows[-1]) + 1)
        bcp = None if split.true_bcp is None else split.true_bcp[block]
        return Split(split.inputs[block], split.labels[block], bcp)
    return split.subset(rows)


def grad_noise(model: torch.nn.Module, split: Split, rows: torch.Tensor, targets: TargetsFn,
               loss_fn: LossFn) -> float | None:
    """Mean ||grad_w loss_i(w)||^2 over the training rows `rows` of `split` (None for no rows). Under torchrun every
    process calls it with the same rows and gets the same value: each measures a contiguous block of them (the
    value of one process up to the order of summation)."""
    if len(rows) == 0:
        return None
    place = world()
    broadcast_buffers(model)  # rank 0's BatchNorm statistics: those of the network it saves
    mine = rows.tensor_split(place.size)[place.rank]
    part = rows_of(split, mine)
    norms = per_example_grad_sq_norms(model, part.inputs, part.labels, targets(part, mine), loss_fn) if len(mine) \
        else torch.zeros(0)
    if place.size == 1:
        return norms.mean().item()
    device = next(model.parameters()).device  # NCCL reduces tensors on the GPU
    total = torch.stack([norms.double().sum().to(device), torch.tensor(float(len(mine)), device=device,
                                                                       dtype=torch.float64)])
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


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

    if is_text(inputs):  # token rows are no tensor to vmap over (models/huggingface.py)
        return text_grad_sq_norms(model, inputs, labels, target_probs, loss_fn, chunk)
    in_dims = (None, 0, 0, None if target_probs is None else 0)
    per_example_grad = vmap(grad(one_loss), in_dims=in_dims)
    norms = []
    for i in range(0, len(labels), chunk):
        t = None if target_probs is None else target_probs[i:i + chunk]
        grads = per_example_grad(params, inputs[i:i + chunk], labels[i:i + chunk], t)
        norms.append(sum(g.flatten(1).square().sum(1) for g in grads.values()))
    return torch.cat(norms)
