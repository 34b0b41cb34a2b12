"""Shared test helpers: tiny synthetic data and a single-threaded torch for tiny tensors."""

from __future__ import annotations

import os

import pytest
import torch

from bcpkd_cli.config import DataConfig
from bcpkd_cli.data import load_dataset

# Tests never download: Hugging Face libraries fail at once on a name that is not on disk (instead of retrying the
# Hub), in this process and in every process a test starts.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread while a module runs: tiny MLPs get slower, not faster, with more threads
    (and much slower when another process competes for the cores). OMP_NUM_THREADS=1 keeps the stages
    (bcpkd_cli.threads) and the processes a test starts at one too. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_config() -> DataConfig:
    """The synthetic benchmark at 300 / 100 / 100 examples (5 classes, 30 dimensions, seed 0)."""
    return DataConfig(n_train=300, n_heldout=100, n_test=100)


@pytest.fixture(scope="session")
def tiny_data(tiny_config):
    return load_dataset(tiny_config)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A tiny ImageFolder tree: 3 classes of 16x16 PNGs whose mean colour tells the class."""
    from torchvision.io import write_png

    root = tmp_path_factory.mktemp("images")
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 30), ("test", 8)):
        for c, name in enumerate(("bird", "cat", "ship")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                image = (torch.rand(3, 16, 16, generator=gen) * 120 + 60 * c).to(torch.uint8)
                write_png(image, str(root / split / name / f"{i:03d}.png"))
    return root


@pytest.fixture
def no_figures(monkeypatch):
    """`bcpkd run` in this process without drawing its figures: seconds of matplotlib per run (6.7 s for the text
    example's) that a test which does not look at them need not spend. tests/test_reports.py checks the figures."""
    from bcpkd_cli.stages import plot

    monkeypatch.setattr(plot, "draw", lambda *args, **kwargs: [])
