"""Top-k BCP caches: per example and view the K largest probabilities and their class ids, the remaining mass
spread evenly over the other C - K classes, so every target stays a distribution (KL stays finite) at K / C of
the dense size (plus the ids). `TopKProbs` indexes like the dense [N, V, C] tensor it stands for: `probs[rows,
slots]` and `probs[:, 0]` give dense rows (one scatter), `probs[rows]` a top-k subset.
"""

from __future__ import annotations

import torch


def compress(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [..., C] -> (the K largest probabilities [..., K], their class ids [..., K] int32), largest first."""
    values, ids = probs.topk(k, dim=-1)
    return values, ids.to(torch.int32)


def expand(values: torch.Tensor, ids: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(values [..., K], ids [..., K]) -> dense probabilities [..., C] (float32): the kept ones, and the rest of the
    mass, 1 - sum(values), spread evenly over the other classes."""
    values = values.float()
    k = values.shape[-1]
    rest = (1.0 - values.sum(dim=-1, keepdim=True)).clamp_min(0.0) / max(n_classes - k, 1)
    dense = rest.expand(*values.shape[:-1], n_classes).clone() if k < n_classes else \
        torch.zeros(*values.shape[:-1], n_classes, device=values.device)
    return dense.scatter_(-1, ids.long(), values)


class TopKProbs:
    """The top-k form of a cache's probs [N, V, C]: values [N, V, K], ids [N, V, K] (memory-mapped or in memory)."""

    def __init__(self, values: torch.Tensor, ids: torch.Tensor, n_classes: int):
        self.values, self.ids, self.n_classes = values, ids, n_classes

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.values.shape[:2], self.n_classes))

    @property
    def ndim(self) -> int:
        return 3

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index) -> torch.Tensor | TopKProbs:
        """probs[rows] -> TopKProbs of those rows; probs[rows, slots] or probs[:, v] -> dense rows [B, C]."""
        if not isinstance(index, tuple):
            return TopKProbs(self.values[index], self.ids[index], self.n_classes)
        return expand(self.values[index], self.ids[index], self.n_classes)

    def to(self, device: torch.device) -> TopKProbs:
        return TopKProbs(self.values.to(device), self.ids.to(device), self.n_classes)
