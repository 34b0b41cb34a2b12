"""Image datasets decoded once into a uint8 tensor store: ImageFolder trees and CIFAR-10/100.

A split is decoded the first time it is used and saved as a safetensors file (`images` uint8
[N, 3, H, W], `labels` int64 [N]) next to the data, in `<root>/.bcpkd-store/`, or under
`$XDG_CACHE_HOME/bcpkd` when the data folder is read-only. The store's name carries a fingerprint
of the source files (relative paths and sizes), so a changed tree is decoded again and an unchanged
one never is. CIFAR's python pickles are read with an unpickler that only rebuilds numpy arrays,
lists, dicts and plain values: a downloaded file cannot execute code.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import pickle
from collections.abc import Iterable
from typing import NamedTuple
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from bcpkd_cli.artifacts import atomic_write, map_tensor, write_text
from bcpkd_cli.data.decode import DECODER, IMAGE_SUFFIXES, UnreadableImage, decode_file, header_problem, square
from bcpkd_cli.data.rows import MappedRows, PathTable, StreamedRows, read_in_workers
from bcpkd_cli.errors import BcpkdError, BcpkdFailure

CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man
maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain
plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
turtle wardrobe whale willow_tree wolf woman worm""".split())  # the published names, in label order


class _ArrayUnpickler(pickle.Unpickler):
    """Only numpy's array reconstruction is allowed; anything else in the pickle is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, list[int]]:
    try:
        batch = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        return np.asarray(batch[b"data"], dtype=np.uint8), list(batch[label_key])
    except (pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError) as err:
        raise BcpkdError(f"{path}: not a CIFAR python batch ({err}); download it with --set data.download=true") from None


def read_cifar(root: Path, name: str, split: str, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10/100 `train` or `test` split in the python format -> images uint8 [N, 3, 32, 32], labels [N]."""
    folder, train_files, test_files, label_key = CIFAR_FILES[name]
    if download:
        import torchvision

        dataset_cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            dataset_cls(str(root), train=(split == "train"), download=True)
        except (OSError, RuntimeError) as err:  # no network, or a corrupt archive
            raise BcpkdError(f"{root}: downloading {name} failed ({str(err)[:80]}); put its python batches "
                             f"there by hand and set data.download=false") from None
    files = [Path(root) / folder / f for f in (train_files if split == "train" else test_files)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise BcpkdError(f"{missing[0]}: missing; download {name} with --set data.download=true "
                         f"or point data.root at the folder holding {folder}/")
    arrays, labels = zip(*(_read_cifar_batch(f, label_key) for f in files))
    images = torch.from_numpy(np.concatenate(arrays)).view(-1, 3, 32, 32)
    return images, torch.tensor([y for part in labels for y in part], dtype=torch.long)


NOT_DATA = {"thumbs.db", "desktop.ini"}  # files that operating systems leave in folders
STORE_NAME = ".bcpkd-store"  # the folder beside the images that holds their stores


class FolderListing(NamedTuple):
    """One split of an image folder: its image files, their labels (indices into `classes`), the class names,
    and the entries left out as not data (hidden files and folders, other suffixes)."""

    paths: list[Path]
    labels: list[int]
    classes: list[str]
    ignored: int


def _class_files(folder: Path) -> tuple[list[Path], int]:
    """The image files under one class folder (recursively, as torchvision's ImageFolder; hidden entries
    skipped), sorted by path, and how many entries were left out."""
    files, ignored = [], 0
    for parent, dirs, names in os.walk(folder, followlinks=True):
        ignored += sum(d.startswith(".") for d in dirs)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if name.startswith(".") or name.lower() in NOT_DATA or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                ignored += 1
            else:
                files.append(Path(parent) / name)
    return sorted(files), ignored


def list_image_folder(root: Path, classes: list[str] | None = None) -> FolderListing:
    """`root/<class>/.../<file>` -> a FolderListing. The class names are the folder names, sorted (as
    torchvision's ImageFolder), unless `classes` (the training split's) is given: then every folder is labelled
    by its name's place in that list, a folder that is not in it is refused, and a class without a folder here
    simply has no examples."""
    root = Path(root)
    if not root.is_dir():
        raise BcpkdError(f"{root}: no such image folder; expected {root}/<class>/<image>.jpg")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    ignored = sum(1 for d in root.iterdir() if (not d.is_dir() or d.name.startswith(".")) and d.name != STORE_NAME)
    if classes is None:
        classes = folders
    unknown = [name for name in folders if name not in classes]
    if unknown:
        raise BcpkdError(f"{root}: class folder{'s' if len(unknown) > 1 else ''} {', '.join(unknown[:5])} "
                         f"{'are' if len(unknown) > 1 else 'is'} not among the training classes "
                         f"({', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''}); every class needs a "
                         f"folder in train/: rename or remove {'them' if len(unknown) > 1 else 'it'}")
    index = {name: label for label, name in enumerate(classes)}
    paths, labels = [], []
    for name in folders:
        files, left_out = _class_files(root / name)
        paths += files
        labels += [index[name]] * len(files)
        ignored += left_out
    if not paths:
        raise BcpkdError(f"{root}: no images under {root}/<class>/ (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    return FolderListing(paths, labels, list(classes), ignored)


def channel_stats(images: torch.Tensor, rows_per_block: int = 4096) -> dict:
    """Per-channel mean and standard deviation of uint8 images [N, C, H, W] in [0, 1] units, in blocks."""
    return block_stats(images[start:start + rows_per_block] for start in range(0, len(images), rows_per_block))


def block_stats(blocks: Iterable[torch.Tensor]) -> dict:
    """`channel_stats` of the images that arrive as uint8 blocks [B, C, H, W] (read once, in order)."""
    total, squares, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    for block in blocks:
        scaled = block.double().div_(255.0)
        total += scaled.sum(dim=(0, 2, 3))
        squares += scaled.square().sum(dim=(0, 2, 3))
        count += block.shape[0] * block.shape[2] * block.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return {"mean": [round(v, 6) for v in mean.tolist()], "std": [round(v, 6) for v in std.tolist()]}


def source_fingerprint(root: Path, paths: list[Path]) -> str:
    """SHA-256 (16 hex digits) of the files' paths relative to root and their sizes."""
    digest = hashlib.sha256()
    for p in paths:
        digest.update(f"{p.relative_to(root)}\0{p.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def store_folder(root: Path) -> Path:
    """`<root>/.bcpkd-store` when writable, else the user's cache folder."""
    local = Path(root) / STORE_NAME
    if os.access(root, os.W_OK) or os.access(local, os.W_OK):
        return local
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bcpkd" / "store"


STATS_SAMPLE = 5000  # training files whose channel statistics normalise streamed images
STORE_HEADER = 4096  # bytes reserved for a store's safetensors header (written once its statistics are known)


def store_path(root: Path, split: str, paths: list[Path], size: int, store: Path | None = None) -> Path:
    """Where a split's store lives: its name carries the files' fingerprint, the decoding size and the decoding
    rule (DECODER: a store of an older rule is decoded again)."""
    at = f"-{size}px" if size else ""
    name = f"{Path(root).name}-{split}-{source_fingerprint(root, paths)}{at}-{DECODER}.safetensors"
    return (store or store_folder(root)) / name


class Store(NamedTuple):
    """A split's images as stored: those of its readable files, and which files could not be read."""

    images: torch.Tensor | MappedRows  # uint8 [N_readable, 3, H, W]
    labels: torch.Tensor  # int64 [N_readable]
    decoded: bool  # decoded now (not found stored)
    stats: dict | None  # channel mean and std of the readable images
    unreadable: dict[int, str]  # listed file index -> why it could not be read


def _decode_block(paths: PathTable, shape: tuple[int, int, int], resize: bool, rows: torch.Tensor):
    """Decode files `rows` (in a worker): (uint8 [B_readable, *shape], the readable rows, {row: reason} of the
    others, the first wrong size found (resize False) or None)."""
    images, readable, failed = [], [], {}
    for row in rows.tolist():
        try:
            image = decode_file(paths[row])
        except UnreadableImage as err:
            failed[row] = err.reason[:60]
            continue
        image = square(image, shape[-1]) if resize else image
        if tuple(image.shape) != tuple(shape):
            return None, None, failed, (paths[row], tuple(image.shape))
        images.append(image)
        readable.append(row)
    stacked = torch.stack(images) if images else torch.zeros(0, *shape, dtype=torch.uint8)
    return stacked, readable, failed, None


def _first_shape(paths: list[Path], size: int) -> tuple[int, int, int] | None:
    """The shape every stored image gets: (3, size, size), or with size 0 the first readable file's."""
    if size:
        return (3, size, size)
    for path in paths:
        try:
            return tuple(decode_file(path).shape)
        except UnreadableImage:
            continue
    return None


def write_store(path: Path, paths: list[Path], labels: torch.Tensor, size: int, workers: int = 0,
                rows_per_block: int = 256) -> dict[int, str]:
    """Decode the files into a uint8 store written block by block (decoded in worker processes; memory holds a
    few blocks), with the channel statistics in its metadata; with size 0 every image must have the first
    one's size. Files that cannot be decoded are left out and returned ({index: reason}); the store records
    which listed files it holds (`rows`). Written atomically.

    Layout: 8 + header bytes, then labels int64 [M], rows int64 [M] and images uint8 [M, 3, H, W] of the M
    readable files. The images are written first, at the offset they have when every file is readable; the
    header absorbs the 16 bytes per unreadable file that labels and rows do not use."""
    shape = _first_shape(paths, size)
    if shape is None:
        return {i: "not a readable image" for i in range(len(paths))}
    table = PathTable(paths)
    blocks = [torch.arange(start, min(start + rows_per_block, len(paths)))
              for start in range(0, len(paths), rows_per_block)]
    unreadable: dict[int, str] = {}

    def write(tmp: Path) -> None:
        readable: list[int] = []
        with open(tmp, "wb") as f:
            f.seek(8 + STORE_HEADER + 16 * len(paths))

            def written_blocks():
                for images, rows, failed, wrong in read_in_workers(
                        functools.partial(_decode_block, table, shape, bool(size)), blocks, workers):
                    if wrong is not None:
                        raise BcpkdError(f"{wrong[0]}: images have different sizes ({wrong[1][2]}x{wrong[1][1]} pixels "
                                         f"here, {shape[2]}x{shape[1]} in the first); set --set data.image_size=S to decode them all at S "
                                         f"x S (shorter side resized, centre crop)")
                    unreadable.update(failed)
                    readable.extend(rows)
                    f.write(images.contiguous().numpy().tobytes())
                    yield images

            stats = block_stats(written_blocks()) if len(unreadable) < len(paths) else None
            n = len(readable)
            header_bytes = STORE_HEADER + 16 * (len(paths) - n)
            f.seek(8 + header_bytes)
            f.write(labels[readable].long().contiguous().numpy().tobytes())
            f.write(torch.tensor(readable, dtype=torch.long).numpy().tobytes())
            reasons = {str(i): unreadable[i] for i in sorted(unreadable)[:LISTED_REASONS]}
            header = json.dumps({"__metadata__": {"stats": json.dumps(stats), "unreadable": json.dumps(reasons)},
                                 "labels": {"dtype": "I64", "shape": [n], "data_offsets": [0, 8 * n]},
                                 "rows": {"dtype": "I64", "shape": [n], "data_offsets": [8 * n, 16 * n]},
                                 "images": {"dtype": "U8", "shape": [n, *shape],
                                            "data_offsets": [16 * n, 16 * n + n * math.prod(shape)]}}).encode()
            if len(header) > header_bytes:
                raise BcpkdFailure(f"{path}: the store's header outgrew its reserved space")
            f.seek(0)
            f.write(header_bytes.to_bytes(8, "little") + header.ljust(header_bytes, b" "))

    if len(unreadable) < len(paths) or not paths:
        atomic_write(path, write)
    return unreadable


LISTED_REASONS = 100  # unreadable files whose reason a store keeps (the others: "unreadable")


def load_or_decode(root: Path, split: str, paths: list[Path], labels: list[int], store: Path | None = None,
                   size: int = 0, workers: int = 0) -> Store:
    """The split's images from the store (default: store_folder(root)), or decoded now (at `size`, if given;
    `write_store`) and stored with their channel statistics. A store larger than `in_memory_limit` is read
    from disk as it is indexed (MappedRows). Files that cannot be decoded are not in it; they are returned
    (and remembered for streaming, `unreadable_files`)."""
    path = store_path(root, split, paths, size, store)
    decoded = not path.is_file()
    if decoded:
        found = write_store(path, paths, torch.tensor(labels), size, workers)
        remember_unreadable(root, {paths[i]: reason for i, reason in found.items()})
        if len(found) == len(paths):
            return Store(torch.zeros(0, 3, size, size, dtype=torch.uint8), torch.zeros(0, dtype=torch.long),
                         True, None, found)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        stats = json.loads(meta.get("stats", "null"))
        reasons = json.loads(meta.get("unreadable", "{}"))
        labels, rows = f.get_tensor("labels"), f.get_tensor("rows")
        if path.stat().st_size > in_memory_limit():
            mapped = map_tensor(path, "images")
            images = MappedRows(mapped, torch.arange(len(mapped)), workers=workers)
        else:
            images = f.get_tensor("images")
    held = set(rows.tolist())
    unreadable = {i: reasons.get(str(i), "unreadable") for i in range(len(paths)) if i not in held}
    return Store(images, labels, decoded, stats or (channel_stats(images) if len(images) else None), unreadable)


def _registry(root: Path) -> Path:
    return store_folder(root) / f"{Path(root).name}-unreadable.json"


def remember_unreadable(root: Path, found: dict[Path, str]) -> None:
    """Record files that failed to decode ({path: reason}, with their size now), so that a later run over the
    files (streamed) knows them without decoding them again, until the file changes."""
    if not found:
        return
    registry = _registry(root)
    known = json.loads(registry.read_text()) if registry.is_file() else {}
    for path, reason in found.items():
        size = path.stat().st_size if path.exists() else -1
        known[str(Path(path).relative_to(root))] = [size, reason]
    write_text(registry, json.dumps(known, indent=0))


def unreadable_files(root: Path, paths: list[Path]) -> dict[int, str]:
    """Files of a listing known to be unreadable without decoding them: empty files, files whose header is
    not an image's (PIL reads the header only), and files that failed to decode before and have not changed
    since (`remember_unreadable`). The header check is kept per listing beside the store."""
    known = json.loads(_registry(root).read_text()) if _registry(root).is_file() else {}
    checked = store_path(root, "headers", paths, 0)
    checked = checked.with_name(checked.stem + "-unreadable.json")
    if checked.is_file():
        headers = {int(i): reason for i, reason in json.loads(checked.read_text()).items()}
    else:
        headers = {i: reason for i, reason in enumerate(map(header_problem, paths)) if reason}
        write_text(checked, json.dumps({str(i): reason for i, reason in headers.items()}))
    for i, path in enumerate(paths):
        entry = known.get(str(path.relative_to(root)))
        if entry is not None and i not in headers and path.stat().st_size == entry[0]:
            headers[i] = entry[1]
    return headers


def stream_stats(root: Path, paths: list[Path], size: int, workers: int = 0, store: Path | None = None) -> dict:
    """Channel statistics for streamed images: those of a seeded sample of STATS_SAMPLE training files (all of
    a smaller folder: then equal to the store's), kept as JSON beside where the store would be so that they
    are computed once."""
    stored = store_path(root, "train", paths, size, store)
    path = stored.with_name(stored.stem + f"-stats{STATS_SAMPLE}.json")
    if path.is_file():
        return json.loads(path.read_text())
    sample = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0))[:STATS_SAMPLE].sort().values
    reader = StreamedRows(paths, (3, size, size), sample, workers=workers,
                          on_unreadable=functools.partial(remember_unreadable, root))
    stats = channel_stats(reader, rows_per_block=256)
    write_text(path, json.dumps(stats))
    return stats


def in_memory_limit() -> int:
    """Stores larger than this many bytes (a quarter of the machine's memory) are read from disk as needed."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4

