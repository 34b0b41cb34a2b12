"""Monte Carlo dropout: the network's dropout layers stay active at prediction, S masks averaged.

The mask of draw s for example i in dropout layer k is row r(seed, k, s, i) of a pool of
POOL_SIZE independent Bernoulli masks drawn once for (seed, k, s); r comes from the counter hash of
the example index (all rows of a batch in one hash). For one example the S masks are therefore exactly independent Bernoulli(1 - p)
masks (each draw has its own pool), and a cache does not depend on the batch layout, process or
device; examples only share masks with each other, which no per-example predictive sees. A gathered
pool row costs a quarter of hashing every unit (bench/cache_cost.py). The layers before the first
dropout layer are the same for every draw and run once per batch.
"""

from __future__ import annotations

import torch
from torch import nn

from bcpkd_cli.choices import Bayes
from bcpkd_cli.config import TeacherConfig
from bcpkd_cli.models import build_model, feature_input
from bcpkd_cli.teachers.base import Teacher
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
        history = run.fit(model, cross_entropy, "teacher", f"{cls.kind.value} teacher")
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

    def predictive_settings(self) -> dict:
        return {**super().predictive_settings(), "samples": self.samples}
