"""What the final gradient-noise measurement costs beside a training epoch, on a sample and on every example.

    python bench/grad_noise_cost.py [--arch resnet20] [--n 6000] [--sample 2048] [--repeats 3]

One image student (random 32x32 images, 10 classes, 8-view cache of random targets) and, interleaved in every
repeat, through the library's own code: one distillation epoch (`train_lockstep` with `view_batches`, what
`bcpkd distill` runs; batch 128), the gradient noise on a seeded sample of `--sample` examples and on all N
(`grad_noise`, what distill runs after its last epoch). Prints medians, each pass's cost per example and as a
share of an epoch, and what a 2-epoch run on N examples spends on each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bcpkd_cli.config import CalibrateConfig, Optimizer
from bcpkd_cli.data import Dataset, Split
from bcpkd_cli.engine import Member, TrainSpec, train_lockstep
from bcpkd_cli.grad_noise import grad_noise, sample_rows
from bcpkd_cli.losses import kd_loss
from bcpkd_cli.models import build_model, model_spec
from bcpkd_cli.targets import TableTargets, view_batches

N_CLASSES, VIEWS, BATCH = 10, 8, 128


def kd(logits, labels, targets):
    return kd_loss(logits, labels, targets, 1.0, 1.0, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--n", type=int, default=6000, help="training images")
    parser.add_argument("--sample", type=int, default=2048, help="distill.grad_noise_examples")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, N_CLASSES, (args.n,), generator=gen)
    cache = torch.softmax(torch.randn(args.n, VIEWS, N_CLASSES, generator=gen), dim=2)
    split = Split(images, labels, None)
    data = Dataset(split, split, split, N_CLASSES, (3, 32, 32), "bench", 0)
    source = TableTargets(cache)
    index = torch.arange(args.n)
    batches = view_batches(data, CalibrateConfig(views=VIEWS), 0, [source], torch.device("cpu"), index)
    torch.manual_seed(0)
    student = build_model(model_spec(args.arch, (3, 32, 32), N_CLASSES, ()))
    member = Member(student, kd, TrainSpec(1, BATCH, Optimizer.sgd, 0.01, 0.9, 0.0, 0))

    def targets(part: Split, rows: torch.Tensor) -> torch.Tensor:
        return source.view_zero(part.inputs, None, rows)

    def epoch() -> float:
        started = time.perf_counter()
        train_lockstep([member], labels, 1, BATCH, 0, "epoch", batches)
        return time.perf_counter() - started

    def measured(examples: str) -> float:
        started = time.perf_counter()
        grad_noise(student, split, sample_rows(args.n, examples, 0), targets, kd)
        return time.perf_counter() - started

    variants = {"epoch": epoch, f"grad noise, {args.sample} examples": lambda: measured(str(args.sample)),
                f"grad noise, all {args.n}": lambda: measured("all")}
    times: dict[str, list[float]] = {name: [] for name in variants}
    measured(str(min(256, args.n)))  # warm-up
    for _ in range(args.repeats):
        for name, run in variants.items():
            times[name].append(run())
    medians = {name: statistics.median(values) for name, values in times.items()}
    examples = {"epoch": args.n, f"grad noise, {args.sample} examples": min(args.sample, args.n),
                f"grad noise, all {args.n}": args.n}
    print(f"{args.arch}, {args.n} random 32x32 images, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| pass | seconds | ms per example | / epoch | share of a 2-epoch run |")
    print("|---|---|---|---|---|")
    for name, seconds in medians.items():
        share = "-" if name == "epoch" else f"{100 * seconds / (2 * medians['epoch'] + seconds):.0f}%"
        print(f"| {name} | {seconds:.1f} | {1e3 * seconds / examples[name]:.2f} | {seconds / medians['epoch']:.2f} "
              f"| {share} |")


if __name__ == "__main__":
    main()
