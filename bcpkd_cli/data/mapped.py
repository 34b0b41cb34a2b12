"""Rows of an image store that is read from disk, not held in memory (a store larger than a quarter of RAM).

`MappedRows(store, rows)` stands where a split's `inputs` tensor stands: indexing it with row numbers, a
slice or an int reads just those images from the memory-mapped store and returns an ordinary tensor, so
batches, views, chunked inference and the Laplace fit work unchanged and the process's memory holds one
batch of images at a time (the rest stays in the page cache).
"""

from __future__ import annotations

import torch


class MappedRows:
    """The rows `rows` [N] of a memory-mapped uint8 store [M, C, H, W], in that order."""

    def __init__(self, store: torch.Tensor, rows: torch.Tensor):
        self.store, self.rows = store, rows.cpu()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> torch.Tensor:
        """Images [B, C, H, W] (or [C, H, W] for an int) read from disk."""
        picked = self.rows[index.cpu() if isinstance(index, torch.Tensor) else index]
        return self.store[picked]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.store.shape[1:]))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def dtype(self) -> torch.dtype:
        return self.store.dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def ndim(self) -> int:
        return self.store.ndim

    def to(self, device: torch.device) -> "MappedRows | torch.Tensor":
        """Itself on the CPU; on a GPU the rows are read into device memory once (the data lives there)."""
        return self if torch.device(device).type == "cpu" else self.store[self.rows].to(device)

    def subset(self, rows: torch.Tensor) -> "MappedRows":
        return MappedRows(self.store, self.rows[rows.cpu()])
