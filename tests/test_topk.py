"""Top-k caches: the K largest probabilities and their ids, the rest spread evenly; K = C is the dense cache."""

from __future__ import annotations

from pathlib import Path

import torch

from bcpkd_cli import artifacts
from bcpkd_cli.topk import TopKProbs, compress, expand
from cli_helpers import here

TINY = ["--set", "data.n_train=300", "--set", "data.n_heldout=100", "--set", "data.n_test=100",
        "--set", "teacher.hidden=[16]", "--set", "distill.hidden=[8]", "--set", "distill.batch_size=32",
        "--set", "teacher.laplace.grid_size=3", "--set", "teacher.epochs=1", "--set", "distill.epochs=1",
        "--device", "cpu"]


def test_expand_keeps_the_top_k_and_spreads_the_rest():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    values, ids = compress(probs, 2)
    assert ids.tolist() == [[0, 1]] and torch.equal(values, probs[:, :2])
    dense = expand(values, ids, 5)
    torch.testing.assert_close(dense, torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1]]))
    assert torch.equal(expand(*compress(probs, 5), 5), probs)  # K = C: the distribution itself
    table = TopKProbs(values[:, None], ids[:, None], 5)
    assert table.shape == (1, 1, 5) and torch.equal(table[torch.tensor([0]), 0], dense)


def test_a_top_k_cache_with_k_equal_c_is_the_dense_cache(single_thread, tmp_path):
    teacher = here("train-teacher", "--bayes", "laplace", "--out", "t", *TINY, cwd=tmp_path).strip()
    dense_path = here("calibrate", "--teacher", teacher, *TINY, cwd=tmp_path).strip()
    full_path = here("calibrate", "--teacher", teacher, "--set", "calibrate.top_k=5", *TINY, cwd=tmp_path).strip()
    top2_path = here("calibrate", "--teacher", teacher, "--set", "calibrate.top_k=2", *TINY, cwd=tmp_path).strip()
    dense, _ = artifacts.load_cache(dense_path, {})
    full, meta = artifacts.load_cache(full_path, {})
    top2, _ = artifacts.load_cache(top2_path, {})
    assert meta["top_k"] == 5 and isinstance(full, TopKProbs)
    rows = torch.arange(300)
    assert torch.equal(full[rows, 0], dense[rows, 0])
    kept = top2[rows, 0]
    torch.testing.assert_close(kept.sum(1), torch.ones(300))
    torch.testing.assert_close(kept.topk(2).values, dense[rows, 0].topk(2).values)
    assert Path(top2_path).stat().st_size < Path(dense_path).stat().st_size
    student = here("distill", "--teacher", teacher, "--set", "calibrate.top_k=2", "--out", "s", *TINY,
                   cwd=tmp_path).strip()
    assert torch.load(tmp_path / student, weights_only=True)["targets"]["cache"] == str(Path(top2_path).resolve())
