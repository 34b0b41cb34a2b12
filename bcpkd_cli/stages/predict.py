"""predict: class names and probabilities for new inputs, as CSV (stdout or --out .csv/.jsonl).

Inputs are image files and folders (read recursively by the image-folder rules: image suffixes, hidden entries
ignored) for image models, or .csv/.npz files of feature rows for table models. Each row: the input, the
predicted class and its probability, the top-k classes, the predictive entropy and, where the model has one,
its epistemic part. Unreadable inputs are listed on stderr; the rows of the others are written first.
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
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.runners import Runner, open_model
from bcpkd_cli.threads import apply_threads

LISTED = 20  # unreadable inputs named in the final line
TABLE_SUFFIXES = (".csv", ".npz")


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
    """(names, float32 rows [N, width]) of a .csv (header; a label column, if there, is dropped) or .npz (x_test,
    else x_train, else its only array)."""
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            key = next((k for k in ("x_test", "x_train") if k in archive.files), archive.files[0])
            rows = np.asarray(archive[key], dtype=np.float32)
        names = [f"{path}:{key}[{i}]" for i in range(len(rows))]
    else:
        with open(path, newline="") as f:
            table = [r for r in csv.reader(f) if r]
        header = table[0]
        keep = [i for i, name in enumerate(header) if name != label_column]
        try:
            rows = np.asarray([[float(r[i]) for i in keep] for r in table[1:]], dtype=np.float32)
        except (ValueError, IndexError):
            raise BcpkdError(f"{path}: rows are not numbers (besides a {label_column!r} column); give the feature "
                             f"columns the model was trained on") from None
        names = [f"{path}:{i + 2}" for i in range(len(rows))]  # the line number
    if rows.ndim != 2 or rows.shape[1] != width:
        raise BcpkdError(f"{path}: rows of {rows.shape[-1] if rows.ndim else 0} features; this model takes {width}")
    return names, rows


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
        draws: int = 0, label_column: str = "label", force: bool = False) -> int:
    """Classify the inputs; the number of rows written. Unreadable inputs: an error after the rows of the others
    (unless `skip_unreadable`)."""
    apply_threads()
    runner = open_model(model, draws)
    pre = runner.preprocess
    fields = ["input", "class", "probability", "top_k", "entropy"] + ([runner.epistemic] if runner.epistemic else [])
    if pre.kind == "features":
        tables = [p for p in inputs if p.suffix.lower() in TABLE_SUFFIXES]
        if len(tables) != len(inputs):
            raise BcpkdError(f"{next(p for p in inputs if p not in tables)}: this model classifies feature rows; give "
                             f".csv or .npz files of them")
        items = [(name, row) for table in tables for name, row in zip(*_rows(table, pre.shape[0], label_column))]
    else:
        tables = [p for p in inputs if p.suffix.lower() in TABLE_SUFFIXES]
        if tables:
            raise BcpkdError(f"{tables[0]}: this model classifies images; give image files or folders")
        items = [(str(p), p) for p in _image_files(inputs)]
    if not items:
        raise BcpkdError("INPUT: nothing to classify (no image files or rows found)")
    writer = _Writer(out, fields, force)
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
            for record in _records(runner, names, torch.stack(batch), max(top_k, 1)):
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
