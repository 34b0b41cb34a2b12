"""Training throughput at torch's default intra-op thread count and at the count bcpkd chooses, with and without
load.

    python bench/threads.py [--repeats 3] [--load N] [--seconds 1]

Two workloads, in examples per second: a synthetic mlp student (30-128-128-5, the distill default) trained
with SGD on soft targets at batch 8 (the distill default) for up to one epoch, and a resnet20 forward/backward
on batches of 32 random 32x32 images; each measurement runs whole steps until `--seconds` have passed (after
one warm-up step). Two machine states: as found (idle, or whatever else runs), and loaded by N more busy-loop
processes this script starts (default: one per CPU allowed) and stops again. Three thread counts, set with
torch.set_num_threads in this one process and interleaved (their order rotates between repeats): torch's
default (what this process started with), bcpkd's choice (`bcpkd_cli.threads.choose_threads` for this
process's CPUs; under load the busy processes count as the loader workers that decode images beside a
streamed run, the load the rule can see), and 1. Prints medians over the repeats, the ratios to the default,
and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bcpkd_cli.models import build_model, model_spec
from bcpkd_cli.threads import choose_threads, cpu_limits, local_processes


def mlp_workload(n: int = 22500, batch: int = 8):
    """One step of the synthetic mlp student at a time; yields the examples of each step."""
    gen = torch.Generator().manual_seed(0)
    x, targets = torch.randn(n, 30, generator=gen), torch.softmax(torch.randn(n, 5, generator=gen), dim=1)
    model = build_model(model_spec("mlp", (30,), 5, (128, 128)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(i: int) -> int:
        rows = slice(i * batch % n, i * batch % n + batch)
        loss = F.cross_entropy(model(x[rows]), targets[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return batch
    return step


def resnet_workload(batch: int = 32):
    """A resnet20 forward/backward on a batch of random 32x32 images."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    model = build_model(model_spec("resnet20", (3, 32, 32), 10, ()))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(i: int) -> int:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return batch
    return step


def examples_per_second(step, threads: int, seconds: float, epoch_steps: int) -> float:
    torch.set_num_threads(threads)
    step(0)  # warm-up
    done, i, started = 0, 1, time.perf_counter()
    while time.perf_counter() - started < seconds and i <= epoch_steps:
        done += step(i)
        i += 1
    return done / (time.perf_counter() - started)


def start_load(n: int) -> list[subprocess.Popen]:
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(0.3)  # spinning
    return busy


def stop_load(busy: list[subprocess.Popen]) -> None:
    for process in busy:
        process.terminate()
    for process in busy:
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load", type=int, default=0, help="busy-loop processes of the loaded state (0: one per CPU)")
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per measurement")
    args = parser.parse_args()
    default, cpus = torch.get_num_threads(), cpu_limits()
    load = args.load or cpus.usable
    chosen = {"as found": choose_threads(cpus.usable, local_processes()),
              f"+{load} busy loops": choose_threads(cpus.usable, local_processes(), load)}
    variants = {"default": default, "chosen": None, "1 thread": 1}
    workloads = {"mlp student, batch 8": (mlp_workload(), 22500 // 8),
                 "resnet20, batch 32": (resnet_workload(), 10 ** 6)}
    load_before = os.getloadavg()[0]
    rates: dict[tuple, list[float]] = {}
    for repeat in range(args.repeats):
        for state, threads_chosen in chosen.items():
            busy = start_load(load) if state != "as found" else []
            try:
                order = list(variants)[repeat % 3:] + list(variants)[:repeat % 3]
                for variant in order:
                    threads = variants[variant] or threads_chosen
                    for name, (step, epoch_steps) in workloads.items():
                        rate = examples_per_second(step, threads, args.seconds, epoch_steps)
                        rates.setdefault((state, name, variant), []).append(rate)
            finally:
                stop_load(busy)
    torch.set_num_threads(default)
    print(f"{cpus}; torch's default {default} threads; {args.repeats} repeats of {args.seconds:g} s per "
          f"measurement; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print("| machine | workload | default: threads, ex/s | chosen: threads, ex/s | 1 thread: ex/s "
          "| chosen / default | 1 thread / default |")
    print("|---|---|---|---|---|---|---|")
    for state, threads_chosen in chosen.items():
        for name in workloads:
            median = {v: statistics.median(rates[(state, name, v)]) for v in variants}
            print(f"| {state} | {name} | {default}, {median['default']:.0f} | {threads_chosen}, {median['chosen']:.0f} "
                  f"| {median['1 thread']:.0f} | {median['chosen'] / median['default']:.2f}x "
                  f"| {median['1 thread'] / median['default']:.2f}x |")


if __name__ == "__main__":
    main()
