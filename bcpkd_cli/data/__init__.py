"""Datasets as in-memory tensors with train / held-out / test splits, and their fingerprints."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from bcpkd_cli.config import DataConfig, DatasetName
from bcpkd_cli.data import synthetic


@dataclass(frozen=True)
class Split:
    """One split: inputs [N, ...], labels [N], and exact BCPs [N, C] where the dataset knows them."""

    inputs: torch.Tensor
    labels: torch.Tensor
    true_bcp: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    train: Split
    heldout: Split
    test: Split
    n_classes: int
    input_shape: tuple[int, ...]
    fingerprint: str

    def split(self, name: str) -> Split:
        return {"train": self.train, "heldout": self.heldout, "test": self.test}[name]


def fingerprint(splits: list[Split]) -> str:
    """SHA-256 (first 16 hex digits) over the bytes of every split's inputs and labels."""
    digest = hashlib.sha256()
    for s in splits:
        digest.update(s.inputs.contiguous().numpy().tobytes())
        digest.update(s.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_dataset(cfg: DataConfig) -> Dataset:
    """Build the dataset a config names; every split comes from cfg.seed."""
    if cfg.name != DatasetName.synthetic:
        raise ValueError(f"unsupported dataset {cfg.name}")
    gen = torch.Generator().manual_seed(cfg.seed)
    means = synthetic.class_means(cfg, gen)
    splits = [Split(*synthetic.sample_split(n, means, cfg.noise_var, gen))
              for n in (cfg.n_train, cfg.n_heldout, cfg.n_test)]
    return Dataset(*splits, n_classes=cfg.n_classes, input_shape=(cfg.dim,),
                   fingerprint=fingerprint(splits))
