"""Monte Carlo dropout: the network's dropout layers stay active at prediction, S masks averaged.

The mask of draw s for example i in dropout layer k is row r(seed, k, s, i) of a pool of
POOL_SIZE independent Bernoulli masks drawn once for (seed, k, s); r comes from the counter hash of
the example index (all rows of a batch in one hash). For one example the S masks are therefore exactly independent Bernoulli(1 - p)
masks (each draw has its own pool), and a cache does not depend on the batch layout, process or
device; examples only share masks with each other, which no per-example predictive sees. A gathered
pool row costs a quarter of hashing every unit (bench/cache_cost.py). The layers before the first
dropout layer are the same for every draw and run once per batch.

The deployable graph cannot index masks by example: it is the mean network (dropout off), or K fixed masks
per dropout layer shared by every example (mask s is row 0 of the pool of that layer and draw s).
"""

from __future__ import annotations

import torch
from torch import nn

from bcpkd_cli.choices import Bayes, teacher_label
from bcpkd_cli.config import TeacherConfig
from bcpkd_cli.models import build_model, feature_input
from bcpkd_cli.teachers.base import Teacher
from bcpkd_cli.teachers.deployed import Deployed, Tempered, check_draws, mixture, snapshot
from bcpkd_cli.teachers.index_noise import index_bits
from bcpkd_cli.teachers.sampled import SampledTeacher
from bcpkd_cli.teachers.training import TrainingRun, cross_entropy

POOL_SIZE = 1024  # masks per (dropout layer, draw); a power of two, so r = hash mod POOL_SIZE is uniform
ROW_STREAM = 1  # the counter-hash stream of the row choices (pools come from their own generators)


def mask_stream(layer_number: int, draw: int) -> int:
    """The noise stream of dropout layer k's draw s (separates pools and row choices)."""
    return 1 + layer_number * 65_536 + draw


def mask_pool(noise_seed: int, stream: int, width: int, rate: float) -> torch.Tensor:
    """POOL_SIZE masks [P, width], scaled: 1 / (1 - rate) where kept, 0 where dropped (CPU, float32)."""
    generator = torch.Generator().manual_seed(noise_seed * 1_000_003 + stream)
    keep = torch.rand(POOL_SIZE, width, generator=generator) >= rate
    return keep.float() / (1.0 - rate)


def mask_rows(noise_seed: int, index: torch.Tensor, count: int) -> torch.Tensor:
    """Example indices [B] -> pool rows [B, count] (int64): column s * L + k is dropout layer k's row in
    draw s of a network with L dropout layers, so the first S draws do not depend on S."""
    return index_bits(noise_seed, index, count, ROW_STREAM) % POOL_SIZE


def fixed_masks(noise_seed: int, layer_number: int, draws: int, width: int, rate: float) -> torch.Tensor:
    """Dropout layer k's masks of the first K draws for the deployable graph [K, 1, width], scaled like the pools:
    mask s is row 0 of the pool of (layer k, draw s), drawn alone (CPU, float32)."""
    generators = [torch.Generator().manual_seed(noise_seed * 1_000_003 + mask_stream(layer_number, s))
                  for s in range(draws)]
    keep = torch.stack([torch.rand(width, generator=g) >= rate for g in generators])  # [K, width]
    return (keep.float() / (1.0 - rate))[:, None, :]


class FixedMask(nn.Module):
    """A dropout layer with K fixed masks [K, 1, width]: hidden [B, width] (the first dropout layer, `expand`) or
    [K*B, width] -> [K*B, width], draw-major."""

    def __init__(self, masks: torch.Tensor, expand: bool):
        super().__init__()
        self.register_buffer("masks", masks)
        self.expand = expand

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        draws = hidden[None] if self.expand else hidden.unflatten(0, (self.masks.shape[0], -1))  # [1 or K, B, width]
        return (draws * self.masks).flatten(0, 1)


class FixedMasks(nn.Module):
    """The network with every dropout layer's K fixed masks: the mean of the K draws' softmax(logits / T_cal)."""

    def __init__(self, model: nn.Module, masks: list[torch.Tensor], temperature: float):
        super().__init__()
        self.network, self.temperature, self.draws = snapshot(model), temperature, masks[0].shape[0]
        layers, number = [], 0
        for module in self.network.features:
            if isinstance(module, nn.Dropout):
                module, number = FixedMask(masks[number], expand=number == 0), number + 1
            layers.append(module)
        self.network.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return mixture(self.network(x).unflatten(0, (self.draws, -1)) / self.temperature)  # [K, B, C]


class MCDropoutTeacher(SampledTeacher):
    """Average over S index-seeded dropout masks of a network trained with dropout."""

    kind = Bayes.mc_dropout
    section = "mc_dropout"
    samples_key = "mc_dropout.samples"

    def __init__(self, model: nn.Module, samples: int, calibration_temperature: float = 1.0, noise_seed: int = 0,
                 batch_size: int = 1024):
        super().__init__(model, calibration_temperature, noise_seed, batch_size)
        self.samples = samples
        layers = list(model.features)
        first = next((k for k, m in enumerate(layers) if isinstance(m, nn.Dropout)), None)
        if first is None:
            raise ValueError("MC dropout needs a network built with dropout layers")
        self.trunk, self.tail = model.features[:first], layers[first:]  # shared by all draws; per draw
        self.n_dropout = sum(isinstance(m, nn.Dropout) for m in self.tail)
        self._pools: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    @classmethod
    def dropout(cls, cfg: TeacherConfig) -> float:
        return cfg.mc_dropout.rate

    @classmethod
    def train(cls, run: TrainingRun) -> tuple[Teacher, dict]:
        model = run.network()
        history = run.fit(model, cross_entropy, "teacher", teacher_label(cls.kind))
        return cls(model, run.recipe.teacher.mc_dropout.samples, noise_seed=run.recipe.teacher.seed), history

    @classmethod
    def from_checkpoint(cls, payload: dict, cfg: TeacherConfig, device: torch.device) -> Teacher:
        settings = payload["predictive"]
        model = build_model(payload["model"], payload["state_dict"]).to(device)
        return cls(model, settings["samples"], settings["calibration_temperature"], settings["noise_seed"])

    def _pool(self, stream: int, width: int, rate: float, like: torch.Tensor) -> torch.Tensor:
        key = (stream, like.device, like.dtype)
        if key not in self._pools:
            self._pools[key] = mask_pool(self.noise_seed, stream, width, rate).to(like.device, like.dtype)
        return self._pools[key]

    def sample_logits(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        shared = self.trunk(feature_input(self.model, inputs))  # [B, ...] before the first dropout layer
        rows = mask_rows(self.noise_seed, index.to(shared.device), self.samples * self.n_dropout)  # [B, S * L]
        logits = []
        for draw in range(self.samples):
            hidden, layer_number = shared, 0
            for module in self.tail:
                if isinstance(module, nn.Dropout):
                    pool = self._pool(mask_stream(layer_number, draw), hidden[0].numel(), module.p, hidden)
                    row = rows[:, draw * self.n_dropout + layer_number]  # [B]
                    hidden = pool.index_select(0, row).view_as(hidden).mul_(hidden)  # into the fresh gather
                    layer_number += 1
                else:
                    hidden = module(hidden)
            logits.append(self.model.head(hidden))
        return torch.stack(logits)  # [S, B, C]

    def deployable(self, draws: int = 0) -> Deployed:
        """The mean network (draws 0), or K fixed seeded masks per dropout layer shared by every example: never the
        predictive itself, whose masks depend on the example index."""
        check_draws(draws, self.kind, takes_draws=True)
        t = self.calibration_temperature
        if not draws:
            return Deployed(Tempered(self.model, t), f"mean network (dropout off), softmax(logits / T_cal), T_cal "
                            f"{t:.3f}: the {self.samples}-mask MC average is not exported; --draws K exports K fixed "
                            f"seeded masks", exact=False, epistemic=None)
        layers = [*self.tail, self.model.head]  # a dropout layer's width: the inputs of the next Linear
        widths = [next(n.in_features for n in layers[k + 1:] if isinstance(n, nn.Linear))
                  for k, m in enumerate(layers) if isinstance(m, nn.Dropout)]
        rates = [m.p for m in layers if isinstance(m, nn.Dropout)]
        like = next(self.model.parameters())
        masks = [fixed_masks(self.noise_seed, k, draws, width, rate).to(like.device, like.dtype)
                 for k, (width, rate) in enumerate(zip(widths, rates))]
        return Deployed(FixedMasks(self.model, masks, t), f"{draws} fixed seeded dropout masks shared by every example "
                        f"(the teacher draws {self.samples} per example), mean of softmax(logits / T_cal), T_cal "
                        f"{t:.3f}", exact=False, epistemic="mutual_information")

    def predictive_settings(self) -> dict:
        return {**super().predictive_settings(), "samples": self.samples}
