"""Top-k BCP caches against the dense cache: bytes per example, and what the student learns.

    python bench/topk.py [--classes 100,1000] [--ks 1,5,10,20] [--n 20000] [--epochs 2]

On the synthetic benchmark with C classes (exact BCPs known), the cache holds the exact BCPs; students are
trained in lockstep through the library's own loop (same batches, same initialisation) against the dense
cache and against its top-k forms. Prints, per C and K: bytes per example of the cache (float16
probabilities, int32 ids), the student's test accuracy, and the mean KL(dense-target student || top-k
student) on the test split (nats), beside the KL of a dense-target student from another initialisation (the
floor that any difference of targets is measured against).
"""

from __future__ import annotations

import argparse

import torch

from bcpkd_cli.config import CalibrateConfig, DataConfig, Optimizer, Precision
from bcpkd_cli.data import load_dataset
from bcpkd_cli.engine import Member, TrainSpec, train_lockstep
from bcpkd_cli.losses import kd_loss
from bcpkd_cli.models import build_model, model_spec, predict_logits
from bcpkd_cli.targets import TableTargets, view_batches
from bcpkd_cli.topk import TopKProbs, compress


def run(n_classes: int, ks: list[int], args) -> list[tuple]:
    data = load_dataset(DataConfig(n_classes=n_classes, dim=args.dim, n_train=args.n, n_heldout=1000, n_test=5000))
    dense = data.train.true_bcp[:, None, :].half()  # [N, 1, C], float16 as a cache would store it
    sources = [TableTargets(dense), TableTargets(dense)]  # the second: another initialisation (the noise floor)
    for k in ks:
        values, ids = compress(dense.float(), k)
        sources.append(TableTargets(TopKProbs(values.half(), ids, n_classes)))
    members = []
    for i, _ in enumerate(sources):
        torch.manual_seed(1 if i == 1 else 0)  # every student starts from the same weights but the reference
        model = build_model(model_spec("mlp", data.input_shape, n_classes, (128, 128), stats=data.stats))
        spec = TrainSpec(args.epochs, 64, Optimizer.sgd, 0.05, 0.9, 0.0, 0, (), Precision.float32)
        members.append(Member(model, lambda logits, y, t: kd_loss(logits, y, t, 1.0, 1.0, 1.0), spec))
    train_lockstep(members, data.train.labels, args.epochs, 64, 0, f"{n_classes} classes",
                   view_batches(data, CalibrateConfig(), 0, sources, torch.device("cpu"), torch.arange(args.n)))
    test = data.test
    log_probs = [torch.log_softmax(predict_logits(m.model, test.inputs), dim=1) for m in members]
    rows = []
    for k, member_log_probs in zip(["dense", "dense, other init", *ks], log_probs):
        accuracy = (member_log_probs.argmax(1) == test.labels).float().mean().item()
        kl = (log_probs[0].exp() * (log_probs[0] - member_log_probs)).sum(1).mean().item()
        size = 6 * k if isinstance(k, int) else 2 * n_classes  # float16 values (+ int32 ids)
        rows.append((n_classes, k, size, size / (2 * n_classes), accuracy, kl))
    return rows


def read_speed(n_classes: int, k: int, n: int = 50_000, batch: int = 256, batches: int = 400,
               repeats: int = 7) -> tuple[float, float]:
    """Microseconds to read one batch of targets [B, C] from a dense float16 cache and from its top-k form
    (rows gathered, then expanded with one scatter): medians over repeats, the two interleaved."""
    import statistics
    import time

    gen = torch.Generator().manual_seed(0)
    dense = torch.softmax(torch.randn(n, 1, n_classes, generator=gen) * 3, dim=2).half()
    values, ids = compress(dense.float(), k)
    sources = {"dense": TableTargets(dense), "top-k": TableTargets(TopKProbs(values.half(), ids, n_classes))}
    rows = [torch.randint(n, (batch,), generator=gen) for _ in range(batches)]
    slots = torch.zeros(batch, dtype=torch.long)
    times: dict[str, list[float]] = {name: [] for name in sources}
    for _ in range(repeats):
        for name, source in sources.items():
            started = time.perf_counter()
            for r in rows:
                source.batch(r, slots, 0, None, None, {})
            times[name].append((time.perf_counter() - started) / batches * 1e6)
    return statistics.median(times["dense"]), statistics.median(times["top-k"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="100,1000")
    parser.add_argument("--ks", default="1,5,10,20")
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    print("| classes | K | bytes per example | / dense | student accuracy | KL(dense student || this) |")
    print("|---|---|---|---|---|---|")
    for n_classes in map(int, args.classes.split(",")):
        for c, k, size, ratio, accuracy, kl in run(n_classes, [int(k) for k in args.ks.split(",")], args):
            print(f"| {c} | {k} | {size} | {ratio:.3f} | {accuracy:.4f} | {kl:.4f} |", flush=True)
    print("\n| classes | K | read a batch of 256 targets, dense (us) | top-k (us) | top-k / dense |")
    print("|---|---|---|---|---|")
    for n_classes in map(int, args.classes.split(",")):
        dense_us, top_us = read_speed(n_classes, 10)
        print(f"| {n_classes} | 10 | {dense_us:.1f} | {top_us:.1f} | {top_us / dense_us:.2f} |", flush=True)


if __name__ == "__main__":
    main()
