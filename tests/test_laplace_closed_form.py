"""Closed-form last-layer logit moments against laplace-torch's own Jacobian path, on random networks."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bcpkd_cli.config import Hessian, LaplaceConfig, Link, Subset
from bcpkd_cli.teachers.laplace import LaplaceTeacher
from bcpkd_cli.teachers.laplace_closed_form import kron_logit_covariance

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one thread, here and in the CLI


class RandomNet(nn.Module):
    def __init__(self, n_in: int, n_features: int, n_classes: int, bias: bool, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Linear(n_in, n_features), nn.Tanh())
        self.head = nn.Linear(n_features, n_classes, bias=bias)

    def forward(self, x):
        return self.head(self.features(x))


def _fitted(hessian: Hessian, bias: bool, seed: int, link: Link = Link.probit, **laplace_kwargs) -> LaplaceTeacher:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(200, 7, generator=gen), torch.randint(0, 6, (200,), generator=gen)
    teacher = LaplaceTeacher(RandomNet(7, 12, 6, bias, seed), LaplaceConfig(subset=Subset.last_layer, hessian=hessian,
                                                                            link=link))
    if laplace_kwargs:  # e.g. laplace-torch's damped Kron
        from laplace import Laplace

        teacher.la = Laplace(teacher.model, "classification", subset_of_weights="last_layer",
                             hessian_structure=hessian.value, last_layer_name="head", **laplace_kwargs)
    teacher.fit(x, y)
    teacher.la.prior_precision = torch.tensor([0.7])
    return teacher


CASES = [(h, b, s) for h in (Hessian.kron, Hessian.diag) for b in (True, False) for s in (0, 1)]
IDS = [f"{h.value}-{'bias' if b else 'nobias'}-seed{s}" for h, b, s in CASES]


def _reference(teacher: LaplaceTeacher, x: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return teacher.la._glm_predictive_distribution(x)


@pytest.mark.parametrize(("hessian", "bias", "seed"), CASES, ids=IDS)
def test_closed_form_covariance_is_laplace_torchs(hessian, bias, seed):
    teacher = _fitted(hessian, bias, seed, Link.mc)
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(10 + seed))
    f_mu, f_var = teacher.moments_from_features(teacher.penultimate(x))
    want_mu, want_var = _reference(teacher, x)
    torch.testing.assert_close(f_mu, want_mu, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(f_var, want_var, atol=1e-6, rtol=1e-5)
    assert f_var.diagonal(dim1=1, dim2=2).min() > 1e-4  # a real posterior spread, not zeros


@pytest.mark.parametrize(("hessian", "bias", "seed"), CASES, ids=IDS)
def test_closed_form_probit_matches_laplace_torch_to_1e6(hessian, bias, seed):
    teacher = _fitted(hessian, bias, seed)
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(20 + seed))
    got = teacher.predict_probs(x, torch.arange(50))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = teacher.la(x, pred_type="glm", link_approx="probit")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_damped_kron_matches_laplace_torch():
    teacher = _fitted(Hessian.kron, True, 3, Link.mc, damping=True)
    x = torch.randn(30, 7, generator=torch.Generator().manual_seed(3))
    features = teacher.penultimate(x)
    got = kron_logit_covariance(features, teacher.la.posterior_precision, has_bias=True, full=True).float()
    torch.testing.assert_close(got, _reference(teacher, x)[1], atol=1e-6, rtol=1e-5)


def test_gridsearch_reuses_features(monkeypatch):
    """The grid search runs the backbone once for the whole grid, not once per grid point."""
    teacher = _fitted(Hessian.kron, True, 0)
    calls = []
    forward = teacher.model.features.forward
    monkeypatch.setattr(teacher.model.features, "forward", lambda x: calls.append(len(x)) or forward(x))
    gen = torch.Generator().manual_seed(5)
    teacher.tune_prior(teacher.cfg.prior.__class__("gridsearch"), torch.randn(80, 7, generator=gen),
                       torch.randint(0, 6, (80,), generator=gen))
    assert calls == [80]


@pytest.mark.parametrize("bias", [True, False])
def test_closed_form_kron_fit_equals_laplace_torchs_backend(bias):
    """The last-layer Kron factors, loss and fitted posterior equal those of curvlinops' backend."""
    from laplace import Laplace
    from laplace.curvature import CurvlinopsGGN
    from torch.utils.data import DataLoader, TensorDataset

    from bcpkd_cli.teachers.laplace_fit import LastLayerKron

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 7, bias=bias))
    x, y = torch.randn(40, 5), torch.randint(0, 7, (40,))
    fits = []
    for backend in (CurvlinopsGGN, LastLayerKron):
        la = Laplace(net, "classification", subset_of_weights="last_layer", hessian_structure="kron", backend=backend)
        la.fit(DataLoader(TensorDataset(x, y), batch_size=16))
        fits.append(la)
    reference, closed = fits
    for ref_factors, got_factors in zip(reference.H_facs.kfacs, closed.H_facs.kfacs, strict=True):
        for ref, got in zip(ref_factors, got_factors, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(closed.loss, reference.loss)
    torch.testing.assert_close(closed.log_marginal_likelihood(torch.tensor(2.0)),
                               reference.log_marginal_likelihood(torch.tensor(2.0)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(closed.posterior_precision.to_matrix(), reference.posterior_precision.to_matrix(),
                               rtol=1e-5, atol=1e-5)
