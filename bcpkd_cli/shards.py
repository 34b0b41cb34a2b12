"""BCP caches built by several processes (torchrun): the training rows split into contiguous blocks of whole
batches, one shard file per process, and at the cache's path a manifest that lists the shards.

`ShardedRows` stands where a cache tensor [N, ...] stands: indexing it with row ids (and view slots), a
slice or an int gathers the rows from the memory-mapped shards into an ordinary tensor, so a sharded cache
loads as one tensor without being read into memory.
"""

from __future__ import annotations

from itertools import accumulate
from pathlib import Path

import torch


def shard_rows(n_rows: int, batch_size: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [start, stop) that process `rank` of `size` computes: a contiguous block of whole batches, so every
    batch is one of the one-process build (equal inputs, equal kernels: equal rows). Empty when there are fewer
    batches than processes."""
    n_batches = -(-n_rows // batch_size)
    return tuple(min(n_rows, n_batches * r // size * batch_size) for r in (rank, rank + 1))


def shard_name(path: Path, rank: int, size: int) -> str:
    """bcp.safetensors -> bcp.shard-00001-of-00004.safetensors"""
    return f"{path.stem}.shard-{rank:05d}-of-{size:05d}{path.suffix}"


def shard_files(path: Path) -> list[Path]:
    """The shard files of cache `path` in its folder, of builds with any process count."""
    return sorted(path.parent.glob(f"{path.stem}.shard-*-of-*{path.suffix}"))


class ShardedRows:
    """One tensor [N, ...] made of parts [N_p, ...] stacked along rows (memory-mapped shards), read on demand."""

    def __init__(self, parts: list[torch.Tensor]):
        self.parts = parts
        self.starts = torch.tensor([0, *accumulate(len(part) for part in parts)])  # [P + 1] first row of each part

    @property
    def shape(self) -> torch.Size:
        return torch.Size((int(self.starts[-1]), *self.parts[0].shape[1:]))

    @property
    def ndim(self) -> int:
        return self.parts[0].ndim

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index) -> torch.Tensor:
        """rows[ids], rows[ids, slots], rows[i], rows[a:b], rows[:, v] -> a tensor, as indexing the whole tensor
        would give. Row ids (a tensor) broadcast with the tensors among the other indices."""
        rows, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if isinstance(rows, slice):
            if any(isinstance(i, torch.Tensor) for i in rest):
                raise TypeError("ShardedRows: index rows with ids, not a slice, together with index tensors")
            rows = torch.arange(*rows.indices(len(self)))
        return self._gather(torch.as_tensor(rows), rest)

    def _gather(self, rows: torch.Tensor, rest: tuple) -> torch.Tensor:
        """Rows `rows` (any shape S, broadcast with the tensors of `rest`) -> [*S, ...], part by part."""
        shape = torch.broadcast_shapes(rows.shape, *(i.shape for i in rest if isinstance(i, torch.Tensor)))
        rows = rows.cpu().expand(shape).reshape(-1)  # [M]
        rest = tuple(i.cpu().expand(shape).reshape(-1) if isinstance(i, torch.Tensor) else i for i in rest)
        if len(rows) and not -len(self) <= int(rows.min()) <= int(rows.max()) < len(self):
            raise IndexError(f"row index out of range for {len(self)} rows")
        rows = rows % len(self)  # negative ids count from the end
        part_of = torch.bucketize(rows, self.starts[1:], right=True)  # [M] the part holding each row
        first = self.parts[0][(rows[:0], *(i[:0] if isinstance(i, torch.Tensor) else i for i in rest))]
        out = first.new_empty((len(rows), *first.shape[1:]))
        for p in part_of.unique().tolist():
            picked = (part_of == p).nonzero().squeeze(1)
            local = (rows[picked] - self.starts[p], *(i[picked] if isinstance(i, torch.Tensor) else i for i in rest))
            out[picked] = self.parts[p][local]
        return out.reshape((*shape, *out.shape[1:]))

    def to(self, device: torch.device | str) -> torch.Tensor:
        """The whole tensor on `device` (a GPU copy of a cache is made once)."""
        return torch.cat([part.to(device) for part in self.parts])
