"""Datasets as in-memory tensors with train / held-out / test splits, and their fingerprints."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch

from bcpkd_cli.config import DataConfig
from bcpkd_cli.data import synthetic


@dataclass(frozen=True)
class Split:
    """One split: inputs [N, ...], labels [N], and exact BCPs [N, C] where the dataset knows them."""

    inputs: torch.Tensor
    labels: torch.Tensor
    true_bcp: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "Split":
        bcp = None if self.true_bcp is None else self.true_bcp.to(device)
        return Split(self.inputs.to(device), self.labels.to(device), bcp)


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

    def to(self, device: torch.device) -> "Dataset":
        """The same dataset with every split's tensors on `device` (fingerprint unchanged)."""
        return replace(self, train=self.train.to(device), heldout=self.heldout.to(device), test=self.test.to(device))


def fingerprint(splits: list[Split]) -> str:
    """SHA-256 (first 16 hex digits) over the bytes of every split's inputs and labels."""
    digest = hashlib.sha256()
    for s in splits:
        digest.update(s.inputs.contiguous().numpy().tobytes())
        digest.update(s.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _generator(seed: int, stream: str) -> torch.Generator:
    """An independent generator per (seed, stream): a split does not change when another one's size does."""
    return torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}/{stream}".encode()).hexdigest()[:15], 16))


def synthetic_means(cfg: DataConfig) -> torch.Tensor:
    """The class means [C, D] of the synthetic dataset a config names."""
    return synthetic.class_means(cfg, _generator(cfg.seed, "means"))


def load_dataset(cfg: DataConfig) -> Dataset:
    """Build the dataset a config names; the class means and each split come from cfg.seed."""
    means = synthetic_means(cfg)
    splits = [Split(*synthetic.sample_split(n, means, cfg.noise_var, _generator(cfg.seed, name)))
              for name, n in (("train", cfg.n_train), ("heldout", cfg.n_heldout), ("test", cfg.n_test))]
    return Dataset(*splits, n_classes=cfg.n_classes, input_shape=(cfg.dim,),
                   fingerprint=fingerprint(splits))
