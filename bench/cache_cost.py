"""What a BCP cache costs per teacher kind, relative to one deterministic pass over the same data.

    python bench/cache_cost.py [--arch resnet20] [--n 1024] [--samples 4] [--repeats 5]

Builds the predictive of each kind on the same N inputs (image models: random 32x32 uint8 images,
100 classes; mlp: 30-dimensional inputs, 5 classes) with the library's own teachers: deterministic,
vi with S weight samples, mc-dropout with S masks, ensemble with M = S members, and a last-layer
Kron Laplace posterior with the probit link, once in bcpkd's closed form and once through
laplace-torch's own predictive (dense per-sample Jacobians). The variants run interleaved, one
after another inside each repeat, so they share the machine's state; the script prints medians,
each one's ratio to the deterministic pass, and that ratio divided by S (targets: about 1 for the
sampled kinds, S samples cost S passes; at most 1.5 for the Laplace probit cache).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import warnings

from bcpkd_cli.config import LaplaceConfig, VIConfig
from bcpkd_cli.models import build_model, model_spec
from bcpkd_cli.teachers.deterministic import DeterministicTeacher
from bcpkd_cli.teachers.ensemble import EnsembleTeacher
from bcpkd_cli.teachers.laplace import LaplaceTeacher
from bcpkd_cli.teachers.mc_dropout import MCDropoutTeacher
from bcpkd_cli.teachers.vi import VITeacher, to_bayesian


class LaplaceTorchProbit:
    """laplace-torch's own GLM probit predictive of the same posterior, in the same chunks."""

    def __init__(self, teacher: LaplaceTeacher):
        self.teacher = teacher

    @torch.no_grad()
    def predict_probs(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        size = self.teacher.batch_size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.cat([self.teacher.la(inputs[i:i + size], pred_type="glm", link_approx="probit")
                              for i in range(0, len(inputs), size)])


def laplace_teacher(spec: dict, inputs: torch.Tensor, n_classes: int, batch: int) -> LaplaceTeacher:
    teacher = LaplaceTeacher(build_model(spec), LaplaceConfig(), batch_size=batch)
    teacher.fit(inputs, torch.randint(0, n_classes, (len(inputs),)), batch_size=batch)
    return teacher


def teachers(arch: str, input_shape: tuple[int, ...], n_classes: int, samples: int, batch: int,
             inputs: torch.Tensor) -> dict:
    hidden = (256, 256)
    spec = model_spec(arch, input_shape, n_classes, hidden)
    dropout_spec = model_spec(arch, input_shape, n_classes, hidden, dropout=0.2)
    laplace = laplace_teacher(spec, inputs[:batch], n_classes, batch)
    return {
        "deterministic": DeterministicTeacher(build_model(spec).eval(), batch_size=batch),
        f"vi (S={samples})": VITeacher(to_bayesian(build_model(spec), VIConfig(), from_base=False), spec, samples,
                                       batch_size=batch),
        f"mc-dropout (S={samples})": MCDropoutTeacher(build_model(dropout_spec), samples, batch_size=batch),
        f"ensemble (M={samples})": EnsembleTeacher([build_model(spec) for _ in range(samples)], batch_size=batch),
        "laplace kron probit, closed form": laplace,
        "laplace kron probit, laplace-torch": LaplaceTorchProbit(laplace),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet20", help="any architecture name (mlp: synthetic inputs)")
    parser.add_argument("--n", type=int, default=1024, help="examples in the cache")
    parser.add_argument("--samples", type=int, default=4, help="S samples / M members")
    parser.add_argument("--batch", type=int, default=256, help="inference batch size")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.arch == "mlp":
        input_shape, n_classes = (30,), 5
        inputs = torch.randn(args.n, 30)
    else:
        input_shape, n_classes = (3, 32, 32), 100
        inputs = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8)
    index = torch.arange(args.n)
    kinds = teachers(args.arch, input_shape, n_classes, args.samples, args.batch, inputs)
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for name, teacher in kinds.items():  # warm-up
        teacher.predict_probs(inputs[:args.batch], index[:args.batch])
    for _ in range(args.repeats):
        for name, teacher in kinds.items():
            started = time.perf_counter()
            teacher.predict_probs(inputs, index)
            times[name].append(time.perf_counter() - started)

    base = statistics.median(times["deterministic"])
    print(f"{args.arch}, {args.n} examples, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print("| teacher | cache build (s) | / deterministic | / (draws x deterministic) |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        draws = args.samples if name.startswith(("vi", "mc-dropout", "ensemble")) else 1
        print(f"| {name} | {median:.3f} | {median / base:.2f} | {median / base / draws:.2f} |")


if __name__ == "__main__":
    main()
