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
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bcpkd_cli.artifacts import atomic_write
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


def decode_images(paths: list[Path]) -> torch.Tensor:
    """Decode image files to RGB uint8 [N, 3, H, W] (all images must share one size)."""
    with warnings.catch_warnings():  # torchvision 0.29 marks its decoders deprecated in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_image, read_file

        images = [decode_image(read_file(str(p)), mode=ImageReadMode.RGB) for p in paths]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise BcpkdError(f"{paths[0].parent.parent}: images have different sizes {sorted(shapes)[:3]}; "
                         f"resize them to one size first")
    return torch.stack(images)


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


def load_or_decode(root: Path, split: str, paths: list[Path], decode,
                   store: Path | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The split's (images, labels) from the store (default: store_folder(root)), or decoded now and
    stored. Returns (images, labels, whether it decoded now)."""
    key = source_fingerprint(root, paths)
    path = (store or store_folder(root)) / f"{Path(root).name}-{split}-{key}.safetensors"
    if path.is_file():
        tensors = load_file(str(path))
        return tensors["images"], tensors["labels"], False
    images, labels = decode()
    atomic_write(path, lambda p: save_file({"images": images.contiguous(), "labels": labels}, str(p)))
    return images, labels, True
