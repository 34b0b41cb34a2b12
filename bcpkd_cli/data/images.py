"""Image datasets decoded once into a uint8 tensor store: ImageFolder trees and CIFAR-10/100.

A split is decoded the first time it is used and saved as a safetensors file (`images` uint8
[N, 3, H, W], `labels` int64 [N]) next to the data, in `<root>/.bcpkd-store/`, or under
`$XDG_CACHE_HOME/bcpkd` when the data folder is read-only. The store's name carries a fingerprint
of the source files (relative paths and sizes), so a changed tree is decoded again and an unchanged
one never is. CIFAR's python pickles are read with an unpickler that only rebuilds numpy arrays,
lists, dicts and plain values: a downloaded file cannot execute code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from bcpkd_cli.artifacts import atomic_write, map_tensor, write_text
from bcpkd_cli.data.rows import MappedRows
from bcpkd_cli.errors import BcpkdError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


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


def list_image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """`root/<class>/<file>` -> file paths, labels and class names (sorted, as torchvision's ImageFolder)."""
    root = Path(root)
    if not root.is_dir():
        raise BcpkdError(f"{root}: no such image folder; expected {root}/<class>/<image>.jpg")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(label)
    if not paths:
        raise BcpkdError(f"{root}: no .jpg/.png images under {root}/<class>/")
    return paths, labels, classes


def square(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [C, H, W] -> uint8 [C, size, size]: the shorter side resized to `size` (antialiased), centre crop."""
    from torchvision.transforms.v2 import functional as TF

    return TF.center_crop(TF.resize(image, [size], antialias=True), [size, size])


def decode_images(paths: list[Path], size: int = 0) -> torch.Tensor:
    """Decode image files to RGB uint8 [N, 3, H, W] (grayscale, palette and RGBA images become RGB); with `size`,
    each at size x size (`square`), else all must share one size."""
    with warnings.catch_warnings():  # torchvision 0.29 marks its decoders deprecated in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_image, read_file

        images = []
        for p in paths:
            try:
                image = decode_image(read_file(str(p)), mode=ImageReadMode.RGB)
            except RuntimeError as err:
                raise BcpkdError(f"{p}: not a readable image ({str(err)[:80]}); remove it or replace it") from None
            images.append(square(image, size) if size else image)
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise BcpkdError(f"{paths[0].parent.parent}: images have different sizes {sorted(shapes)[:3]}; set "
                         f"--set data.image_size=S to decode them all at S x S (shorter side resized, centre crop)")
    return torch.stack(images)


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
    local = Path(root) / ".bcpkd-store"
    if os.access(root, os.W_OK) or os.access(local, os.W_OK):
        return local
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bcpkd" / "store"


STATS_SAMPLE = 5000  # training files whose channel statistics normalise streamed images
STORE_HEADER = 4096  # bytes reserved for a store's safetensors header (written once its statistics are known)


def store_path(root: Path, split: str, paths: list[Path], size: int, store: Path | None = None) -> Path:
    """Where a split's store lives: its name carries the files' fingerprint and the decoding size."""
    at = f"-{size}px" if size else ""
    return (store or store_folder(root)) / f"{Path(root).name}-{split}-{source_fingerprint(root, paths)}{at}.safetensors"


def write_store(path: Path, paths: list[Path], labels: torch.Tensor, size: int, workers: int = 0,
                rows_per_block: int = 256) -> None:
    """Decode the files into a uint8 store [N, 3, S, S] written block by block (decoded in worker processes;
    memory holds a few blocks), with the channel statistics in its metadata. With size 0 every image must
    have the first one's size. Written atomically."""
    from bcpkd_cli.data.rows import StreamedRows

    first = decode_images(paths[:1], size)[0]
    reader = StreamedRows(paths, tuple(first.shape), torch.arange(len(paths)), workers=workers, resize=bool(size))
    shape = [len(paths), *first.shape]
    n_bytes = torch.Size(shape).numel()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.seek(8 + STORE_HEADER)  # the labels first: int64 stays 8-byte aligned whatever the image bytes
            f.write(labels.long().contiguous().numpy().tobytes())

            def written_blocks():
                for start in range(0, len(paths), rows_per_block):
                    block = reader[start:start + rows_per_block]  # uint8 [B, 3, S, S]
                    f.write(block.contiguous().numpy().tobytes())
                    yield block

            stats = block_stats(written_blocks())
            n_labels = 8 * len(paths)
            header = json.dumps({"__metadata__": {"stats": json.dumps(stats)},
                                 "labels": {"dtype": "I64", "shape": [len(paths)], "data_offsets": [0, n_labels]},
                                 "images": {"dtype": "U8", "shape": shape,
                                            "data_offsets": [n_labels, n_labels + n_bytes]}}).encode()
            assert len(header) <= STORE_HEADER, "the store's header outgrew its reserved space"
            f.seek(0)
            f.write(STORE_HEADER.to_bytes(8, "little") + header.ljust(STORE_HEADER, b" "))

    atomic_write(path, write)


def load_or_decode(root: Path, split: str, paths: list[Path], labels: list[int], store: Path | None = None,
                   size: int = 0, workers: int = 0) -> tuple[torch.Tensor | MappedRows, torch.Tensor, bool, dict]:
    """The split's (images, labels) from the store (default: store_folder(root)), or decoded now (at `size`, if
    given; `write_store`) and stored with its channel statistics. A store larger than `in_memory_limit` is
    read from disk as it is indexed (MappedRows). Returns (images, labels, whether it decoded now, channel
    statistics)."""
    path = store_path(root, split, paths, size, store)
    decoded = not path.is_file()
    if decoded:
        write_store(path, paths, torch.tensor(labels), size, workers)
    with safe_open(str(path), framework="pt") as f:
        stats = json.loads((f.metadata() or {}).get("stats", "null"))
        labels = f.get_tensor("labels")
        if path.stat().st_size > in_memory_limit():
            mapped = map_tensor(path, "images")
            images = MappedRows(mapped, torch.arange(len(mapped)), workers=workers)
        else:
            images = f.get_tensor("images")
    return images, labels, decoded, stats or channel_stats(images)


def stream_stats(root: Path, paths: list[Path], size: int, workers: int = 0, store: Path | None = None) -> dict:
    """Channel statistics for streamed images: those of a seeded sample of STATS_SAMPLE training files (all of
    a smaller folder: then equal to the store's), kept as JSON beside where the store would be so that they
    are computed once."""
    from bcpkd_cli.data.rows import StreamedRows

    stored = store_path(root, "train", paths, size, store)
    path = stored.with_name(stored.stem + f"-stats{STATS_SAMPLE}.json")
    if path.is_file():
        return json.loads(path.read_text())
    sample = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0))[:STATS_SAMPLE].sort().values
    stats = channel_stats(StreamedRows(paths, (3, size, size), sample, workers=workers), rows_per_block=256)
    write_text(path, json.dumps(stats))
    return stats


def in_memory_limit() -> int:
    """Stores larger than this many bytes (a quarter of the machine's memory) are read from disk as needed."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4

