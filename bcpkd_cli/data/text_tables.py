"""Where text examples come from: a table file or a folder of them (`data.name: text`), or a Hugging Face
`datasets` name (`data.name: hf`).

- `data.root` a .csv, .tsv, .jsonl or .parquet file: its rows are the training examples and a seeded fifth
  is carved out as the test split; a folder: `train.<suffix>` and `test.<suffix>` (else `validation` or `dev`).
- `data.text_column` (default `text`), `data.text_pair_column` (sentence pairs) and `data.label_column`
  (`label`): labels are integers 0..C-1, or strings whose sorted distinct training values are the class names.
- `data.name: hf`, `data.root: glue/sst2` (a dataset and its configuration) or any name or local folder that
  `datasets.load_dataset` takes: its train split, and its test split, or its validation split where the test
  split has no labels (GLUE's are -1). Class names come from the label feature where it has them.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from bcpkd_cli.data.text import TEXT_SUFFIXES, need_text_extra
from bcpkd_cli.errors import BcpkdError

TEST_NAMES = ("test", "validation", "dev")  # a folder's test file, the first of these that is there


@dataclass(frozen=True)
class Columns:
    """One split's examples: texts, second texts (or None) and raw labels (ints or strings)."""

    texts: list[str]
    pairs: list[str] | None
    labels: list


@dataclass(frozen=True)
class TextSource:
    """A text dataset as read: the training examples, the test examples (None: carve them), class names if the
    source names them (else from the labels)."""

    train: Columns
    test: Columns | None
    classes: list[str] | None = None


def _records(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".jsonl":
        records = []
        with open(path, encoding="utf-8") as f:
            for number, text in enumerate(f, start=1):
                if text.strip():
                    try:
                        records.append(json.loads(text))
                    except json.JSONDecodeError:
                        raise BcpkdError(f"{path}: line {number} is not JSON; one JSON object per line") from None
        return records
    try:
        import pyarrow.parquet
    except ImportError:
        raise need_text_extra(f"{path}: reading Parquet") from None
    return pyarrow.parquet.read_table(path).to_pylist()


def _columns(records: list[dict], where: str, text: str, pair: str, label: str) -> Columns:
    """The named columns of `records`; a missing column or value is refused with its line and the key to set."""
    if not records:
        raise BcpkdError(f"{where}: holds no examples")
    for key, column in (("data.text_column", text), ("data.text_pair_column", pair), ("data.label_column", label)):
        if column and column not in records[0]:
            found = ", ".join(map(str, list(records[0])[:8]))
            raise BcpkdError(f"{where}: no column {column!r} (found: {found}); name it with --set {key}=NAME")
    for number, record in enumerate(records):
        for column in (text, pair, label):
            if column and (record.get(column) is None or record.get(column) == "" and column == label):
                raise BcpkdError(f"{where}: example {number + 1} has no {column!r}; fill or remove it")
    labels = [record[label] for record in records]
    if all(isinstance(v, str) and v.strip().lstrip("-").isdigit() for v in labels):
        labels = [int(v) for v in labels]
    return Columns([str(r[text]) for r in records], [str(r[pair]) for r in records] if pair else None, labels)


def _table_file(folder: Path, stem: str) -> Path | None:
    return next((folder / f"{stem}{s}" for s in TEXT_SUFFIXES if (folder / f"{stem}{s}").is_file()), None)


def is_text_folder(path: Path) -> bool:
    return path.is_dir() and _table_file(path, "train") is not None


def read_tables(root: Path, text: str, pair: str, label: str) -> TextSource:
    """A table file (test carved later) or a folder with train.<suffix> and test/validation/dev.<suffix>."""
    if root.is_file():
        if root.suffix.lower() not in TEXT_SUFFIXES:
            raise BcpkdError(f"data.root {root}: text comes from a .csv, .tsv, .jsonl or .parquet file or a folder "
                             f"of train and test files")
        return TextSource(_columns(_records(root), str(root), text, pair, label), None)
    train = _table_file(root, "train")
    if train is None:
        raise BcpkdError(f"data.root {root}: {'no such file or folder' if not root.exists() else 'no train file'}; "
                         f"give a .csv/.tsv/.jsonl/.parquet file, or a folder with train.csv and test.csv (any of "
                         f"those suffixes)")
    test = next((f for f in (_table_file(root, s) for s in TEST_NAMES) if f is not None), None)
    return TextSource(_columns(_records(train), str(train), text, pair, label),
                      None if test is None else _columns(_records(test), str(test), text, pair, label))


def _load_hf(root: str):
    """datasets.load_dataset on data.root: `NAME/CONFIG` where CONFIG is one of NAME's configurations, else the
    name as it is (a Hub name or a local folder)."""
    try:
        import datasets
    except ImportError:
        raise need_text_extra("data.name hf") from None
    datasets.disable_progress_bars()  # its bars ("Generating train split") would fill a batch job's log
    name, config = root, None
    if "/" in root and not Path(root).exists():
        head, tail = root.rsplit("/", 1)
        try:
            if tail in datasets.get_dataset_config_names(head):
                name, config = head, tail
        except Exception:  # not a dataset with configurations: the whole name is tried below
            pass
    try:
        return datasets.load_dataset(name, config)
    except Exception as err:  # the library's own error (no network, no such dataset), said in one line
        raise BcpkdError(f"data.root {root}: datasets.load_dataset could not load it ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:160]}); check the name, the network or HF_DATASETS_OFFLINE "
                         f"and its cache") from None


def read_hf(root: str, text: str, pair: str, label: str) -> TextSource:
    """A `datasets` dataset: train, and test (validation where test has no labels)."""
    loaded = _load_hf(root)
    if "train" not in loaded:
        raise BcpkdError(f"data.root {root}: has no train split (splits: {', '.join(loaded)})")
    def labelled(split: str) -> bool:  # GLUE's hidden test labels are -1
        return split in loaded and label in loaded[split].column_names and all(
            v is not None and not (isinstance(v, int) and v < 0) for v in loaded[split][label])

    test_name = next((s for s in ("test", "validation", "dev") if labelled(s)), None)
    feature = loaded["train"].features.get(label)
    classes = list(feature.names) if hasattr(feature, "names") else None
    columns = [_columns(loaded[s].to_list(), f"{root} ({s})", text, pair, label) for s in ("train", test_name) if s]
    return TextSource(columns[0], columns[1] if test_name else None, classes)
