"""How a training run is cut into steps and where it logs: the batches of an epoch, the batches of each optimizer
step, the steps between log entries, and the held-out curve each entry measures (`log_plan`, `HeldoutCurve`)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from bcpkd_cli import metrics
from bcpkd_cli.models import predict_logits

LOG_POINTS = 20  # log_every=0 (automatic): at least this many log entries per run, and one per epoch
LOG_SHARE = 0.5  # log_examples=0 (automatic): the held-out curve costs at most this share of training's passes...
LOG_MIN_EXAMPLES = 2048  # ...on at least this many held-out examples (a small sample inflates the convergence noise)
TRAINING_PASSES = 3  # a training example costs about three inference passes (forward and backward)
CurveFn = Callable[[nn.Module], dict]  # model -> {"heldout_nll", "heldout_accuracy"} (or {}: no held-out data)


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each batch of an epoch of n rows; a last batch of a single row joins the one before it
    (BatchNorm cannot train on one example)."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def accumulation_groups(bounds: list[tuple[int, int]], accumulate: int) -> list[list[tuple[int, int]]]:
    """The batches of each optimizer step: `accumulate` consecutive batches (the epoch's last group may hold fewer)."""
    return [bounds[i:i + accumulate] for i in range(0, len(bounds), accumulate)]


def log_interval(log_every: int, total_steps: int, steps_per_epoch: int) -> int:
    """The steps between log entries: `log_every`, or for 0 (automatic) an interval that gives at least
    LOG_POINTS entries per run and one per epoch."""
    return log_every if log_every > 0 else max(1, min(steps_per_epoch, total_steps // LOG_POINTS))


def run_log_interval(log_every: int, n: int, batch_size: int, epochs: int, accumulate: int = 1) -> int:
    """The steps between the log entries of a training run (`train_lockstep`) over n rows: `log_interval`."""
    per_epoch = len(accumulation_groups(batch_bounds(n, batch_size), accumulate))
    return log_interval(log_every, epochs * per_epoch, per_epoch)


class LogPlan(NamedTuple):
    """How a run logs its held-out curve: every `interval` optimizer steps, on `examples` held-out examples."""

    interval: int
    examples: int


def log_plan(log_every: int, log_examples: int, n: int, n_heldout: int, batch_size: int, epochs: int,
             accumulate: int = 1) -> LogPlan:
    """The held-out curve of a training run over n rows: the interval of `run_log_interval` and the examples each
    entry measures: `log_examples` (at most all), or for 0 (automatic) all of them where the run's entries cost at
    most LOG_SHARE of training's passes over the data (a training example counting TRAINING_PASSES inference
    passes), else as many as that allows and at least LOG_MIN_EXAMPLES."""
    interval = run_log_interval(log_every, n, batch_size, epochs, accumulate)
    per_epoch = len(accumulation_groups(batch_bounds(n, batch_size), accumulate)) if n else 0
    entries = epochs * per_epoch // interval + 2  # step 0, every interval, the end
    affordable = int(LOG_SHARE * TRAINING_PASSES * epochs * n / entries)
    wanted = log_examples if log_examples > 0 else max(LOG_MIN_EXAMPLES, affordable)
    return LogPlan(interval, min(n_heldout, wanted))


def heldout_sample(n_heldout: int, examples: int) -> torch.Tensor:
    """The rows [examples] of the held-out split that a curve of `examples` measures: a fixed draw (seed 0), in
    order, so that every entry, and every network of the same data, measures the same examples (a smaller sample
    is part of a larger one)."""
    if examples >= n_heldout:
        return torch.arange(n_heldout)
    return torch.randperm(n_heldout, generator=torch.Generator().manual_seed(0))[:examples].sort().values


class HeldoutCurve:
    """curve(model) -> {"heldout_nll", "heldout_accuracy"} on the `heldout_sample` of `examples` held-out examples
    ({} without held-out data), in the device's inference batches."""

    def __init__(self, inputs, labels: torch.Tensor, examples: int):
        rows = heldout_sample(len(labels), examples)
        self.whole = len(labels)
        if len(rows) < self.whole:
            inputs = inputs.subset(rows) if hasattr(inputs, "subset") else inputs[rows.to(labels.device)]
            labels = labels[rows.to(labels.device)]
        self.inputs, self.labels = inputs, labels

    def __call__(self, model: nn.Module) -> dict:
        if len(self.labels) == 0:  # data.n_heldout=0: no held-out curve
            return {}
        probs = torch.softmax(predict_logits(model, self.inputs).float(), dim=1)
        return {"heldout_nll": metrics.nll(probs, self.labels),
                "heldout_accuracy": metrics.accuracy(probs, self.labels)}

    def describe(self, interval: int) -> str:
        """What the log holds, for the training header."""
        if len(self.labels) == 0:
            return "no held-out curve (data.n_heldout=0)"
        of = f"{len(self.labels):,} of {self.whole:,}" if len(self.labels) < self.whole else f"all {self.whole:,}"
        every = "every step" if interval == 1 else f"every {interval} steps"
        return f"held-out curve {every} on {of} held-out examples"
