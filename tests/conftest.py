"""Shared test helpers: tiny synthetic data and a single-threaded torch for tiny tensors."""

from __future__ import annotations

import pytest
import torch

from bcpkd_cli.config import DataConfig
from bcpkd_cli.data import load_dataset


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread while a module runs: tiny MLPs get slower, not faster, with more threads
    (and much slower when another process competes for the cores). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_config() -> DataConfig:
    """The synthetic benchmark at 300 / 100 / 100 examples (5 classes, 30 dimensions, seed 0)."""
    return DataConfig(n_train=300, n_heldout=100, n_test=100)


@pytest.fixture(scope="session")
def tiny_data(tiny_config):
    return load_dataset(tiny_config)
