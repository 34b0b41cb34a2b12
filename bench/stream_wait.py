"""Data wait of store and stream side by side: the share of a training step spent building its batch.

    python bench/stream_wait.py --root DIR --image-size 128 [--arch torchvision:resnet18] [--batch 64]
                                [--steps 12] [--workers 0]

DIR is an image folder (e.g. the ImageNet-shaped miniature of recipes/examples/make_imagenet_miniature.py).
Both variants load the folder through `load_dataset` (decode=store: the uint8 store, decoded first if
missing; decode=stream: the files of every batch, decoded by the loader's worker processes, which read the
planned batches ahead) and train the same network with random-resized-crop views for the same rows, in
one process. Batch building (rows, views) and the training step are timed step by step; the first two
steps are warm-up. First prints the cost of decoding one file in one process; then medians: batch building, whole step, and the share; and the pixels of the two
variants' batches are checked equal.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bcpkd_cli.choices import Crop, Decode
from bcpkd_cli.config import DataConfig
from bcpkd_cli.data import images, load_dataset
from bcpkd_cli.data.decode import decode_files
from bcpkd_cli.models import build_model, model_spec


def run(root: Path, decode: str, args: argparse.Namespace) -> tuple[list[float], list[float], torch.Tensor]:
    data = load_dataset(DataConfig(name="imagefolder", root=str(root), image_size=args.image_size,
                                   decode=Decode(decode),
                                   crop=Crop.resized, loader_workers=args.workers))
    data = data.to(torch.device(args.device))  # on CUDA: the store on the device, JPEGs decoded by nvJPEG
    train = data.train
    torch.manual_seed(0)
    model = build_model(model_spec(args.arch, data.input_shape, data.n_classes, (), stats=data.stats)).to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    batches = [order[i * args.batch:(i + 1) * args.batch] for i in range(args.steps + 2)]
    if hasattr(train.inputs, "plan"):
        train.inputs.plan(batches)
    build, step, first = [], [], None
    for i, rows in enumerate(batches):
        started = time.perf_counter()
        view_ids = (rows * 7 + i) % 162
        inputs = data.views.apply(train.inputs[rows], rows, view_ids)
        built = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(inputs), train.labels[rows.to(train.labels.device)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if inputs.is_cuda:
            torch.cuda.synchronize()  # the step's kernels are part of the step
        done = time.perf_counter()
        first = inputs if first is None else first
        if i >= 2:
            build.append(built - started)
            step.append(done - started)
    return build, step, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--arch", default="torchvision:resnet18")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--workers", type=int, default=0, help="decoding workers (0: one per core, at most 8)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (stream then decodes JPEGs with nvJPEG)")
    args = parser.parse_args()
    paths = images.list_image_folder(args.root / "train")[0][:256]
    started = time.perf_counter()
    decode_files(paths, (3, args.image_size, args.image_size))
    per_image = (time.perf_counter() - started) / len(paths) * 1e3
    print(f"decoding one JPEG at {args.image_size} px in this process (read, decode, resize, centre crop): "
          f"{per_image:.2f} ms (mean of {len(paths)})")
    firsts = {}
    print(f"{args.arch} at {args.image_size} px, batch {args.batch}, random-resized crops, "
          f"{torch.get_num_threads()} threads, medians of {args.steps} steps")
    for decode in ("store", "stream"):
        build, step, firsts[decode] = run(args.root, decode, args)
        b, s = statistics.median(build) * 1e3, statistics.median(step) * 1e3
        print(f"decode={decode}: batch {b:.1f} ms, whole step {s:.1f} ms, data wait {100 * b / s:.2f}% of the step")
    if args.device == "cpu":  # nvJPEG's pixels differ slightly from the CPU decoder's
        assert torch.equal(firsts["store"], firsts["stream"]), "stream and store batches differ"
        print("the first batch's pixels are equal through store and stream")
    else:
        difference = (firsts["store"].float() - firsts["stream"].float()).abs().mean().item()
        print(f"mean absolute pixel difference, CPU decoder (store) vs nvJPEG (stream): {difference:.2f} levels")


if __name__ == "__main__":
    main()
