"""Training targets other than a teacher's: one-hot labels, exact BCPs, Dirichlet-noised BCPs."""

from __future__ import annotations

import torch


def onehot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """labels [N] -> one-hot probabilities [N, C]."""
    return torch.nn.functional.one_hot(labels, n_classes).float()


def temper(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log p / T): the distribution whose logits are log p, at temperature T."""
    if temperature == 1.0:
        return probs
    return torch.softmax(probs.clamp_min(1e-30).log() / temperature, dim=1)


def dirichlet_noised(bcp: torch.Tensor, alpha: float, seed: int) -> torch.Tensor:
    """One draw of Dirichlet(alpha * P) per row of bcp [N, C], seeded; the draws' mean is P.

    Each component's variance is P_k (1 - P_k) / (alpha + 1): the noise of a BCP estimate.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        concentration = (alpha * bcp.double()).clamp_min(1e-8)
        return torch.distributions.Dirichlet(concentration).sample().float()
