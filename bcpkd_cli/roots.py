"""What a data.root is, by what is there: the dataset it names when data.name is left out, and the check of a
data.root against a data.name that is given (config.py's rules on the data section)."""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

from bcpkd_cli.choices import DatasetName
from bcpkd_cli.schema import Recipe

VECTOR_DATA = (DatasetName.synthetic, DatasetName.arrays)
TEXT_DATA = (DatasetName.text, DatasetName.hf)  # the others are images
ROOT_FOLDERS = {DatasetName.cifar10: "cifar-10-batches-py", DatasetName.cifar100: "cifar-100-python",
                DatasetName.imagefolder: "train"}  # what a data.root folder holds, by dataset
TABLE_SUFFIXES = (".csv", ".npz", ".safetensors")  # arrays
TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")  # text (a .csv with a column of words)
ROOT_KINDS = ("a folder with train/ (imagefolder), cifar-10-batches-py/ (cifar10) or cifar-100-python/ (cifar100), "
              "a .csv, .npz or .safetensors file (arrays), or a .csv/.tsv/.jsonl/.parquet file or a folder with "
              "train.csv (or .tsv/.jsonl/.parquet) of text (text)")


def _csv_has_words(path: Path) -> bool:
    """Whether a .csv's first example has a value besides its label that is not a number (text, not features)."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = csv.reader(f)
        header, first = next(rows, []), next(rows, [])
    numbers = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$|^\s*(nan|inf|-inf)\s*$", re.I)
    return any(not numbers.match(v) for k, v in zip(header, first) if k != "label")


def root_kind(root: str) -> DatasetName | None:
    """The dataset a data.root is, by what is there: a folder with train/ (imagefolder), cifar-10-batches-py/
    (cifar10) or cifar-100-python/ (cifar100), or train.csv/.tsv/.jsonl/.parquet (text); a .npz or .safetensors
    file (arrays), a .tsv/.jsonl/.parquet file (text), a .csv file (text where it holds words, else arrays);
    None otherwise."""
    path = Path(root)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return DatasetName.text if _csv_has_words(path) else DatasetName.arrays
        return DatasetName.arrays if suffix in TABLE_SUFFIXES else DatasetName.text if suffix in TEXT_SUFFIXES \
            else None
    if path.is_dir() and any((path / f"train{suffix}").is_file() for suffix in TEXT_SUFFIXES):
        return DatasetName.text
    return next((name for name, folder in ROOT_FOLDERS.items() if (path / folder).is_dir()), None)


def _expected(name: DatasetName) -> str:
    if name == DatasetName.text:
        return "a .csv/.tsv/.jsonl/.parquet file or a folder with train.csv (or .tsv/.jsonl/.parquet)"
    return "a .csv, .npz or .safetensors file" if name == DatasetName.arrays else \
        f"a folder with {ROOT_FOLDERS[name]}/"


def named_by_root(tree: dict, recipe: Recipe, errors: list[str]) -> Recipe:
    """data.name, where the tree does not give one, named by what data.root is; data.root checked against a
    data.name that is given (a root that is not there is left to the dataset: a checkpoint's may have moved)."""
    cfg = recipe.data
    if not cfg.root:
        return recipe
    given = tree["data"].get("name") if isinstance(tree.get("data"), dict) else None
    if given is not None and given not in [d.value for d in DatasetName]:
        return recipe  # said already
    kind = root_kind(cfg.root)
    if given is None:
        if kind is None:
            there = "does not exist" if not Path(cfg.root).exists() else "is no dataset bcpkd reads"
            errors.append(f"data.root: {cfg.root} {there}; expected {ROOT_KINDS}")
            return recipe
        return dataclasses.replace(recipe, data=dataclasses.replace(cfg, name=kind))
    if cfg.name == DatasetName.synthetic:
        errors.append(f"data.root is set but data.name is synthetic, which reads no files; leave out --data-root, "
                      f"or give --data {kind.value if kind else 'imagefolder, cifar10, cifar100 or arrays'}")
    elif cfg.name == DatasetName.hf:
        pass  # a datasets name, or a folder that datasets reads
    elif kind is not None and kind != cfg.name and {kind, cfg.name} != {DatasetName.text, DatasetName.arrays}:
        errors.append(f"data.root: {cfg.root} holds {kind.value} data ({_expected(kind)}), but data.name is "
                      f"{cfg.name.value}; give --data {kind.value}, or a data.root with {cfg.name.value} data "
                      f"({_expected(cfg.name)})")
    elif kind is None and Path(cfg.root).exists() and not (cfg.download and cfg.name in (DatasetName.cifar10,
                                                                                         DatasetName.cifar100)):
        errors.append(f"data.root: {cfg.root} is not {cfg.name.value} data; data.name {cfg.name.value} expects "
                      f"{_expected(cfg.name)}")
    return recipe
