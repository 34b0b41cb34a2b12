"""predict: class names and probabilities for new inputs, as CSV (stdout or --out .csv/.jsonl).

Inputs are image files and folders (read recursively by the image-folder rules: image suffixes, hidden entries
ignored) for image models, .csv/.npz files of feature rows for table models, or for text models .txt files (one
text a line, blank lines skipped; sentence pairs: a tab between) and .csv/.tsv/.jsonl/.parquet tables (the
text in --text-column, by default the column the model was trained on). Each row: the input (a table's or text
file's rows as FILE:LINE; Parquet: FILE:ROW), the predicted class and its probability, the top-k classes, the
predictive entropy and, where the model has one, its epistemic part. Unreadable inputs (empty texts among them)
are listed on stderr; the rows of the others are written first.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from bcpkd_cli import artifacts
from bcpkd_cli.console import line
from bcpkd_cli.data.decode import IMAGE_SUFFIXES, UnreadableImage
from bcpkd_cli.data.text import need_text_extra
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.runners import Runner, open_model
from bcpkd_cli.threads import apply_threads

LISTED = 20  # unreadable inputs named in the final line
TABLE_SUFFIXES = (".csv", ".npz")
TEXT_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")


def _image_files(inputs: list[Path]) -> list[Path]:
    """Files named, and image files under folders named (recursively, sorted; hidden entries skipped)."""
    files = []
    for item in inputs:
        if item.is_dir():
            for parent, dirs, names in os.walk(item, followlinks=True):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [Path(parent) / n for n in sorted(names)
                          if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES]
        elif item.exists():
            files.append(item)
        else:
            raise BcpkdError(f"{item}: no such file or folder")
    return files


def _rows(path: Path, width: int, label_column: str) -> tuple[list[str], np.ndarray]:
    """(names, float32 rows [N, width]) of a .csv (a header, whose label column, if there, is dropped; a first row of
    numbers is a row, not a header) or .npz (x_test, else x_train, else its only array)."""
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            key = next((k for k in ("x_test", "x_train") if k in archive.files), archive.files[0])
            rows = np.asarray(archive[key], dtype=np.float32)
        names = [f"{path}:{key}[{i}]" for i in range(len(rows))]
    else:
        with open(path, newline="") as f:
            table = [r for r in csv.reader(f) if r]
        headed = bool(table) and not all(_is_number(cell) for cell in table[0])  # a first row of numbers is a row
        header = table[0] if headed else []
        keep = [i for i, name in enumerate(header) if name != label_column] if headed else \
            list(range(len(table[0]) if table else 0))
        try:
            rows = np.asarray([[float(r[i]) for i in keep] for r in table[headed:]], dtype=np.float32)
        except (ValueError, IndexError):
            raise BcpkdError(f"{path}: rows are not numbers (besides a {label_column!r} column); give the feature "
                             f"columns the model was trained on") from None
        names = [f"{path}:{i + 1 + headed}" for i in range(len(rows))]  # the line number
    if rows.ndim != 2 or rows.shape[1] != width:
        raise BcpkdError(f"{path}: rows of {rows.shape[-1] if rows.ndim else 0} features; this model takes {width}")
    return names, rows


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _text_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file."""
    try:
        return list(enumerate(path.read_text(encoding="utf-8").splitlines(), start=1))
    except UnicodeDecodeError:
        raise BcpkdError(f"{path}: not UTF-8 text; save it as UTF-8") from None


def _table(path: Path, columns: list[str], option: str) -> list[tuple[str, list]]:
    """(FILE:LINE, the values of `columns`) of every record of a .csv/.tsv/.jsonl/.parquet table (Parquet: FILE:ROW);
    a missing column is refused, naming `option`."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        for number, text in _text_lines(path):
            if text.strip():
                try:
                    record = json.loads(text)
                except json.JSONDecodeError:
                    record = None
                if not isinstance(record, dict):
                    raise BcpkdError(f"{path}: line {number} is not a JSON object; one object per line")
                records.append((number, record))
        found = list(records[0][1]) if records else []
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet
        except ImportError:
            raise need_text_extra(f"{path}: reading Parquet") from None
        table = pyarrow.parquet.read_table(path)
        records, found = list(enumerate(table.to_pylist(), start=1)), table.column_names
    else:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            records = [(reader.line_num, record) for record in reader]
            found = list(reader.fieldnames or [])
    for column in columns:
        if records and column not in found:
            raise BcpkdError(f"{path}: no column {column!r} (found: {', '.join(map(str, found[:8]))}); name it with "
                             f"{option} NAME")
    return [(f"{path}:{number}", ["" if record.get(c) is None else str(record[c]) for c in columns])
            for number, record in records]


def _texts(inputs: list[Path], pre, text_column: str) -> list[tuple[str, object]]:
    """(name, text or (text, second text)) of every example of the text files and tables."""
    items = []
    for path in inputs:
        if not path.is_file() or path.suffix.lower() not in TEXT_SUFFIXES:
            raise BcpkdError(f"{path}: {'no such file' if not path.exists() else 'this model classifies text'}; give "
                             f".txt files (one text a line) or .csv/.tsv/.jsonl/.parquet tables with the text in "
                             f"--text-column")
        if path.suffix.lower() == ".txt":
            items += [(f"{path}:{number}", text) for number, text in _text_lines(path) if text.strip()]
            continue
        columns = [text_column or pre.text_column] + ([pre.pair_column] if pre.pair_column else [])
        items += [(name, tuple(values) if pre.pair_column else values[0])
                  for name, values in _table(path, columns, "--text-column")]
    return items


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs.double() * probs.double().clamp_min(1e-12).log()).sum(dim=1)


class _Writer:
    """Rows as CSV on stdout (written as they come) or, with `out`, as .csv or .jsonl written at the end."""

    def __init__(self, out: str, fields: list[str], force: bool):
        self.out, self.fields, self.records = Path(out) if out else None, fields, []
        if self.out is not None and self.out.suffix not in (".csv", ".jsonl"):
            raise BcpkdError(f"--out {out}: write .csv or .jsonl")
        if self.out is not None and self.out.exists() and not force:
            raise BcpkdError(f"--out {out}: exists already; give another file, or add --force to replace it")
        if self.out is None:
            self.csv = csv.DictWriter(sys.stdout, fields)
            self.csv.writeheader()

    def write(self, record: dict) -> None:
        if self.out is None:
            self.csv.writerow(record)
        else:
            self.records.append(record)

    def close(self) -> None:
        if self.out is None:
            sys.stdout.flush()
        elif self.out.suffix == ".jsonl":
            artifacts.write_text(self.out, "".join(json.dumps(r) + "\n" for r in self.records))
        else:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, self.fields)
            writer.writeheader()
            writer.writerows(self.records)
            artifacts.write_text(self.out, buffer.getvalue())


def _records(runner: Runner, names: list[str], x: torch.Tensor, top_k: int) -> list[dict]:
    _, probs, epistemic = runner.run(x)
    probs = probs.float()
    entropy = _entropy(probs)
    values, ids = probs.topk(min(top_k, probs.shape[1]), dim=1)
    records = []
    for i, name in enumerate(names):
        record = {"input": name, "class": runner.classes[int(ids[i, 0])], "probability": round(float(values[i, 0]), 6),
                  "top_k": ";".join(f"{runner.classes[int(c)]}:{float(v):.6f}" for v, c in zip(values[i], ids[i])),
                  "entropy": round(float(entropy[i]), 6)}
        if runner.epistemic:
            record[runner.epistemic] = round(float(epistemic[i]), 6)
        records.append(record)
    return records


def run(model: str, inputs: list[Path], out: str, top_k: int, batch_size: int, skip_unreadable: bool,
        draws: int = 0, label_column: str = "label", force: bool = False, text_column: str = "") -> int:
    """Classify the inputs; the number of rows written. Unreadable inputs: an error after the rows of the others
    (unless `skip_unreadable`)."""
    apply_threads()
    runner = open_model(model, draws)
    missing = [path for path in inputs if not path.exists()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BcpkdError(f"{missing[0]}: no such file or folder{more}; give existing inputs (images or folders of "
                         f"them, .csv/.npz feature rows, texts)")
    pre = runner.preprocess
    fields = ["input", "class", "probability", "top_k", "entropy"] + ([runner.epistemic] if runner.epistemic else [])
    if text_column and pre.kind != "text":
        raise BcpkdError(f"--text-column {text_column}: this model classifies "
                         f"{'feature rows' if pre.kind == 'features' else 'images'}, not text; leave it out")
    if pre.kind == "features":
        tables = [p for p in inputs if p.suffix.lower() in TABLE_SUFFIXES]
        if len(tables) != len(inputs):
            raise BcpkdError(f"{next(p for p in inputs if p not in tables)}: this model classifies feature rows; give "
                             f".csv or .npz files of them")
        items = [(name, row) for table in tables for name, row in zip(*_rows(table, pre.shape[0], label_column))]
    elif pre.kind == "text":
        items = _texts(inputs, pre, text_column)
    else:
        tables = [p for p in inputs if p.suffix.lower() in TABLE_SUFFIXES]
        if tables:
            raise BcpkdError(f"{tables[0]}: this model classifies images; give image files or folders")
        items = [(str(p), p) for p in _image_files(inputs)]
    if not items:
        raise BcpkdError("INPUT: nothing to classify (no image files, rows or texts found)")
    writer = _Writer(out, fields, force)
    line(f"predict: {runner.description}: {len(items):,} input{'s' * (len(items) != 1)}"
         f"{f' -> {out}' if out else ''}")
    unreadable: list[tuple[str, str]] = []
    written = 0
    for start in range(0, len(items), batch_size):
        names, batch = [], []
        for name, item in items[start:start + batch_size]:
            try:
                batch.append(pre(item))
                names.append(name)
            except (UnreadableImage, BcpkdError) as err:
                unreadable.append((name, getattr(err, "reason", str(err))))
        if batch:
            for record in _records(runner, names, pre.collate(batch), max(top_k, 1)):
                writer.write(record)
                written += 1
        if len(items) > batch_size:
            line(f"predict: {min(start + batch_size, len(items))}/{len(items)} inputs")
    writer.close()
    if unreadable:
        named = ", ".join(f"{name} ({reason})" for name, reason in unreadable[:LISTED])
        more = f" and {len(unreadable) - LISTED} more" if len(unreadable) > LISTED else ""
        if not skip_unreadable:
            raise BcpkdError(f"{len(unreadable)} unreadable input{'s' if len(unreadable) > 1 else ''}: {named}{more}; "
                             f"the rows of the other {written} were written; remove them or add --skip-unreadable")
        line(f"skipped {len(unreadable)} unreadable input{'s' if len(unreadable) > 1 else ''}: {named}{more}")
    return written
