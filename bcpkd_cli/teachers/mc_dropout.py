"""Monte Carlo dropout: the network's dropout layers stay active at prediction, S masks averaged.

The mask of draw s for example i in dropout layer k is a pure function of (noise seed, k, s, i)
(counter-based uniforms), so a cache does not depend on the batch layout or the process.
"""

from __future__ import annotations

import torch
from torch import nn

from bcpkd_cli.teachers.index_noise import index_bits
from bcpkd_cli.teachers.sampled import SampledTeacher


class MCDropoutTeacher(SampledTeacher):
    """Average over S index-seeded dropout masks of a network trained with dropout."""

    def __init__(self, model: nn.Module, samples: int, calibration_temperature: float = 1.0, noise_seed: int = 0,
                 batch_size: int = 1024):
        super().__init__(model, calibration_temperature, noise_seed, batch_size)
        self.samples = samples
        self._draw: tuple[torch.Tensor, int] | None = None  # (example index [B], draw) inside sample_logits
        layers = [m for m in model.modules() if isinstance(m, nn.Dropout)]
        if not layers:
            raise ValueError("MC dropout needs a network built with dropout layers")
        for k, layer in enumerate(layers):
            layer.register_forward_hook(self._mask_hook(k))

    def _mask_hook(self, layer_number: int):
        def hook(module: nn.Dropout, inputs, output: torch.Tensor) -> torch.Tensor:
            if self._draw is None:  # training, or a plain eval forward: nn.Dropout's own behaviour
                return output
            index, draw = self._draw
            stream = 1 + layer_number * 65_536 + draw
            bits = index_bits(self.noise_seed, index.to(output.device), output[0].numel(), stream)
            keep = (bits >= round(module.p * 2**32)).view_as(output)  # uniform (bits + 0.5) / 2^32 >= p
            return output * keep / (1.0 - module.p)

        return hook

    def sample_logits(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        logits = []
        try:
            for draw in range(self.samples):
                self._draw = (index, draw)
                logits.append(self.model(inputs))
        finally:
            self._draw = None
        return torch.stack(logits)  # [S, B, C]

    def predictive_settings(self) -> dict:
        return {**super().predictive_settings(), "samples": self.samples}
