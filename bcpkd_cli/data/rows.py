"""Image rows read per batch instead of held whole: a memory-mapped store, or the image files themselves.

A `RowReader` stands where a split's `inputs` tensor stands: indexing it with row numbers, a slice or an
int returns an ordinary uint8 tensor [B, C, H, W] on the reader's device, so batches, views, chunked
inference and the Laplace fit work unchanged while the process holds a few batches of images at a time.

Reading ahead: `plan(batches)` (the training loop passes an epoch's row batches in order) reads the
planned batches in DataLoader worker processes, `prefetch` batches per worker ahead; a read of a
contiguous slice plans the following slices of the same length (chunked inference scans). A request that
is not the next planned batch drops the plan and is read at once. On CUDA, batches arrive in pinned
memory and the next one is copied to the device on a side stream while the current one is used.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from bcpkd_cli.errors import BcpkdError

PREFETCH = 2  # batches each worker reads ahead


def default_workers() -> int:
    """Worker processes when data.loader_workers is 0: one per CPU core, at most 8."""
    return min(8, os.cpu_count() or 1)


class _Planned(Dataset):
    """The planned row batches as a dataset of batches (read in DataLoader workers)."""

    def __init__(self, reader: "RowReader", batches: list[torch.Tensor]):
        self.reader, self.batches = reader, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        return self.reader.read(self.batches[i])


class RowReader:
    """Rows `rows` [N] of a source read per batch; subclasses define `read(picked) -> uint8 [B, C, H, W]`
    (on the CPU, or raw data that `finish` turns into images on the device) and `shape_of_one`."""

    def __init__(self, rows: torch.Tensor, device: torch.device | str = "cpu", workers: int = 0):
        self.rows, self.target, self.workers = rows.cpu(), torch.device(device), workers or default_workers()
        self._planned: list[torch.Tensor] = []
        self._batches = None  # the DataLoader iterator over the planned batches
        self._ready = None  # the next planned batch, already on its way to the device
        self._copies = None  # CUDA: the side stream that copies batches to the device

    # what subclasses define
    def read(self, picked: torch.Tensor):
        raise NotImplementedError

    def finish(self, batch) -> torch.Tensor:
        """What `read` returned -> images on the device (default: a tensor, copied there; on CUDA on a side
        stream that `_handed_out` makes the compute stream wait for)."""
        if self.target.type != "cuda":
            return batch.to(self.target)
        if self._copies is None:
            self._copies = torch.cuda.Stream(self.target)
        with torch.cuda.stream(self._copies):
            return batch.to(self.target, non_blocking=True)

    def _handed_out(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch about to be used: on CUDA, the compute stream waits for its copy, which keeps its memory."""
        if self._copies is not None and batch.is_cuda:
            compute = torch.cuda.current_stream(self.target)
            compute.wait_stream(self._copies)
            batch.record_stream(compute)
        return batch

    def shape_of_one(self) -> tuple[int, ...]:
        raise NotImplementedError

    def with_rows(self, rows: torch.Tensor, device: torch.device) -> "RowReader":
        raise NotImplementedError

    # the tensor-like surface
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.shape_of_one()))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def device(self) -> torch.device:
        return self.target

    @property
    def ndim(self) -> int:
        return 1 + len(self.shape_of_one())

    def to(self, device: torch.device) -> "RowReader":
        """The same rows delivered on `device` (read per batch; never copied there whole)."""
        return self if torch.device(device) == self.target else self.with_rows(self.rows, torch.device(device))

    def subset(self, rows: torch.Tensor) -> "RowReader":
        return self.with_rows(self.rows[rows.cpu()], self.target)

    def __getitem__(self, index) -> torch.Tensor:
        """Images [B, C, H, W] (or [C, H, W] for an int) on the reader's device."""
        if isinstance(index, int):
            return self[torch.tensor([index])][0]
        if isinstance(index, slice):
            index = torch.arange(len(self.rows))[index]
        index = index.cpu()
        batch = self._take_planned(index)
        if batch is None:
            batch = self.finish(self.read(self.rows[index]))
            if len(index) > 1 and bool((index.diff() == 1).all()):  # a scan: read the following slices ahead
                starts = range(int(index[-1]) + 1, len(self.rows), len(index))
                self.plan([torch.arange(s, min(s + len(index), len(self.rows))) for s in starts])
        return self._handed_out(batch)

    def plan(self, batches: list[torch.Tensor]) -> None:
        """Read these row batches (indices into this reader) ahead, in this order, from the moment the first
        of them is asked for."""
        self._planned, self._batches, self._ready = [b.cpu() for b in batches], None, None

    def _take_planned(self, index: torch.Tensor) -> torch.Tensor | None:
        """The next planned batch when `index` is it (and the one after it sent on its way), else None."""
        if not self._planned or not torch.equal(self._planned[0], index):
            self._planned, self._batches, self._ready = [], None, None  # off plan: stop reading ahead
            return None
        if self._batches is None:  # the workers start with the first planned batch asked for
            loader = DataLoader(_Planned(self, [self.rows[b] for b in self._planned]), batch_size=None,
                                num_workers=self.workers, prefetch_factor=PREFETCH,
                                pin_memory=self.target.type == "cuda",
                                generator=torch.Generator())  # its seed draw leaves the global RNG (dropout) alone
            self._batches = iter(loader)
        self._planned.pop(0)
        batch = self._ready if self._ready is not None else self.finish(next(self._batches))
        self._ready = self.finish(next(self._batches)) if self._planned and self.target.type == "cuda" else None
        if not self._planned:
            self._batches = None  # all read: the workers stop
        return batch


class MappedRows(RowReader):
    """The rows of a uint8 store [M, C, H, W] read from disk through a memory map (or from host memory)."""

    def __init__(self, store: torch.Tensor, rows: torch.Tensor, device: torch.device | str = "cpu", workers: int = 0):
        super().__init__(rows, device, workers)
        self.store = store

    def read(self, picked: torch.Tensor) -> torch.Tensor:
        return self.store[picked]

    def shape_of_one(self) -> tuple[int, ...]:
        return tuple(self.store.shape[1:])

    def with_rows(self, rows: torch.Tensor, device: torch.device) -> "MappedRows":
        return MappedRows(self.store, rows, device, self.workers)


class StreamedRows(RowReader):
    """The rows of an image folder decoded from their files per batch at `size` x `size` (`square`), with
    torchvision's decoders: on the CPU in the worker processes; for JPEGs on CUDA, in one batched nvJPEG call
    on the device (the workers read the files' bytes)."""

    def __init__(self, paths: list[Path], image_shape: tuple[int, int, int], rows: torch.Tensor,
                 device: torch.device | str = "cpu", workers: int = 0, resize: bool = True):
        super().__init__(rows, device, workers)
        self.paths, self.image_shape, self.resize = paths, tuple(image_shape), resize
        self.on_gpu = self.target.type == "cuda" and resize and all(p.suffix.lower() in (".jpg", ".jpeg")
                                                                   for p in paths)

    def read(self, picked: torch.Tensor):
        files = [self.paths[i] for i in picked.tolist()]
        return read_bytes(files) if self.on_gpu else decode_files(files, self.image_shape, self.resize)

    def finish(self, batch) -> torch.Tensor:
        if not self.on_gpu:
            return super().finish(batch)
        from bcpkd_cli.data.images import square

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg

            decoded = decode_jpeg(batch, mode=ImageReadMode.RGB, device=self.target)
        return torch.stack([square(image, self.image_shape[-1]) for image in decoded])

    def shape_of_one(self) -> tuple[int, ...]:
        return self.image_shape

    def with_rows(self, rows: torch.Tensor, device: torch.device) -> "StreamedRows":
        return StreamedRows(self.paths, self.image_shape, rows, device, self.workers, self.resize)


def read_bytes(files: list[Path]) -> list[torch.Tensor]:
    """The files' bytes as uint8 tensors (for a batched decoder on the device)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import read_file

        return [read_file(str(p)) for p in files]


def decode_files(files: list[Path], image_shape: tuple[int, int, int], resize: bool = True) -> torch.Tensor:
    """RGB uint8 [B, 3, H, W] of image files, decoded exactly as the store decodes them: each resized to
    H x W (`square`, H = W), or (resize False) each required to be H x W already."""
    from bcpkd_cli.data.images import decode_images

    if not files:
        return torch.zeros(0, *image_shape, dtype=torch.uint8)
    try:
        images = decode_images(files, image_shape[-1] if resize else 0)
    except OSError as err:
        raise BcpkdError(f"{err.filename}: cannot be read ({err.strerror}); restore the file or remove it") from None
    if tuple(images.shape[1:]) != tuple(image_shape):
        raise BcpkdError(f"{files[0].parent.parent}: images have different sizes ({tuple(images.shape[1:])} and "
                         f"{tuple(image_shape)}); set --set data.image_size=S to decode them all at S x S (shorter "
                         f"side resized, centre crop)")
    return images
