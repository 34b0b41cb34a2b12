"""Training throughput of distillation students on cached targets, in images per second.

    python bench/student_throughput.py [--device cuda] [--archs resnet18,wrn_16_2] [--batch 128] [--steps 50]

Runs the library's own lockstep training loop (`train_lockstep`, as `bcpkd distill` does) with
device-resident uint8 images, exact pad-4 crop x flip views and targets gathered from an [N, V, C]
cache, for each architecture and for precision auto (bf16 autocast + channels_last on CUDA,
float32 on CPU) and float32, optionally compiled. Prints images per second (medians over 3 timed
runs after a warm-up run).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bcpkd_cli.config import CalibrateConfig, Optimizer, Precision
from bcpkd_cli.data import Dataset, Split
from bcpkd_cli.engine import Member, TrainSpec, prepare_for_device, train_lockstep
from bcpkd_cli.losses import kd_loss
from bcpkd_cli.models import build_model, model_spec
from bcpkd_cli.targets import TableTargets, view_batches


def images_per_second(arch: str, precision: Precision, compile_model: bool, args, device: torch.device) -> float:
    n = args.batch * args.steps
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device),
                  torch.randint(0, 100, (n,), generator=gen).to(device), None)
    data = Dataset(split, split, split, 100, (3, 32, 32), "bench", 0)
    cache = torch.softmax(torch.randn(n, 8, 100, generator=gen), dim=2).to(device)
    batches = view_batches(data, CalibrateConfig(views=8), 0, [TableTargets(cache)], device, torch.arange(n))
    model = prepare_for_device(build_model(model_spec(arch, (3, 32, 32), 100, ())), device, precision)
    spec = TrainSpec(1, args.batch, Optimizer.sgd, 0.01, 0.9, 5e-4, 0, (), precision, compile_model)
    member = Member(model, lambda logits, y, t: kd_loss(logits, y, t, 1.0, 1.0, 1.0), spec)
    times = []
    for _ in range(4):  # the first run warms up (and compiles)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        train_lockstep([member], split.labels, 1, args.batch, 0, arch, batches)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return n / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", default="resnet18,wrn_16_2")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="steps per timed run")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; batch {args.batch}, {args.steps} steps per run, median of 3 runs")
    print("| student | precision | compiled | images/s |")
    print("|---|---|---|---|")
    for arch in args.archs.split(","):
        for precision in (Precision.auto, Precision.float32):
            for compile_model in ((False, True) if args.compile else (False,)):
                rate = images_per_second(arch, precision, compile_model, args, device)
                label = "bf16 + channels_last" if device.type == "cuda" and precision == Precision.auto else "float32"
                print(f"| {arch} | {label} | {'yes' if compile_model else 'no'} | {rate:.0f} |")


if __name__ == "__main__":
    main()
