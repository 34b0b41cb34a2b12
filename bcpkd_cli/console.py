"""Human output on stderr: the rich console, and what a training loop reports while it runs.

Kept apart from the training loop: the loop calls a `TrainingReport`, which shows a progress bar on a
terminal and prints plain lines in batch jobs (stderr not a terminal), and optionally writes TensorBoard
scalars.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from bcpkd_cli.errors import BcpkdError

_EXPLAINED = False  # what the lines of batch jobs show is said once per process

# Logs of batch jobs get 200-column lines instead of rich's 80-column default (tables: their full width, show_table).
console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def show_table(table: Table) -> None:
    """A table on stderr. On a terminal rich fits it to the window; in a log (stderr not a terminal) it is printed at
    its natural width, however many columns it has, so that no column name or cell is cut short or wrapped."""
    if console.is_terminal:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update(width=1_000_000), table).maximum
    width = console.width
    console.width = max(width, natural)
    try:
        console.print(table)
    finally:
        console.width = width


def duration(seconds: float) -> str:
    """1h02m, 3m05s or 42s."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def stamp() -> str:
    """The local time of day to the second, ISO 8601 (2026-12-07T02:14:03): how the lines of a log begin."""
    return datetime.now().isoformat(timespec="seconds")


def epoch_count(n: int) -> str:
    """1 epoch, 2 epochs."""
    return f"{n} epoch{'s' if n != 1 else ''}"


def batch_count(batch_size: int, accumulate: int = 1) -> str:
    """batch 128; with gradient accumulation batch 32 x 4 accumulated (an optimizer step of 128 examples)."""
    return f"batch {batch_size}" + (f" x {accumulate} accumulated" if accumulate > 1 else "")


def training_summary(cfg) -> str:
    """A teacher or distill section's training for a stage's first line: `2 epochs of batch 8 (adam lr 0.001, seed
    0)`, with gradient accumulation and a schedule other than step (`linear, warm-up 0.1`) where there are."""
    schedule = f", {cfg.schedule.value}" if cfg.schedule.value != "step" else ""
    schedule += f", warm-up {cfg.warmup:g}" if cfg.warmup else ""
    return (f"{epoch_count(cfg.epochs)} of {batch_count(cfg.batch_size, cfg.accumulate)} ({cfg.optimizer.value} lr "
            f"{cfg.lr}{schedule}, seed {cfg.seed})")


def header(command: str, what: str, data: str, device: object, processes: int, out: object) -> None:
    """A stage's first line, for a person reading its log later: when it started, the command, what it runs (its
    key settings), on what data (`brief`), where (device, torchrun processes) and into which folder."""
    ranks = f" x {processes} processes" if processes > 1 else ""
    line(f"{stamp()} {command}: {what}, data {data}, device {device}{ranks} -> {out}")


def line(text: str) -> None:
    """One whole line on stderr in one write, so that the lines of parallel jobs never interleave mid-line."""
    if not console.quiet:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


class TrainingReport:
    """Progress of one training loop (a group of `names` networks trained in lockstep).

    On a terminal: a rich progress bar. Otherwise (batch jobs): a line at every epoch end, and one at
    least every `line_seconds` within long epochs, each beginning with the time of day: epoch, mean training
    loss, held-out accuracy and NLL, examples per second, the share of time spent waiting for data (building
    batches: reading images, views, targets; on CUDA an upper bound on the GPU's idle time) and the time left.
    `tensorboard` folders (one per network) receive the same numbers per epoch."""

    def __init__(self, desc: str, names: list[str] | None = None, line_seconds: float = 60.0,
                 tensorboard: list[Path] | None = None):
        self.desc, self.names, self.line_seconds = desc, names or [""], line_seconds
        self.lines = not console.is_terminal
        self.writers = [open_tensorboard(folder) for folder in tensorboard or []]
        self.bar: Progress | None = None

    @property
    def wants_heldout(self) -> bool:
        """Whether epoch ends should measure the held-out metrics (for lines or TensorBoard)."""
        return self.lines or bool(self.writers)

    def start(self, total_steps: int, step: int, epochs: int, first_epoch: int, n_examples: int, batch_size: int,
              processes: int, accumulate: int = 1, curve: str = "") -> None:
        """`total_steps`, `step`: optimizer steps (of `accumulate` batches each); `curve`: what the log measures."""
        self.total, self.epochs, self.n_examples = total_steps, epochs, n_examples
        self.started, self.start_step, self.last_line = time.perf_counter(), step, time.perf_counter()
        self.data_seconds = 0.0  # spent building batches (the loop adds to it)
        group = f" x {len(self.names)} in lockstep" if len(self.names) > 1 else \
            (escape(f" [{self.names[0]}]") if self.names[0] else "")  # not rich markup
        if total_steps == 0:
            console.print(f"{self.desc}{group}: 0 epochs, nothing to train")
            return
        ranks = f" on {processes} processes" if processes > 1 else ""
        console.print(f"training {self.desc}{group}: {total_steps} {'optimizer ' if accumulate > 1 else ''}"
                      f"step{'s' if total_steps != 1 else ''} ({epoch_count(epochs)} of {n_examples} examples, "
                      f"{batch_count(batch_size, accumulate)}{ranks})"
                      f"{'; ' + curve if curve else ''}")
        global _EXPLAINED
        if self.lines and not _EXPLAINED:
            _EXPLAINED = True
            console.print("a line per epoch: mean training loss, the network's held-out accuracy and NLL (on the "
                          "held-out curve's examples), examples/s, data wait (share of the time spent building "
                          "batches), time left")
        if step:
            console.print(f"resuming {self.desc} after epoch {first_epoch} (step {step})")
        if not self.lines:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.desc, total=total_steps, completed=step)

    def _pace(self, step: int) -> str:
        elapsed = time.perf_counter() - self.started
        done = step - self.start_step
        if done <= 0 or elapsed <= 0:
            return ""
        rate = done * self.n_examples * self.epochs / self.total / elapsed  # examples per second
        return (f", {rate:,.0f} ex/s, data wait {self.data_wait:.1%}, "
                f"ETA {duration((self.total - step) * elapsed / done)}")

    @property
    def data_wait(self) -> float:
        """The share of the loop's time so far spent building batches."""
        return self.data_seconds / max(1e-9, time.perf_counter() - self.started)

    def step(self, step: int, epoch: int, running_loss) -> None:
        """After each step; `running_loss()` -> this epoch's mean loss per network so far (read when printed)."""
        if self.bar is not None and (step % 200 == 0 or step == self.total):
            self.bar.update(self.task, completed=step)
        elif self.lines and time.perf_counter() - self.last_line >= self.line_seconds:
            for name, loss in zip(self.names, running_loss()):
                self._print(f"epoch {epoch + 1}/{self.epochs} step {step}/{self.total}", name, {"loss": loss}, step)

    def epoch_end(self, epoch: int, step: int, stats: list[dict]) -> None:
        """stats: per network {"loss": mean training loss, "heldout_accuracy": ..., "heldout_nll": ...}."""
        for name, values, writer in zip(self.names, stats, self.writers or [None] * len(stats)):
            if writer is not None:
                for key, value in values.items():
                    writer.add_scalar(f"train/{key}", value, epoch + 1)
                writer.flush()
            if self.lines:
                self._print(f"epoch {epoch + 1}/{self.epochs}", name, values, step)

    def _print(self, where: str, name: str, values: dict, step: int) -> None:
        label = f" [{name}]" if name else ""
        shown = ", ".join(f"{key.replace('heldout_', 'held-out ').replace('_', ' ')} {value:.4f}"
                          for key, value in values.items())
        line(f"{stamp()} {self.desc}{label} {where}: {shown}{self._pace(step)}")
        self.last_line = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        for writer in self.writers:
            writer.close()


def open_tensorboard(folder: Path):
    """A TensorBoard SummaryWriter on `folder` (the optional `tensorboard` extra)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise BcpkdError("log.tensorboard=true needs the tensorboard package: pip install -e '.[tensorboard]' "
                         "(or set log.tensorboard=false)") from None
    return SummaryWriter(str(folder))
