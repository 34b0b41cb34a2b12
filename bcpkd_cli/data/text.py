"""Text classification data: examples as strings, and per tokenizer their token ids, kept once on disk.

A text split's inputs are `TextRows`: rows of a `Corpus` (every example of the dataset, all splits). A model
of text (models/huggingface.py) asks the rows it is given for their ids under its own tokenizer
(`TextRows.encode`): the whole corpus is tokenised once per tokenizer (truncated at data.max_length), kept as
one flat id tensor beside the data (`tokens-<corpus>-<tokenizer>.safetensors`), and every batch is cut from it
and padded to its own longest example. So a teacher and a student with different tokenizers read the same
examples (and the same BCP cache, which is indexed by example), and no epoch tokenises again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bcpkd_cli.errors import BcpkdError

TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
TOKENS_PER_CALL = 8192  # examples the tokenizer takes per call while a corpus is tokenised
_UMASK = os.umask(0)
os.umask(_UMASK)


def tokenizer_fingerprint(tokenizer, max_length: int) -> str:
    """SHA-256 (16 hex digits) of what decides a tokenizer's ids: its vocabulary, rules and special tokens (not
    the truncation or padding state a call leaves behind) and data.max_length."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    backend.pop("truncation", None)
    backend.pop("padding", None)
    text = json.dumps([backend, tokenizer.pad_token_id, list(tokenizer.model_input_names), max_length],
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Encoded:
    """A corpus under one tokenizer: every example's ids one after another, where each starts, token types."""

    ids: torch.Tensor  # int32 [T]
    starts: torch.Tensor  # int64 [N + 1]: example i is ids[starts[i]:starts[i + 1]]
    types: torch.Tensor | None  # uint8 [T]: token type ids (sentence pairs), where the tokenizer makes them
    pad_id: int

    def batch(self, rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """The rows' ids padded to the longest of them: input_ids, attention_mask (+ token_type_ids) [B, L]."""
        rows = rows.cpu()
        first, lengths = self.starts[rows], self.starts[rows + 1] - self.starts[rows]  # [B]
        width = max(1, int(lengths.max())) if len(rows) else 1
        position = torch.arange(width)[None, :]  # [1, L]
        mask = position < lengths[:, None]  # [B, L]
        where = (first[:, None] + position).clamp(max=max(len(self.ids) - 1, 0))
        ids = torch.where(mask, self.ids[where].long(), self.pad_id)
        out = {"input_ids": ids, "attention_mask": mask.long()}
        if self.types is not None:
            out["token_type_ids"] = torch.where(mask, self.types[where].long(), 0)
        return {k: v.to(device, non_blocking=True) for k, v in out.items()}


@dataclass
class Corpus:
    """Every example of a text dataset: texts [N] (and second texts [N] of sentence pairs), and where the ids of
    each tokenizer are kept (`store`: None keeps them in memory only)."""

    texts: list[str]
    pairs: list[str] | None
    max_length: int
    store: Path | None
    fingerprint: str = ""
    _encoded: dict = field(default_factory=dict, repr=False)  # tokenizer fingerprint -> Encoded

    def __post_init__(self):
        if not self.fingerprint:
            digest = hashlib.sha256()
            for column in (self.texts, self.pairs or []):
                for text in column:
                    digest.update(text.encode() + b"\0")
                digest.update(b"\1")
            self.fingerprint = digest.hexdigest()[:16]

    def encoded(self, tokenizer) -> Encoded:
        key = tokenizer_fingerprint(tokenizer, self.max_length)
        if key not in self._encoded:
            path = None if self.store is None else self.store / f"tokens-{self.fingerprint}-{key}.safetensors"
            self._encoded[key] = _read(path, tokenizer) if path is not None and path.is_file() else \
                self._tokenise(tokenizer, path)
        return self._encoded[key]

    def _tokenise(self, tokenizer, path: Path | None) -> Encoded:
        types = "token_type_ids" in tokenizer.model_input_names or self.pairs is not None
        ids, type_ids, lengths = [], [], []
        for start in range(0, len(self.texts), TOKENS_PER_CALL):
            second = None if self.pairs is None else self.pairs[start:start + TOKENS_PER_CALL]
            out = tokenizer(self.texts[start:start + TOKENS_PER_CALL], second, truncation=True,
                            max_length=self.max_length, return_token_type_ids=types, return_attention_mask=False)
            for i, row in enumerate(out["input_ids"]):
                ids.extend(row)
                lengths.append(len(row))
                if types:
                    type_ids.extend(out["token_type_ids"][i])
        starts = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        starts[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
        encoded = Encoded(torch.tensor(ids, dtype=torch.int32), starts,
                          torch.tensor(type_ids, dtype=torch.uint8) if types else None, int(tokenizer.pad_token_id or 0))
        if path is not None:
            _write(path, encoded)
        return encoded


def _write(path: Path, encoded: Encoded) -> None:
    """Keep a corpus's ids beside the data (atomically; a folder that cannot be written keeps none)."""
    from safetensors.torch import save_file

    tensors = {"ids": encoded.ids, "starts": encoded.starts}
    if encoded.types is not None:
        tensors["types"] = encoded.types
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".tokens-", suffix=".tmp")
        os.close(handle)
        save_file(tensors, temp, metadata={"pad_id": str(encoded.pad_id)})
        os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp makes 0600: others reading the data read its ids too
        os.replace(temp, path)
    except OSError:
        Path(locals().get("temp", path.parent / ".none")).unlink(missing_ok=True)


def _read(path: Path, tokenizer) -> Encoded:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        pad_id = int((f.metadata() or {}).get("pad_id", tokenizer.pad_token_id or 0))
    return Encoded(tensors["ids"], tensors["starts"], tensors.get("types"), pad_id)


class TextRows:
    """Rows [B] of a corpus, on a device: a text split's inputs, and each batch of them (indexing returns rows)."""

    def __init__(self, corpus: Corpus, rows: torch.Tensor, device: torch.device | str = "cpu"):
        self.corpus, self.rows, self.device = corpus, rows.cpu(), torch.device(device)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows),))

    def __getitem__(self, index) -> "TextRows":
        if isinstance(index, torch.Tensor):
            index = index.cpu()
        return TextRows(self.corpus, self.rows[index].reshape(-1), self.device)

    def subset(self, rows: torch.Tensor) -> "TextRows":
        return self[rows]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TextRows":
        return TextRows(self.corpus, self.rows, device)

    def texts(self) -> list[str]:
        """The rows' texts (with their second text after a tab, for sentence pairs)."""
        pairs = self.corpus.pairs
        return [self.corpus.texts[r] + (f"\t{pairs[r]}" if pairs is not None else "") for r in self.rows.tolist()]

    def encode(self, tokenizer) -> dict[str, torch.Tensor]:
        """The rows under `tokenizer`, padded per batch, on the rows' device."""
        return self.corpus.encoded(tokenizer).batch(self.rows, self.device)


def is_text(inputs) -> bool:
    return isinstance(inputs, TextRows)


def split_fingerprint(corpus: Corpus, rows: list[torch.Tensor], labels: list[torch.Tensor]) -> str:
    """A text dataset's fingerprint: its corpus's and each split's rows and labels."""
    digest = hashlib.sha256(corpus.fingerprint.encode())
    for split_rows, split_labels in zip(rows, labels):
        digest.update(split_rows.numpy().tobytes())
        digest.update(split_labels.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def need_text_extra(what: str):
    """A missing package of the text extra: one line naming it."""
    return BcpkdError(f"{what} needs the text extra (transformers, tokenizers, datasets): pip install -e '.[text]'")
