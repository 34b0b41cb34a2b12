"""Feature tables as a dataset (`data.name: arrays`, `data.root: FILE`): float features [N, D], integer labels.

- `.npz` or `.safetensors`: arrays `x_train`, `y_train` and optionally `x_test`, `y_test`, and the class
  names: an array `classes` in a .npz, a JSON list under the metadata key `classes` in a .safetensors;
- `.csv`: a header row, one column of labels (`data.label_column`, default `label`), every other column a
  feature; the test split is carved out (seeded) as when a file has no `x_test`.

Labels are integers 0..C-1 (class names: `classes`, else "0".."C-1") or strings (a .csv's label column, a .npz's
string arrays): then the class names are the training labels' distinct values, sorted, and every split is
labelled by name. Bad files are refused with the key or row at fault and the fix: missing keys, negative
labels, test labels the training labels do not have, non-finite features, row counts that differ.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from bcpkd_cli.errors import BcpkdError

KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read(path: Path, label_column: str) -> dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {k: archive[k] for k in archive.files}
        except ValueError as err:  # object arrays need pickle, which is refused
            raise BcpkdError(f"{path}: not a plain numeric .npz ({str(err)[:80]}); save arrays of numbers") from None
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}
            names = (f.metadata() or {}).get("classes")
        if names is not None:
            try:
                arrays["classes"] = np.asarray([str(n) for n in json.loads(names)])
            except (ValueError, TypeError):
                raise BcpkdError(f"{path}: metadata 'classes' is not a JSON list of class names") from None
        return arrays
    if suffix == ".csv":
        return _read_csv(path, label_column)
    raise BcpkdError(f"data.root {path}: arrays come from a .npz, .safetensors or .csv file")


def _read_csv(path: Path, label_column: str) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or label_column not in rows[0]:
        found = ", ".join(rows[0][:8]) if rows else "nothing"
        raise BcpkdError(f"{path}: no column {label_column!r} in the header ({found}); name the label column with "
                         f"--set data.label_column=NAME")
    column = rows[0].index(label_column)
    features, labels = [], []
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue  # a blank line
        try:
            labels.append(row[column].strip())
            features.append([float(v) for i, v in enumerate(row) if i != column])
        except (ValueError, IndexError):
            raise BcpkdError(f"{path}: line {number} is not numbers besides the label {label_column!r} "
                             f"({','.join(row)[:60]}); fix or remove that line") from None
    if len({len(r) for r in features}) > 1:
        raise BcpkdError(f"{path}: lines have different numbers of columns; every line needs one value per column")
    if any(not label for label in labels):
        raise BcpkdError(f"{path}: line {labels.index('') + 2} has an empty {label_column!r}; fill or remove it")
    as_integers = all(label.lstrip("-").isdigit() for label in labels)
    return {"x_train": np.asarray(features, dtype=np.float32),
            "y_train": np.asarray([int(v) for v in labels], dtype=np.int64) if as_integers else np.asarray(labels)}


def _is_text(array: np.ndarray) -> bool:
    return array.dtype.kind in "US"


def _by_name(path: Path, arrays: dict[str, np.ndarray]) -> list[str]:
    """Replace string labels by their indices into the sorted training names (in place); the class names."""
    classes = sorted(str(v) for v in np.unique(arrays["y_train"]))
    index = {name: label for label, name in enumerate(classes)}
    for split in ("train", "test"):
        if f"y_{split}" not in arrays:
            continue
        names = [str(v) for v in arrays[f"y_{split}"]]
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise BcpkdError(f"{path}: y_{split} has label {unknown[0]!r}, which no training example has "
                             f"(training classes: {', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''})")
        arrays[f"y_{split}"] = np.asarray([index[n] for n in names], dtype=np.int64)
    return classes


def _class_names(path: Path, arrays: dict[str, np.ndarray]) -> list[str]:
    """The class names in label order: string labels by name (sorted), else the file's `classes`, else "0".."C-1"."""
    if _is_text(arrays["y_train"]) or ("y_test" in arrays and _is_text(arrays["y_test"])):
        if "classes" in arrays:
            raise BcpkdError(f"{path}: has string labels and a 'classes' array; give integer labels with "
                             f"'classes', or string labels alone")
        return _by_name(path, arrays)
    if not np.issubdtype(arrays["y_train"].dtype, np.integer) or arrays["y_train"].ndim != 1 or \
            not len(arrays["y_train"]):
        return []  # refused by _check
    n_classes = int(arrays["y_train"].max()) + 1
    if "classes" not in arrays:
        return [str(c) for c in range(n_classes)]
    names = [str(v) for v in np.asarray(arrays["classes"]).reshape(-1)]
    if len(names) < n_classes or len(set(names)) != len(names):
        raise BcpkdError(f"{path}: 'classes' holds {len(names)} names{' (not distinct)' if len(set(names)) != len(names) else ''}"
                         f" but the labels go up to {n_classes - 1}; give one distinct name per class, in label order")
    return names


def _check(path: Path, arrays: dict[str, np.ndarray]) -> None:
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise BcpkdError(f"{path}: has only one of x_test and y_test; give both or neither")
    for split in ("train", "test"):
        if f"x_{split}" not in arrays:
            continue
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
            raise BcpkdError(f"{path}: x_{split} must be numbers [N, D], got {x.dtype} {x.shape}")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise BcpkdError(f"{path}: y_{split} must be integer class labels [N], got {y.dtype} {y.shape}; store "
                             f"labels as integers 0..C-1")
        if len(x) != len(y):
            raise BcpkdError(f"{path}: x_{split} has {len(x)} rows but y_{split} has {len(y)}; they must match")
        if not np.isfinite(x).all():
            raise BcpkdError(f"{path}: x_{split} has NaN or infinite values (first at row "
                             f"{int(np.argwhere(~np.isfinite(x))[0][0])}); fill or drop them")
        if len(y) and y.min() < 0:
            raise BcpkdError(f"{path}: y_{split} has negative labels; labels must be 0..C-1")
    if "y_test" in arrays and len(arrays["y_test"]) and arrays["y_test"].max() > arrays["y_train"].max():
        raise BcpkdError(f"{path}: y_test has label {int(arrays['y_test'].max())}, which no training example has "
                         f"(training labels are 0..{int(arrays['y_train'].max())})")
    if "x_test" in arrays and arrays["x_test"].shape[1] != arrays["x_train"].shape[1]:
        raise BcpkdError(f"{path}: x_test has {arrays['x_test'].shape[1]} features, x_train "
                         f"{arrays['x_train'].shape[1]}; they must match")


def read_arrays(path: Path, label_column: str = "label"
                ) -> tuple[torch.Tensor, torch.Tensor, tuple | None, list[str]]:
    """(x_train float32 [N, D], y_train int64 [N], (x_test, y_test) or None, class names), checked."""
    path = Path(path)
    if not path.is_file():
        raise BcpkdError(f"data.root {path}: no such file; give a .npz, .safetensors or .csv file of features and "
                         f"labels")
    arrays = _read(path, label_column)
    for key in ("x_train", "y_train"):
        if key not in arrays:
            raise BcpkdError(f"{path}: no array {key!r} (found: {', '.join(sorted(arrays)) or 'none'}); save "
                             f"x_train [N, D] floats and y_train [N] class labels (x_test, y_test optional)")
    classes = _class_names(path, arrays)
    _check(path, arrays)

    def pair(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(np.ascontiguousarray(arrays[f"x_{split}"], dtype=np.float32)),
                torch.from_numpy(arrays[f"y_{split}"].astype(np.int64)))

    return (*pair("train"), pair("test") if "x_test" in arrays else None, classes)
