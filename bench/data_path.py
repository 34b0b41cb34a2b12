"""The data path of image distillation: decoding happens once, and a step hardly waits for its batch.

    python bench/data_path.py --root data/cifar10-jpeg [--arch wrn_16_1] [--batch 128] [--repeats 30]

1. Loads the ImageFolder training split twice through the uint8 store: the first load of a fresh
   store decodes every JPEG, the second must decode nothing.
2. Times, interleaved step by step, building a distillation batch (row gather, one exact
   augmentation view per image, gather of the view's cached target) and a full training step of the
   student on it; prints medians and the ratio batch time / step time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bcpkd_cli.data import images
from bcpkd_cli.data.views import ViewSampler, apply_views, select_views
from bcpkd_cli.losses import kd_loss
from bcpkd_cli.models import build_model, model_spec


def load_twice(root: Path, store: Path) -> tuple[float, float, torch.Tensor]:
    paths, labels, _, _ = images.list_image_folder(root)
    started = time.perf_counter()
    pixels, _, decoded_first, _ = images.load_or_decode(root, "train", paths, labels, store)
    first = time.perf_counter() - started
    started = time.perf_counter()
    _, _, decoded_second, _ = images.load_or_decode(root, "train", paths, labels, store)
    second = time.perf_counter() - started
    assert decoded_first and not decoded_second, "the second load must come from the store"
    return first, second, pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="ImageFolder root with train/<class>/*.jpg")
    parser.add_argument("--arch", default="wrn_16_1")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as store:  # a fresh store, so the first load really decodes
        first, second, pixels = load_twice(args.root / "train", Path(store))
    print(f"store: first load (decodes {len(pixels)} JPEGs) {first:.2f} s; second load {second:.2f} s, no decoding")

    n, n_classes = len(pixels), 10
    cache = torch.softmax(torch.randn(n, args.views, n_classes), dim=2)  # [N, V, C] stands in for a teacher's
    labels = torch.randint(0, n_classes, (n,))
    view_ids = select_views(args.views, seed=0)
    sampler = ViewSampler(n, args.views, seed=0)
    model = build_model(model_spec(args.arch, tuple(pixels.shape[1:]), n_classes, ()))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    order = torch.randperm(n)
    batch_times, step_times = [], []
    for i in range(args.repeats + 2):
        rows = order[i * args.batch:(i + 1) * args.batch]
        started = time.perf_counter()
        slots = sampler.slots(rows, epoch=0)
        inputs = apply_views(pixels[rows], view_ids[slots])
        targets = cache[rows, slots]
        batch_done = time.perf_counter()
        loss = kd_loss(model(inputs), labels[rows], targets, 1.0, 1.0, 1.0).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_done = time.perf_counter()
        if i >= 2:  # warm-up
            batch_times.append(batch_done - started)
            step_times.append(step_done - started)
    batch_ms, step_ms = statistics.median(batch_times) * 1e3, statistics.median(step_times) * 1e3
    print(f"{args.arch}, batch {args.batch}, {args.views} views, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}: batch {batch_ms:.2f} ms, whole step {step_ms:.1f} ms, "
          f"waiting for data {100 * batch_ms / step_ms:.2f}% of the step")


if __name__ == "__main__":
    main()
