"""An image folder's splits as data: labels by class name, unreadable files listed together (or left out),
and a summary line of what was read, left out and ignored.

The class names come from `train/` (its folder names, sorted); `test/` is labelled by folder name against
that list, so a test split never numbers its own classes. Unreadable files are found where it is cheap: the
store's one decoding pass finds every one; streamed folders check every file's header (empty files, files
that are not images) and remember files that failed to decode in an earlier run. They are refused all at
once, or with `data.skip_unreadable` left out and recorded in the data fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from bcpkd_cli.choices import Decode
from bcpkd_cli.config import DataConfig
from bcpkd_cli.data import images
from bcpkd_cli.data.decode import DECODER
from bcpkd_cli.data.rows import RowReader, StreamedRows
from bcpkd_cli.errors import BcpkdError

LISTED = 20  # unreadable files named in the error; the rest are counted


@dataclass(frozen=True)
class FolderSplit:
    """One split of an image folder, as read."""

    pixels: torch.Tensor | RowReader  # uint8 [N, 3, H, W] (or rows read per batch)
    labels: torch.Tensor  # int64 [N]
    classes: list[str]  # the training split's class names, in label order
    stats: dict | None  # training split: channel mean and std
    sources: str  # what the fingerprint stands on: the listed files, the decoding, the files left out
    note: str  # what was read, left out and ignored
    n_unreadable: int  # files no decoder reads
    unreadable_listed: str  # those files named for an error ("" when there are none or they are left out)


def _listed(root: Path, paths: list[Path], unreadable: dict[int, str]) -> str:
    """The first LISTED unreadable files of a split with their reasons, and the count."""
    rows = sorted(unreadable)
    named = ", ".join(f"{paths[i].relative_to(root)} ({unreadable[i]})" for i in rows[:LISTED])
    more = f" and {len(rows) - LISTED} more" if len(rows) > LISTED else ""
    return f"{root}: {len(rows)} unreadable image file{'s' if len(rows) > 1 else ''}: {named}{more}"


def refuse_unreadable(splits: list["FolderSplit"]) -> None:
    """Every unreadable file the splits kept (data.skip_unreadable off), in one error."""
    found = [s.unreadable_listed for s in splits if s.unreadable_listed]
    if found:
        several = sum(s.n_unreadable for s in splits) > 1
        raise BcpkdError(f"{'; '.join(found)}; remove or replace {'them' if several else 'it'}, or leave "
                         f"{'them' if several else 'it'} out with --set data.skip_unreadable=true")


def _skipped_sources(root: Path, paths: list[Path], unreadable: dict[int, str]) -> str:
    """The fingerprint's part for the files left out: a cache built without them never serves a run with them."""
    if not unreadable:
        return ""
    digest = hashlib.sha256("\n".join(str(paths[i].relative_to(root)) for i in sorted(unreadable)).encode())
    return f"skipped {len(unreadable)}:{digest.hexdigest()[:16]};"


def _note(split: str, kept: int, unreadable: int, ignored: int) -> str:
    parts = [f"{unreadable} unreadable left out"] if unreadable else []
    parts += [f"{ignored} hidden or non-image entr{'ies' if ignored > 1 else 'y'} ignored"] if ignored else []
    return f"{split} {kept} files" + (f" ({', '.join(parts)})" if parts else "")


def read_split(cfg: DataConfig, split: str, classes: list[str] | None = None) -> FolderSplit:
    """`split` ("train" or "test") of the image folder cfg.root, labelled by the names `classes` (train: its
    own folders). Unreadable files are left out; unless cfg.skip_unreadable they are named for
    `refuse_unreadable`, which refuses them with those of the other split."""
    root = Path(cfg.root) / split
    listing = images.list_image_folder(root, classes)
    if cfg.decode == Decode.stream and not cfg.image_size:
        raise BcpkdError("data.decode=stream: set --set data.image_size=S (every image is decoded per batch at S x S)")
    if cfg.decode == Decode.stream:
        unreadable = images.unreadable_files(root, listing.paths)
        kept = [i for i in range(len(listing.paths)) if i not in unreadable]
        paths = [listing.paths[i] for i in kept]
        pixels = StreamedRows(paths, (3, cfg.image_size, cfg.image_size), torch.arange(len(paths)),
                              workers=cfg.loader_workers,
                              on_unreadable=functools.partial(images.remember_unreadable, root))
        labels = torch.tensor(listing.labels, dtype=torch.long)[kept]
        stats = images.stream_stats(root, paths, cfg.image_size, cfg.loader_workers) if split == "train" else None
    else:
        store = images.load_or_decode(root, split, listing.paths, listing.labels, size=cfg.image_size,
                                      workers=cfg.loader_workers)
        unreadable = store.unreadable
        pixels, labels, stats = store.images, store.labels, store.stats
    listed = _listed(root, listing.paths, unreadable) if unreadable and not cfg.skip_unreadable else ""
    if not len(labels) and not listed:
        raise BcpkdError(f"{root}: every image file is unreadable ({next(iter(unreadable.values()))}, ...); check "
                         f"the folder")
    sources = f"{images.source_fingerprint(root, listing.paths)}/{cfg.image_size}px/{DECODER};" + \
        _skipped_sources(root, listing.paths, unreadable)
    return FolderSplit(pixels, labels, listing.classes, stats, sources,
                       _note(split, len(labels), len(unreadable), listing.ignored), len(unreadable), listed)


def class_notes(classes: list[str], train_labels: torch.Tensor, test_labels: torch.Tensor) -> list[str]:
    """What is worth a word about the classes: a training class without images is refused; test classes without
    images are named once, and training classes with under a tenth of the mean count are listed."""
    counts = torch.bincount(train_labels.cpu(), minlength=len(classes)).tolist()
    empty = [name for name, n in zip(classes, counts) if n == 0]
    if empty:
        raise BcpkdError(f"train/: class folder{'s' if len(empty) > 1 else ''} {', '.join(empty[:5])} "
                         f"{'hold' if len(empty) > 1 else 'holds'} no readable images; add images or remove the folder")
    notes = []
    mean = sum(counts) / len(counts)
    small = [f"{name} {n}" for name, n in zip(classes, counts) if n < mean / 10]
    if small:
        notes.append(f"training classes under a tenth of the mean count ({mean:.0f}): {', '.join(small[:10])}"
                     f"{' ...' if len(small) > 10 else ''}")
    test_counts = torch.bincount(test_labels.cpu(), minlength=len(classes)).tolist()
    untested = [name for name, n in zip(classes, test_counts) if n == 0]
    if untested:
        notes.append(f"no test images of class{'es' if len(untested) > 1 else ''} {', '.join(untested[:10])}"
                     f"{' ...' if len(untested) > 10 else ''} (their test accuracy is not measured)")
    return notes
