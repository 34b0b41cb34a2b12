"""The synthetic benchmark: exact BCPs by Bayes' rule, seeded splits, means from mean_choices."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.distributions import MultivariateNormal

from bcpkd_cli.config import DataConfig
from bcpkd_cli.data import load_dataset, synthetic, synthetic_means

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one thread, here and in the CLI


def bayes_rule(x: torch.Tensor, means: torch.Tensor, noise_var: float) -> torch.Tensor:
    """P(y=k | x) with Gaussian class densities N(mu_k, noise_var I) and a uniform prior."""
    x, means = x.double(), means.double()
    eye = torch.eye(means.shape[1], dtype=torch.float64)
    log_lik = torch.stack([MultivariateNormal(mu, noise_var * eye).log_prob(x) for mu in means], dim=1)  # [N, C]
    log_joint = log_lik + torch.log(torch.tensor(1.0 / len(means), dtype=torch.float64))
    return (log_joint - torch.logsumexp(log_joint, dim=1, keepdim=True)).exp()


@pytest.mark.parametrize("noise_var", [2.5, 0.7])
def test_exact_bcp_is_bayes_rule(noise_var):
    gen = torch.Generator().manual_seed(3)
    cfg = DataConfig(n_classes=4, dim=7, noise_var=noise_var, mean_choices=(-1.0, 0.5, 2.0))
    means = synthetic.class_means(cfg, gen)
    x = means[torch.randint(4, (60,), generator=gen)] + torch.randn(60, 7, generator=gen, dtype=torch.float64) * 1.5
    got = synthetic.exact_bcp(x.double(), means, noise_var)
    assert got.dtype == torch.float64 and got.shape == (60, 4)
    torch.testing.assert_close(got, bayes_rule(x, means, noise_var), atol=1e-6, rtol=0)


def test_true_bcp_of_the_dataset_is_bayes_rule_for_its_means(tiny_config, tiny_data):
    # the same means explain every split's BCPs
    means = synthetic_means(tiny_config)
    for split in (tiny_data.train, tiny_data.heldout, tiny_data.test):
        want = bayes_rule(split.inputs, means, tiny_config.noise_var)
        torch.testing.assert_close(split.true_bcp.double(), want, atol=1e-6, rtol=0)


def test_true_bcp_rows_are_distributions(tiny_data):
    for split in (tiny_data.train, tiny_data.heldout, tiny_data.test):
        assert (split.true_bcp >= 0).all()
        torch.testing.assert_close(split.true_bcp.double().sum(1), torch.ones(len(split), dtype=torch.float64),
                                   atol=1e-6, rtol=0)


def test_split_sizes_shapes_and_dtypes():
    cfg = DataConfig(n_train=37, n_heldout=11, n_test=5, n_classes=3, dim=4, seed=2)
    data = load_dataset(cfg)
    assert (len(data.train), len(data.heldout), len(data.test)) == (37, 11, 5)
    assert data.n_classes == 3 and data.input_shape == (4,)
    for name, n in [("train", 37), ("heldout", 11), ("test", 5)]:
        split = data.split(name)
        assert split.inputs.shape == (n, 4) and split.inputs.dtype == torch.float32
        assert split.labels.shape == (n,) and split.labels.dtype == torch.int64
        assert split.true_bcp.shape == (n, 3)
        assert 0 <= int(split.labels.min()) and int(split.labels.max()) < 3


def test_load_dataset_is_deterministic_for_a_seed(tiny_config):
    a, b = load_dataset(tiny_config), load_dataset(tiny_config)
    for name in ("train", "heldout", "test"):
        sa, sb = a.split(name), b.split(name)
        assert torch.equal(sa.inputs, sb.inputs)
        assert torch.equal(sa.labels, sb.labels)
        assert torch.equal(sa.true_bcp, sb.true_bcp)
    assert a.fingerprint == b.fingerprint
    assert len(a.fingerprint) == 16 and int(a.fingerprint, 16) >= 0


def test_fingerprint_changes_with_seed_and_sizes(tiny_config):
    base = load_dataset(tiny_config)
    other_seed = load_dataset(dataclasses.replace(tiny_config, seed=1))
    other_size = load_dataset(dataclasses.replace(tiny_config, n_test=99))
    assert other_seed.fingerprint != base.fingerprint
    assert not torch.equal(other_seed.train.inputs, base.train.inputs)
    assert other_size.fingerprint != base.fingerprint


def test_splits_are_distinct_draws(tiny_data):
    # the three splits come from one generator in sequence: they must not repeat each other
    assert not torch.equal(tiny_data.train.inputs[:100], tiny_data.heldout.inputs)
    assert not torch.equal(tiny_data.heldout.inputs, tiny_data.test.inputs)


def test_class_means_coordinates_come_from_mean_choices():
    cfg = DataConfig(n_classes=6, dim=40, mean_choices=(-3.0, 0.25, 7.5))
    means = synthetic.class_means(cfg, torch.Generator().manual_seed(0))
    assert means.shape == (6, 40)
    assert set(means.flatten().tolist()) == {-3.0, 0.25, 7.5}  # only these, and (240 draws) each of them


def test_default_means_are_from_4_5_6():
    means = synthetic.class_means(DataConfig(), torch.Generator().manual_seed(0))
    assert means.shape == (5, 30)
    assert set(means.flatten().tolist()) <= {4.0, 5.0, 6.0}


def test_noise_has_the_configured_variance():
    cfg = DataConfig(n_train=4000, n_heldout=1, n_test=1, noise_var=2.5, seed=5)
    data = load_dataset(cfg)
    means = synthetic_means(cfg)
    noise = data.train.inputs.double() - means[data.train.labels].double()
    assert abs(noise.mean().item()) < 0.02
    assert abs(noise.var().item() - 2.5) < 0.05  # 120k draws: std error of the variance is about 0.01
    counts = torch.bincount(data.train.labels, minlength=5).double() / 4000
    assert (counts - 0.2).abs().max().item() < 0.03  # uniform labels


def test_a_split_does_not_change_when_another_split_grows(tiny_config):
    small = load_dataset(tiny_config)
    bigger = load_dataset(dataclasses.replace(tiny_config, n_train=tiny_config.n_train * 2))
    assert torch.equal(small.test.inputs, bigger.test.inputs)
    assert torch.equal(small.heldout.labels, bigger.heldout.labels)


def test_few_shot_rows_take_k_seeded_examples_per_class():
    from bcpkd_cli.data import few_shot_rows

    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    rows = few_shot_rows(labels, 4, seed=1)
    assert torch.bincount(labels[rows]).tolist() == [4, 3, 4]  # class 1 has only 3
    assert torch.equal(rows, rows.sort().values) and torch.equal(rows, few_shot_rows(labels, 4, seed=1))
    assert not torch.equal(rows, few_shot_rows(labels, 4, seed=2))
