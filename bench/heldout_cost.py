"""What the held-out curve costs beside training, and the inference batch that makes it cheap.

    python bench/heldout_cost.py [--arch resnet20] [--n 5000] [--heldout 1000] [--epochs 2] [--repeats 3]
        [--sample 512] [--threads 1]

One image student (random 32x32 images, 10 classes, 8-view cache of random targets), through the library's own
code (`train_lockstep` with `view_batches`, what `bcpkd distill` runs; batch 128), in one process:

1. Inference images/s of the student in eval mode at batches 64 ... 4096 beside a training step's images/s at
   batch 128 (interleaved, medians over --repeats): why the automatic inference batch is 128 on a CPU.
2. An --epochs run on N images per variant of the held-out curve, the variants interleaved in every repeat:
   no curve; every entry on all held-out images at batch 4096 (the former per-entry cost; the former separate
   pass of each epoch line is not counted); the automatic plan (`log_plan`, batch 128); a --sample of them
   (`log_examples`). The automatic log interval throughout, the epoch lines of a batch job (the entry of the
   epoch's last step where there is one). Prints medians of the run's seconds, of the curve's (timed inside),
   and the curve's share of the run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bcpkd_cli.config import CalibrateConfig, Optimizer
from bcpkd_cli.console import TrainingReport
from bcpkd_cli.data import Dataset, Split
from bcpkd_cli.engine import Member, TrainSpec, train_lockstep
from bcpkd_cli.losses import kd_loss
from bcpkd_cli.models import build_model, model_spec, predict_logits
from bcpkd_cli.steps import HeldoutCurve, log_plan
from bcpkd_cli.targets import TableTargets, view_batches

N_CLASSES, VIEWS, BATCH = 10, 8, 128
INFERENCE_BATCHES = (64, 128, 256, 1024, 4096)


def kd(logits, labels, targets):
    return kd_loss(logits, labels, targets, 1.0, 1.0, 1.0)


class TimedCurve(HeldoutCurve):
    """A held-out curve at a fixed inference batch that adds its seconds up."""

    def __init__(self, inputs, labels, examples: int, batch: int):
        super().__init__(inputs, labels, examples)
        self.batch, self.seconds = batch, 0.0

    def __call__(self, model) -> dict:
        started = time.perf_counter()
        probs = torch.softmax(predict_logits(model, self.inputs, self.batch), dim=1)
        self.seconds += time.perf_counter() - started
        return {"heldout_accuracy": (probs.argmax(1) == self.labels).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--n", type=int, default=5000, help="training images")
    parser.add_argument("--heldout", type=int, default=1000, help="held-out images")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--sample", type=int, default=512, help="the log_examples of the last variant")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n + args.heldout, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, N_CLASSES, (args.n + args.heldout,), generator=gen)
    train = Split(images[:args.n], labels[:args.n], None)
    held = Split(images[args.n:], labels[args.n:], None)
    data = Dataset(train, held, held, N_CLASSES, (3, 32, 32), "bench", 0)
    source = TableTargets(torch.softmax(torch.randn(args.n, VIEWS, N_CLASSES, generator=gen), dim=2))
    batches = view_batches(data, CalibrateConfig(views=VIEWS), 0, [source], torch.device("cpu"), torch.arange(args.n))
    spec = model_spec(args.arch, (3, 32, 32), N_CLASSES, ())
    plan = log_plan(0, 0, args.n, args.heldout, BATCH, args.epochs)
    print(f"{args.arch}, {args.n} training and {args.heldout} held-out 32x32 images, {args.epochs} epochs of batch "
          f"{BATCH}, {torch.get_num_threads()} threads; automatic plan: an entry every {plan.interval} steps on "
          f"{plan.examples} held-out images")

    # 1. inference batch
    model = build_model(spec)
    probe = held.inputs[:1024]
    speeds: dict[str, list[float]] = {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(args.repeats):
        for batch in INFERENCE_BATCHES:
            started = time.perf_counter()
            predict_logits(model, probe, batch)
            speeds.setdefault(f"inference, batch {batch}", []).append(len(probe) / (time.perf_counter() - started))
        model.train()
        started = time.perf_counter()
        for start in range(0, len(probe), BATCH):
            optimizer.zero_grad()
            model(probe[start:start + BATCH]).logsumexp(1).mean().backward()
            optimizer.step()
        speeds.setdefault("training step, batch 128", []).append(len(probe) / (time.perf_counter() - started))
    print("\n| pass | images/s (median) | per round |\n|---|---|---|")
    for name, values in speeds.items():
        print(f"| {name} | {statistics.median(values):.0f} | {', '.join(f'{v:.0f}' for v in values)} |")

    # 2. a run per curve variant
    variants = {"no held-out curve": None, f"all {args.heldout}, batch 4096 (before)": (args.heldout, 4096),
                f"automatic: {plan.examples}, batch 128": (plan.examples, 128),
                f"log_examples={args.sample}, batch 128": (args.sample, 128)}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, variant in variants.items():
            torch.manual_seed(0)
            student = build_model(spec)
            curve = None if variant is None else TimedCurve(held.inputs, held.labels, *variant)
            member = Member(student, kd, TrainSpec(args.epochs, BATCH, Optimizer.sgd, 0.01, 0.9, 0.0, 0), curve)
            report = TrainingReport(name)
            report.lines = True  # as a batch job: epoch lines with held-out metrics
            started = time.perf_counter()
            train_lockstep([member], train.labels, args.epochs, BATCH, 0, name, batches, plan.interval, report=report)
            runs[name].append((time.perf_counter() - started, 0.0 if curve is None else curve.seconds))
    base = statistics.median(seconds for seconds, _ in runs["no held-out curve"])
    print("\n| held-out curve | run (s, median) | of it the curve (s) | curve / run | run / no curve |\n"
          "|---|---|---|---|---|")
    for name, values in runs.items():
        run = statistics.median(seconds for seconds, _ in values)
        curve = statistics.median(spent for _, spent in values)
        print(f"| {name} | {run:.1f} | {curve:.1f} | {curve / run:.0%} | {run / base:.2f} |")


if __name__ == "__main__":
    main()
