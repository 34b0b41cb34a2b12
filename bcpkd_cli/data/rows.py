"""Image rows read per batch instead of held whole: a memory-mapped store, or the image files themselves.

A `RowReader` stands where a split's `inputs` tensor stands: indexing it with row numbers, a slice or an
int returns an ordinary uint8 tensor [B, C, H, W] on the reader's device, so batches, views, chunked
inference and the Laplace fit work unchanged while the process holds a few batches of images at a time.

Reading ahead: `plan(batches)` (the training loop passes an epoch's row batches in order) has DataLoader
worker processes read the planned batches, `PREFETCH` per worker ahead; other requests (a scan of the
held-out split, centroids) are served beside the plan without dropping it. A contiguous request is read in
parts of at most `SCAN_ROWS` rows and the parts after it are read ahead the same way (chunked inference,
the Laplace fit, the cache build), so the memory held ahead stays a few hundred images per worker. On
CUDA, batches arrive in pinned memory and are copied on a side stream: the next planned batch is copied
while the current one is used, and the compute stream waits for exactly the copy it uses.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bcpkd_cli.data.decode import UnreadableImage, decode_files, nvjpeg_orientations, orient, read_bytes, square
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.threads import local_processes, usable_cpus

PREFETCH = 2  # batches each worker reads ahead
SCAN_ROWS = 256  # rows per part of a contiguous request


def default_workers() -> int:
    """Worker processes when data.loader_workers is 0: the CPUs this process may use (affinity, cgroup quota)
    shared among this machine's torchrun processes, at most 8."""
    return max(1, min(8, usable_cpus() // local_processes()))


class _Planned(Dataset):
    """Row batches as a dataset of batches (read in DataLoader workers). It holds the read function, not the
    reader, so that dropping the reader stops its workers."""

    def __init__(self, read: Callable[[torch.Tensor], object], batches: list[torch.Tensor]):
        self.read, self.batches = read, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        return self.read(self.batches[i])


class _ReadAhead:
    """Planned batches (indices into the reader) read by DataLoader workers from the first one asked for,
    handed out in order while requests match them."""

    def __init__(self, read: Callable, rows: torch.Tensor, batches: list[torch.Tensor], workers: int, pin: bool):
        self.read, self.rows, self.batches, self.workers, self.pin = read, rows, batches, workers, pin
        self.iterator = None

    def next_is(self, index: torch.Tensor) -> bool:
        return bool(self.batches) and torch.equal(self.batches[0], index)

    def take(self):
        """The raw read of the next planned batch (the caller checked `next_is`)."""
        if self.iterator is None:
            loader = DataLoader(_Planned(self.read, [self.rows[b] for b in self.batches]), batch_size=None,
                                num_workers=self.workers, prefetch_factor=PREFETCH, pin_memory=self.pin,
                                generator=torch.Generator())  # its seed draw leaves the global RNG (dropout) alone
            self.iterator = iter(loader)
        self.batches.pop(0)
        raw = next(self.iterator)
        if not self.batches:
            self.iterator = None  # all read: the workers stop
        return raw


def read_in_workers(read: Callable[[torch.Tensor], object], batches: list[torch.Tensor], workers: int):
    """`read(batch)` of every batch, in order, computed by `workers` DataLoader worker processes (0: the default
    count) reading PREFETCH batches ahead each."""
    loader = DataLoader(_Planned(read, batches), batch_size=None, num_workers=workers or default_workers(),
                        prefetch_factor=PREFETCH, generator=torch.Generator())
    return iter(loader)


class RowReader:
    """Rows `rows` [N] of a source read per batch; subclasses give `reader()` (a picklable function: source
    rows -> what `finish` turns into uint8 images [B, C, H, W] on the device) and `shape_of_one`."""

    def __init__(self, rows: torch.Tensor, device: torch.device | str = "cpu", workers: int = 0):
        self.rows, self.target, self.workers = rows.cpu(), torch.device(device), workers or default_workers()
        self._plan: _ReadAhead | None = None  # the training loop's batches
        self._scan: _ReadAhead | None = None  # the parts after the last contiguous request
        self._ahead = None  # (index, batch, copy event): the next planned batch, already on its way (CUDA)
        self._copies = None  # CUDA: the side stream that copies batches to the device

    # what subclasses define
    def reader(self) -> Callable[[torch.Tensor], object]:
        raise NotImplementedError

    def finish(self, raw) -> torch.Tensor:
        """What the read returned -> images on the device (default: a tensor, copied there)."""
        return raw.to(self.target, non_blocking=True)

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
        index = torch.as_tensor(index).reshape(-1).cpu()
        if self._ahead is not None and torch.equal(self._ahead[0], index):
            batch, event = self._ahead[1:]
            self._ahead = None
        elif self._ahead is None and self._plan is not None and self._plan.next_is(index):
            batch, event = self._deliver(self._plan.take())
        elif len(index) > 1 and bool((index.diff() == 1).all()):
            return self._scanned(index)
        else:
            return self._handed_out(*self._deliver(self.reader()(self.rows[index])))
        if self._plan.batches and self.target.type == "cuda":  # a planned batch: the next one is copied meanwhile
            following = self._plan.batches[0]
            self._ahead = (following, *self._deliver(self._plan.take()))
        return self._handed_out(batch, event)

    def plan(self, batches: list[torch.Tensor]) -> None:
        """Read these row batches (indices into this reader) ahead, in this order, from the moment the first
        of them is asked for."""
        self._ahead = None
        self._plan = _ReadAhead(self.reader(), self.rows, [b.cpu() for b in batches], self.workers,
                                self.target.type == "cuda")

    def _scanned(self, index: torch.Tensor) -> torch.Tensor:
        """A contiguous request, in parts of SCAN_ROWS, and the parts after it read ahead."""
        parts = []
        for part in index.split(SCAN_ROWS):
            if self._scan is not None and self._scan.next_is(part):
                parts.append(self._handed_out(*self._deliver(self._scan.take())))
            else:
                self._scan = None
                parts.append(self._handed_out(*self._deliver(self.reader()(self.rows[part]))))
        if self._scan is None or not self._scan.batches:
            starts = range(int(index[-1]) + 1, len(self.rows), SCAN_ROWS)
            following = [torch.arange(s, min(s + SCAN_ROWS, len(self.rows))) for s in starts]
            self._scan = _ReadAhead(self.reader(), self.rows, following, self.workers, self.target.type == "cuda")
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _deliver(self, raw) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
        """A raw read -> (images on the device, the event that marks their copy on CUDA)."""
        if self.target.type != "cuda":
            return self.finish(raw), None
        if self._copies is None:
            self._copies = torch.cuda.Stream(self.target)
        with torch.cuda.stream(self._copies):
            batch = self.finish(raw)
            event = torch.cuda.Event()
            event.record(self._copies)
        return batch, event

    def _handed_out(self, batch: torch.Tensor, event) -> torch.Tensor:
        """A batch about to be used: on CUDA, the compute stream waits for its copy, which keeps its memory."""
        if event is not None:
            compute = torch.cuda.current_stream(self.target)
            compute.wait_event(event)
            batch.record_stream(compute)
        return batch


def _read_store(store: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    return store[picked]


class MappedRows(RowReader):
    """The rows of a uint8 store [M, C, H, W] read from disk through a memory map (or from host memory)."""

    def __init__(self, store: torch.Tensor, rows: torch.Tensor, device: torch.device | str = "cpu", workers: int = 0):
        super().__init__(rows, device, workers)
        self.store = store

    def reader(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return functools.partial(_read_store, self.store)

    def shape_of_one(self) -> tuple[int, ...]:
        return tuple(self.store.shape[1:])

    def with_rows(self, rows: torch.Tensor, device: torch.device) -> "MappedRows":
        return MappedRows(self.store, rows, device, self.workers)


class PathTable:
    """File paths as two arrays (UTF-8 bytes and offsets) instead of a list of Path objects: forked workers
    read them without touching reference counts, so the pages stay shared instead of being copied into
    every worker (1.28 M paths: about 90 MB once, not a list of objects per worker)."""

    def __init__(self, paths: list[Path]):
        encoded = [str(p).encode() for p in paths]
        self.offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)  # [N + 1]
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.all_jpeg = all(Path(p).suffix.lower() in (".jpg", ".jpeg") for p in paths)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Path:
        return Path(self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode())


def _read_files(paths: PathTable, image_shape: tuple[int, int, int], resize: bool, raw: bool,
                picked: torch.Tensor):
    files = [paths[i] for i in picked.tolist()]
    if not raw:
        return decode_files(files, image_shape, resize)
    data = read_bytes(files)
    return files, data, nvjpeg_orientations(data)


class StreamedRows(RowReader):
    """The rows of an image folder decoded from their files per batch at `size` x `size` (`square`), with
    the store's rule (`decode_file`): on the CPU in the worker processes; for JPEGs on CUDA, in one batched
    nvJPEG call on the device (the workers read the files' bytes and EXIF orientations, applied after it; a
    batch nvJPEG cannot decode, e.g. a PNG named .JPEG or a CMYK JPEG, or one with a file that lacks its
    end-of-image marker, is decoded on the CPU)."""

    def __init__(self, paths: list[Path] | PathTable, image_shape: tuple[int, int, int], rows: torch.Tensor,
                 device: torch.device | str = "cpu", workers: int = 0, resize: bool = True,
                 on_unreadable: Callable[[dict[Path, str]], None] | None = None):
        super().__init__(rows, device, workers)
        self.on_unreadable = on_unreadable  # told of a file found unreadable mid-run ({path: reason})
        self.paths = paths if isinstance(paths, PathTable) else PathTable(paths)
        self.image_shape, self.resize = tuple(image_shape), resize
        self.on_gpu = self.target.type == "cuda" and resize and self.paths.all_jpeg

    def reader(self) -> Callable[[torch.Tensor], object]:
        return functools.partial(_read_files, self.paths, self.image_shape, self.resize, self.on_gpu)

    def finish(self, raw) -> torch.Tensor:
        if not self.on_gpu:
            return super().finish(raw)
        files, data, orientations = raw
        if not data:  # an empty share of a batch (torchrun)
            return torch.zeros(0, *self.image_shape, dtype=torch.uint8, device=self.target)
        if orientations is None:  # a file without its end-of-image marker: the CPU decoder decides
            return decode_files(files, self.image_shape, self.resize).to(self.target, non_blocking=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg

            # nvJPEG decodes on its own stream into memory allocated on this one: nothing queued may still use it
            torch.cuda.current_stream(self.target).synchronize()
            try:
                decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.target)
            except RuntimeError:
                return decode_files(files, self.image_shape, self.resize).to(self.target, non_blocking=True)
        # nvJPEG applies no EXIF orientation: turned here as the CPU decoder turns them
        return torch.stack([square(orient(image, o), self.image_shape[-1]) for image, o in zip(decoded, orientations)])

    def __getitem__(self, index) -> torch.Tensor:
        """As RowReader's; a file that became unreadable after the run started (deleted, cut, replaced) ends the
        run with one line naming it and how to go on (the last finished epoch is kept for --resume)."""
        try:
            return super().__getitem__(index)
        except UnreadableImage as err:
            if self.on_unreadable is not None:
                self.on_unreadable({err.path: err.reason})
            raise BcpkdError(f"{err.path}: not a readable image ({err.reason}), found while streaming; restore it, or "
                             f"leave it out with --set data.skip_unreadable=true, then run the same command with "
                             f"--resume to continue from the last finished epoch") from None

    def shape_of_one(self) -> tuple[int, ...]:
        return self.image_shape

    def with_rows(self, rows: torch.Tensor, device: torch.device) -> "StreamedRows":
        return StreamedRows(self.paths, self.image_shape, rows, device, self.workers, self.resize,
                            self.on_unreadable)
