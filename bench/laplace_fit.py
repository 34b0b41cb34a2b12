"""laplace-torch's last-layer Kron fit: its curvlinops backend against bcpkd's closed-form factors.

    python bench/laplace_fit.py [--classes 100,1000] [--n 256] [--repeats 3]

torchvision's ResNet-18 (random weights) on N random 32 x 32 images, last-layer Kron fit in batches of 64
(laplace-torch's fit with each backend: curvlinops' type-2 KFAC back-propagates one Hessian column per class;
`LastLayerKron` forms the factors with two matrix products). Both fits run interleaved in each repeat;
prints the medians per image, their ratio, and the largest relative difference of the factors.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from laplace import Laplace
from laplace.curvature import CurvlinopsGGN

from bcpkd_cli.models import HEAD_NAME, build_model, model_spec
from bcpkd_cli.teachers.laplace import RowBatches
from bcpkd_cli.teachers.laplace_fit import LastLayerKron


def fit(model, backend, x, y) -> tuple[float, Laplace]:
    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron",
                 last_layer_name=HEAD_NAME, backend=backend)
    started = time.perf_counter()
    la.fit(RowBatches(x, y, 64))
    return time.perf_counter() - started, la


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", default="100,1000")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"resnet18, {args.n} images at 32 px, batch 64, {torch.get_num_threads()} threads, "
          f"medians of {args.repeats} interleaved repeats")
    for n_classes in [int(c) for c in args.classes.split(",")]:
        torch.manual_seed(0)
        model = build_model(model_spec("torchvision:resnet18", (3, 32, 32), n_classes, ())).eval()
        x = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8)
        y = torch.randint(0, n_classes, (args.n,))
        times = {"curvlinops": [], "closed form": []}
        for _ in range(args.repeats):
            t_ref, ref = fit(model, CurvlinopsGGN, x, y)
            t_closed, closed = fit(model, LastLayerKron, x, y)
            times["curvlinops"].append(t_ref)
            times["closed form"].append(t_closed)
        worst = max(((a - b).abs().max() / b.abs().max()).item()
                    for fa, fb in zip(closed.H_facs.kfacs, ref.H_facs.kfacs) for a, b in zip(fa, fb))
        ref_ms, closed_ms = (statistics.median(times[k]) / args.n * 1e3 for k in ("curvlinops", "closed form"))
        print(f"{n_classes} classes: curvlinops {ref_ms:.2f} ms/image, closed form {closed_ms:.3f} ms/image, "
              f"{ref_ms / closed_ms:.0f}x; largest relative factor difference {worst:.1e}")


if __name__ == "__main__":
    main()
