"""The paper's synthetic benchmark: Gaussian classes whose Bayes class probabilities are exact.

x = mu_y + N(0, noise_var * I), y uniform over C classes, every coordinate of every mean mu_k
drawn from `mean_choices`. With a uniform class prior the exact BCP is
    P(y = k | x) = softmax_k(-||x - mu_k||^2 / (2 * noise_var)).
"""

from __future__ import annotations

import torch

from bcpkd_cli.config import DataConfig


def exact_bcp(x: torch.Tensor, means: torch.Tensor, noise_var: float) -> torch.Tensor:
    """x [N, D], means [C, D] -> exact class probabilities [N, C]."""
    sq_dist = torch.cdist(x.double(), means.double()).square()  # [N, C]
    return torch.softmax(-sq_dist / (2.0 * noise_var), dim=1).to(x.dtype)


def class_means(cfg: DataConfig, generator: torch.Generator) -> torch.Tensor:
    """Class means [C, D] with coordinates drawn uniformly from cfg.mean_choices."""
    choices = torch.tensor(cfg.mean_choices, dtype=torch.float32)
    picks = torch.randint(len(choices), (cfg.n_classes, cfg.dim), generator=generator)
    return choices[picks]


def sample_split(n: int, means: torch.Tensor, noise_var: float, generator: torch.Generator):
    """n examples: inputs [n, D] float32, labels [n] int64, exact BCPs [n, C]."""
    labels = torch.randint(means.shape[0], (n,), generator=generator)
    noise = torch.randn(n, means.shape[1], generator=generator) * noise_var**0.5
    inputs = means[labels] + noise
    return inputs, labels, exact_bcp(inputs, means, noise_var)
