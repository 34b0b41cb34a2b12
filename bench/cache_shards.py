"""Cache building in shards: wall time of building a BCP cache with 1 and with 2 torchrun processes.

    python bench/cache_shards.py [--n 20000] [--hidden 1024] [--samples 20] [--repeats 5]

Trains a small MC-dropout MLP teacher (hidden layers H-H, S masks) on the synthetic benchmark with N
training examples (one epoch: the cache's cost does not depend on the weights), then times
`ensure_cache(force=True)` (calibration on 500 held-out examples, the cache of N x S passes, the
written files) inside fresh worker processes, between barriers: one process and two torchrun processes
(gloo) with one thread each, and one process with torch's default threads. Interpreter start-up and
data loading are not timed. The variants run interleaved, one after another inside each repeat, so
they share the machine's state. Prints medians over the repeats, the speed-up, the load average, and
whether the two-process cache equals the one-process cache bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> None:
    """One process of a variant: build the cache once; rank 0 prints the seconds and threads as JSON."""
    from bcpkd_cli import artifacts
    from bcpkd_cli.calibration import ensure_cache
    from bcpkd_cli.config import CalibrateConfig, build_recipe
    from bcpkd_cli.data import load_dataset
    from bcpkd_cli.engine import join_process_group, leave_process_group

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    place = join_process_group(device)
    payload = artifacts.load_checkpoint(args.teacher, artifacts.TEACHER_FORMAT)
    data = load_dataset(build_recipe(payload["config"], "teacher").data)
    cfg = CalibrateConfig(batch_size=1024)
    if place.size > 1:
        dist.barrier()
    start = time.perf_counter()
    ensure_cache(Path(args.teacher), payload, data, cfg, 1.0, device, out=args.out, force=True)
    if place.size > 1:
        dist.barrier()
    seconds = time.perf_counter() - start
    if place.is_main:
        print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads()}))
    leave_process_group()


def run_variant(teacher: Path, out: Path, processes: int, threads: int) -> dict:
    """One timed build of a variant, in its own worker processes."""
    script = [str(Path(__file__).resolve()), "--worker", "--teacher", str(teacher), "--out", str(out),
              "--threads", str(threads)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] \
        if processes > 1 else [sys.executable]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    else:
        env.pop("OMP_NUM_THREADS", None)
    result = subprocess.run([*launch, *script], capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="training examples")
    parser.add_argument("--hidden", type=int, default=1024, help="width of the teacher's two hidden layers")
    parser.add_argument("--samples", type=int, default=20, help="MC-dropout masks per example")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from bcpkd_cli import artifacts

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        options = ["--set", f"data.n_train={args.n}", "--set", "data.n_heldout=500", "--set", "data.n_test=100",
                   "--set", f"teacher.hidden=[{args.hidden},{args.hidden}]", "--set", "teacher.epochs=1",
                   "--set", f"teacher.mc_dropout.samples={args.samples}", "--device", "cpu"]
        subprocess.run([sys.executable, "-m", "bcpkd_cli", "train-teacher", "--bayes", "mc-dropout",
                        "--out", str(work / "t"), *options], check=True, capture_output=True, cwd=REPO)
        variants = {"1 process, 1 thread": (1, 1), "2 processes, 1 thread each": (2, 1),
                    "1 process, default threads": (1, 0)}
        folders = {name: work / f"cache-{k}" for k, name in enumerate(variants)}
        load_before = os.getloadavg()[0]
        runs = [{name: run_variant(work / "t" / "teacher.pt", folders[name], *variants[name]) for name in variants}
                for _ in range(args.repeats)]
        load_after = os.getloadavg()[0]
        caches = [artifacts.load_cache(folders[name] / "bcp.safetensors", {})[0] for name in list(variants)[:2]]
        equal = torch.equal(caches[0][:], caches[1][:])
    seconds = {name: [run[name]["seconds"] for run in runs] for name in variants}
    base = statistics.median(seconds["1 process, 1 thread"])
    print(f"cache of {args.n} examples x {args.samples} MC-dropout masks, MLP {args.hidden}-{args.hidden}, "
          f"{os.cpu_count()} CPU cores, median of {args.repeats}, load average {load_before:.2f} before, "
          f"{load_after:.2f} after")
    print("| variant | threads per process | build seconds (median) | each repeat | speed-up vs 1 process, 1 thread |")
    print("|---|---|---|---|---|")
    for name in variants:
        median = statistics.median(seconds[name])
        print(f"| {name} | {runs[0][name]['threads']} | {median:.2f} | {', '.join(f'{s:.2f}' for s in seconds[name])} "
              f"| {base / median:.2f}x |")
    print(f"two-process cache equal to the one-process cache bit for bit: {equal}")


if __name__ == "__main__":
    main()
