"""The cache build at the teacher's best speed, and when a cache pays against online distillation.

    python bench/cache_speed.py [--teacher resnet56] [--student resnet20] [--n 512] [--views 4] [--repeats 3]

1. Cache build: images/s of `build_cache_probs` (what `calibrate` runs) at several inference batches
   (calibrate.batch_size; 0 is the automatic choice of this device), each cache checked equal bit for bit to
   the automatic one's (`equal` column; otherwise the largest difference).
2. The same teacher's forward inside training: one epoch of online distillation through the library's loop
   (`train_lockstep` with `view_batches` and `OnlineTargets`, training batch 128), the teacher's calls timed
   inside it -> teacher images/s while a student trains. The goal is a cache build at least 0.95 of that.
3. Break-even: a student epoch with cached targets against one with the teacher run on every batch (interleaved);
   the cache of V views costs (build seconds) / (online - cached seconds per epoch) student epochs.
On CUDA (--device cuda) it also builds the automatic cache in bf16 autocast with channels_last and prints its
speed and largest difference from the float32 cache (bcpkd builds caches in float32).
Random 32x32 uint8 images, 100 classes, random networks (their speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bcpkd_cli.calibration import build_cache_probs, inference_batch
from bcpkd_cli.config import CalibrateConfig, Optimizer, Precision
from bcpkd_cli.data import Dataset, Split
from bcpkd_cli.engine import Member, TrainSpec, prepare_for_device, train_lockstep, training_precision
from bcpkd_cli.losses import kd_loss
from bcpkd_cli.models import build_model, model_spec
from bcpkd_cli.targets import OnlineTargets, TableTargets, view_batches
from bcpkd_cli.teachers.deterministic import DeterministicTeacher

N_CLASSES, TRAIN_BATCH = 100, 128


class TimedTeacher(DeterministicTeacher):
    """A deterministic teacher that adds up the seconds and images of its forward passes."""

    seconds, images = 0.0, 0

    def predictive_at(self, inputs, index):
        if inputs.is_cuda:
            torch.cuda.synchronize(inputs.device)
        started = time.perf_counter()
        predictive = super().predictive_at(inputs, index)
        if inputs.is_cuda:
            torch.cuda.synchronize(inputs.device)
        self.seconds += time.perf_counter() - started
        self.images += len(inputs)
        return predictive


def kd(logits, labels, targets):
    return kd_loss(logits, labels, targets, 1.0, 1.0, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--n", type=int, default=512, help="training images")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--batches", default="0,32,64,128,256,512,1024", help="calibrate.batch_size values")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device)
    labels = torch.randint(0, N_CLASSES, (args.n,), generator=gen).to(device)
    split = Split(images, labels, None)
    data = Dataset(split, split, split, N_CLASSES, (3, 32, 32), "bench", 0)
    torch.manual_seed(0)
    teacher = TimedTeacher(build_model(model_spec(args.teacher, (3, 32, 32), N_CLASSES, ())).to(device).eval())
    batches = [int(b) for b in args.batches.split(",")]
    cfgs = {b: CalibrateConfig(views=args.views, batch_size=b) for b in batches}
    chosen = inference_batch(cfgs[0], device) if 0 in cfgs else None

    def build(cfg: CalibrateConfig) -> tuple[float, torch.Tensor]:
        started = time.perf_counter()
        probs = build_cache_probs(teacher, data, 1.0, cfg)
        return time.perf_counter() - started, probs

    # 2 and 3: cached and online student epochs (one student each, same initialisation), teacher timed inside
    index = torch.arange(args.n)
    cache = torch.softmax(torch.randn(args.n, args.views, N_CLASSES, generator=gen), dim=2).to(device)
    sources = {"cached": TableTargets(cache), "online": OnlineTargets(teacher, 1.0, {})}
    members = {}
    for name in sources:
        torch.manual_seed(0)
        student = prepare_for_device(build_model(model_spec(args.student, (3, 32, 32), N_CLASSES, ())), device,
                                     Precision.auto)
        members[name] = Member(student, kd, TrainSpec(1, TRAIN_BATCH, Optimizer.sgd, 0.01, 0.9, 0.0, 0))

    def epoch(name: str) -> float:
        group = view_batches(data, CalibrateConfig(views=args.views), 0, [sources[name]], device, index)
        started = time.perf_counter()
        train_lockstep([members[name]], labels, 1, TRAIN_BATCH, 0, name, group)
        return time.perf_counter() - started

    build(cfgs[batches[0]])  # warm-up
    epoch("online")
    builds: dict[int, list[float]] = {b: [] for b in batches}
    epochs: dict[str, list[float]] = {name: [] for name in sources}
    inside: list[float] = []
    reference, equal = None, {}
    for repeat in range(args.repeats):
        for b in batches[repeat % len(batches):] + batches[:repeat % len(batches)]:  # each leads in turn
            seconds, probs = build(cfgs[b])
            builds[b].append(seconds)
            reference = probs if b == batches[0] and reference is None else reference
            equal[b] = "equal" if torch.equal(probs, reference) else f"{(probs - reference).abs().max().item():.1e}"
        for name in (("cached", "online") if repeat % 2 == 0 else ("online", "cached")):
            teacher.seconds, teacher.images = 0.0, 0
            epochs[name].append(epoch(name))
            if name == "online":
                inside.append(teacher.images / teacher.seconds)

    rate_inside = statistics.median(inside)
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"teacher {args.teacher}, student {args.student}, {args.n} images x {args.views} views, {threads}, "
          f"median of {args.repeats}")
    print(f"teacher forward inside online training (batch {TRAIN_BATCH}): {rate_inside:.0f} images/s")
    print(f"\n| calibrate.batch_size | build (s) | cache images/s | / inside training | rows vs batch {batches[0]} |")
    print("|---|---|---|---|---|")
    for b in batches:
        seconds = statistics.median(builds[b])
        rate = args.n * args.views / seconds
        name = f"0 (automatic: {chosen})" if b == 0 else str(b)
        print(f"| {name} | {seconds:.2f} | {rate:.0f} | {rate / rate_inside:.2f} | {equal[b]} |")
    cached, online = statistics.median(epochs["cached"]), statistics.median(epochs["online"])
    auto_build = statistics.median(builds[batches[0]])
    print(f"\nstudent epoch: cached {cached:.2f} s, online {online:.2f} s; cache build (batch {batches[0]}) "
          f"{auto_build:.2f} s = {auto_build / (online - cached):.2f} student epochs of online distillation "
          f"(break-even; {auto_build / (online - cached) / args.views:.2f} per view)")

    if device.type == "cuda":
        fast = TimedTeacher(prepare_for_device(teacher.model, device, Precision.auto).eval())
        started = time.perf_counter()
        with training_precision(device, Precision.auto):
            low = build_cache_probs(fast, data, 1.0, cfgs[batches[0]])
        seconds = time.perf_counter() - started
        print(f"bf16 autocast + channels_last cache: {args.n * args.views / seconds:.0f} images/s, largest difference "
              f"from float32 {(low.float() - reference).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
