"""What distillation costs beside plain training: cached targets, an online teacher, cache reads.

    python bench/distill_speed.py [--n 1024] [--batch 128] [--views 8] [--repeats 5]

1. Epoch time of one student, same batches and views, three ways, interleaved inside every repeat
   (the order rotates from repeat to repeat),
   through the library's own training loop and batch builder (`train_lockstep`, `view_batches`):
   plain supervised training (cross-entropy), cached distillation (targets gathered from the
   memory-mapped [N, V, C] BCP cache) and online distillation (the teacher runs on every batch, the
   reference approach). Two teacher/student pairs; the online/cached ratio is printed beside the
   ratio FLOP counts predict, 1 + S * teacher / (3 * student) (S = 1: a deterministic teacher).
2. Cache reads: the time to gather a batch's targets against the time of the student's training
   step on it, and the process's own (anonymous) resident memory after mapping caches of 1, 8 and
   32 views of 50,000 x 100 classes and reading one epoch of targets from each.
3. Sweeps: a grid of students (alpha 0.25 .. 1) trained in lockstep through the library's
   `train_lockstep` (each batch, view and online-teacher output computed once) against the same
   students trained one after another, with cached and with online targets.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bcpkd_cli import artifacts
from bcpkd_cli.config import CalibrateConfig, Optimizer
from bcpkd_cli.data import Dataset, Split
from bcpkd_cli.data.views import ViewSampler, apply_views, select_views
from bcpkd_cli.engine import Member, TrainSpec, make_optimizer, train_lockstep
from bcpkd_cli.targets import OnlineTargets, TableTargets, view_batches
from bcpkd_cli.teachers.deterministic import DeterministicTeacher
from bcpkd_cli.losses import kd_loss
from bcpkd_cli.models import build_model, model_spec

PAIRS = [("resnet56", "resnet20"), ("wrn_40_2", "wrn_16_1")]
N_CLASSES = 100


def forward_flops(arch: str) -> int:
    model = build_model(model_spec(arch, (3, 32, 32), N_CLASSES, ())).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    return counter.get_total_flops()


def random_cache(folder: Path, n: int, views: int, seed: int = 0) -> Path:
    probs = torch.softmax(torch.randn(n, views, N_CLASSES, generator=torch.Generator().manual_seed(seed)), dim=2)
    return artifacts.save_cache(folder / f"bcp-{n}x{views}.safetensors", probs, {"n_views": views})


def anon_rss_mb() -> float:
    """RssAnon of this process (private memory; page-cache pages of mapped files are not counted)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_dataset(images: torch.Tensor, labels: torch.Tensor) -> Dataset:
    split = Split(images, labels, None)
    return Dataset(split, split, split, N_CLASSES, (3, 32, 32), "bench", 0)


def kd(alpha: float):
    return lambda logits, y, targets: kd_loss(logits, y, targets, alpha, 1.0, 1.0)


def epoch_times(pair: tuple[str, str], images, labels, cache, args) -> dict[str, list[float]]:
    """One epoch per variant through the library's training loop and batch builder (what `distill` runs)."""
    teacher_arch, student_arch = pair
    teacher = DeterministicTeacher(build_model(model_spec(teacher_arch, (3, 32, 32), N_CLASSES, ())).eval(),
                                   batch_size=args.batch)
    data, calibrate, index = bench_dataset(images, labels), CalibrateConfig(views=args.views), torch.arange(len(images))
    views_only = view_batches(data, calibrate, 0, [], torch.device("cpu"), index)

    def plain_batches(rows: torch.Tensor, epoch: int):
        return views_only(rows, epoch)[0], [None]

    batches = {"plain": plain_batches,
               "cached": view_batches(data, calibrate, 0, [TableTargets(cache)], torch.device("cpu"), index),
               "online": view_batches(data, calibrate, 0, [OnlineTargets(teacher, 1.0, {})], torch.device("cpu"), index)}
    losses = {"plain": lambda logits, y, _targets: F.cross_entropy(logits, y, reduction="none"),
              "cached": kd(1.0), "online": kd(1.0)}
    members = {}
    for variant in batches:  # one student per variant, same initialisation
        torch.manual_seed(0)
        student = build_model(model_spec(student_arch, (3, 32, 32), N_CLASSES, ()))
        members[variant] = Member(student, losses[variant], TrainSpec(1, args.batch, Optimizer.sgd, 0.01, 0.9, 0.0, 0))

    def one_epoch(variant: str) -> float:
        started = time.perf_counter()
        train_lockstep([members[variant]], labels, 1, args.batch, 0, variant, batches[variant])
        return time.perf_counter() - started

    for variant in batches:  # warm-up
        one_epoch(variant)
    times: dict[str, list[float]] = {variant: [] for variant in batches}
    order = list(batches)
    for repeat in range(args.repeats):
        for variant in order[repeat % 3:] + order[:repeat % 3]:  # each variant leads in turn
            times[variant].append(one_epoch(variant))
    return times


def read_speed(images, labels, cache, args) -> tuple[float, float]:
    """Median time to gather a batch's targets, and of one student training step on that batch."""
    student = build_model(model_spec("wrn_16_1", (3, 32, 32), N_CLASSES, ())).train()
    optimizer = make_optimizer(student.parameters(), TrainSpec(1, args.batch, Optimizer.sgd, 0.01, 0.9, 0.0, 0))
    sampler = ViewSampler(len(images), args.views, seed=1)
    view_ids = select_views(args.views, seed=0)
    reads, steps = [], []
    for step in range(args.repeats * 4):
        rows = torch.randint(0, len(images), (args.batch,), generator=torch.Generator().manual_seed(step))
        slots = sampler.slots(rows, step)
        started = time.perf_counter()
        targets = cache[rows, slots].float()
        reads.append(time.perf_counter() - started)
        started = time.perf_counter()
        loss = kd_loss(student(apply_views(images[rows], view_ids[slots])), labels[rows], targets, 1.0, 1.0, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        optimizer.step()
        steps.append(time.perf_counter() - started)
    return statistics.median(reads), statistics.median(steps)


def memory_by_views(folder: Path, n: int = 50_000) -> list[tuple[int, float, float]]:
    """(views, cache MB on disk, growth of anonymous RSS in MB after mapping + one epoch of reads)."""
    rows = []
    for views in (1, 8, 32):
        path = random_cache(folder, n, views, seed=views)
        before = anon_rss_mb()
        probs, _ = artifacts.load_cache(path, {})
        sampler = ViewSampler(n, views, seed=0)
        order = torch.randperm(n)
        for start in range(0, n, 128):
            batch_rows = order[start:start + 128]
            probs[batch_rows, sampler.slots(batch_rows, 0)].float()
        rows.append((views, path.stat().st_size / 2**20, anon_rss_mb() - before))
        del probs
        path.unlink()
    return rows


def sweep_times(images, labels, cache, args, pair=PAIRS[0]) -> dict[str, list[float]]:
    """Epoch times of a grid of students: lockstep vs one after another, cached and online targets."""
    data = bench_dataset(images, labels)
    calibrate = CalibrateConfig(views=args.views)
    teacher = DeterministicTeacher(build_model(model_spec(pair[0], (3, 32, 32), N_CLASSES, ())).eval(),
                                   batch_size=args.batch)
    alphas = [0.25 * (k + 1) for k in range(args.grid)]
    index = torch.arange(len(images))

    def members() -> list[Member]:
        out = []
        for alpha in alphas:
            torch.manual_seed(0)
            student = build_model(model_spec(pair[1], (3, 32, 32), N_CLASSES, ()))
            out.append(Member(student, kd(alpha), TrainSpec(1, args.batch, Optimizer.sgd, 0.01, 0.9, 0.0, 0)))
        return out

    def epoch(source: TableTargets | OnlineTargets, lockstep: bool) -> float:
        group = members()
        started = time.perf_counter()
        for chunk in ([group] if lockstep else [[m] for m in group]):
            batches = view_batches(data, calibrate, 0, [source] * len(chunk), torch.device("cpu"), index)
            train_lockstep(chunk, labels, 1, args.batch, 0, "sweep", batches)
        return time.perf_counter() - started

    sources = {"cached": TableTargets(cache), "online": OnlineTargets(teacher, 1.0, {})}
    times: dict[str, list[float]] = {f"{kind} {way}": [] for kind in sources for way in ("lockstep", "separate")}
    for _ in range(args.repeats):
        for kind, source in sources.items():
            for way in ("lockstep", "separate"):
                times[f"{kind} {way}"].append(epoch(source, way == "lockstep"))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024, help="training images per epoch")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--grid", type=int, default=4, help="students in the sweep")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, N_CLASSES, (args.n,), generator=gen)
    print(f"{args.n} images per epoch, batch {args.batch}, {args.views} views, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} epochs")
    with tempfile.TemporaryDirectory() as folder:
        cache, _ = artifacts.load_cache(random_cache(Path(folder), args.n, args.views), {})
        print("\n| teacher -> student | plain (s) | cached (s) | online (s) | cached / plain | online / cached "
              "| FLOP prediction |")
        print("|---|---|---|---|---|---|---|")
        for pair in PAIRS:
            times = epoch_times(pair, images, labels, cache, args)
            plain, cached, online = (statistics.median(times[v]) for v in ("plain", "cached", "online"))
            predicted = 1 + forward_flops(pair[0]) / (3 * forward_flops(pair[1]))
            print(f"| {pair[0]} -> {pair[1]} | {plain:.3f} | {cached:.3f} | {online:.3f} | {cached / plain:.3f} "
                  f"| {online / cached:.2f} | {predicted:.2f} |")

        read, step = read_speed(images, labels, cache, args)
        print(f"\ncache read of a batch's targets {read * 1e3:.3f} ms; wrn_16_1 training step {step * 1e3:.1f} ms; "
              f"step / read = {step / read:.0f}x (target: at least 10x)")
        times = sweep_times(images, labels, cache, args)
        print(f"\n{args.grid} students ({PAIRS[0][1]}, alpha grid; online teacher {PAIRS[0][0]}), one epoch:")
        print("| targets | lockstep (s) | one after another (s) | one after another / lockstep |")
        print("|---|---|---|---|")
        for kind in ("cached", "online"):
            lock, apart = (statistics.median(times[f"{kind} {way}"]) for way in ("lockstep", "separate"))
            print(f"| {kind} | {lock:.3f} | {apart:.3f} | {apart / lock:.2f} |")
        print("\n| views | cache on disk (MB) | anonymous RSS growth (MB) |")
        print("|---|---|---|")
        for views, size_mb, growth_mb in memory_by_views(Path(folder)):
            print(f"| {views} | {size_mb:.0f} | {growth_mb:.1f} |")


if __name__ == "__main__":
    main()
