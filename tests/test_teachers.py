"""Teachers: index-seeded noise, the Laplace predictive (probit and MC), temperature, persistence."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from bcpkd_cli import artifacts, metrics
from bcpkd_cli.config import (
    Bayes, DataConfig, Hessian, LaplaceConfig, Link, Optimizer, PriorMethod, Recipe, Subset, TeacherConfig, to_plain,
)
from bcpkd_cli.engine import TrainSpec, train
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.models import build_model, predict_logits
from bcpkd_cli.teachers import load_teacher, teacher_payload
from bcpkd_cli.teachers.deterministic import DeterministicTeacher
from bcpkd_cli.teachers.index_noise import hash32, index_normal
from bcpkd_cli.teachers.laplace import LaplaceTeacher

pytestmark = pytest.mark.usefixtures("single_thread")

SPEC = {"arch": "mlp", "input_shape": [30], "n_classes": 5, "hidden": [16]}
POSTERIORS = [(Subset.last_layer, Hessian.kron), (Subset.last_layer, Hessian.diag), (Subset.all, Hessian.diag)]
POSTERIOR_IDS = [f"{s.value}-{h.value}" for s, h in POSTERIORS]


# ---------------------------------------------------------------------------------------------- index noise

def lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def test_hash32_is_lowbias32():
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 2**32, (2000,), generator=gen, dtype=torch.int64)
    values = torch.cat([values, torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)])
    got = hash32(values)
    assert got.dtype == torch.int64
    assert got.tolist() == [lowbias32(v) for v in values.tolist()]
    assert int(got.min()) >= 0 and int(got.max()) < 2**32


def test_index_normal_depends_only_on_seed_and_index():
    rows = index_normal(7, torch.tensor([5, 1, 9]), 6)
    assert rows.shape == (3, 6) and rows.dtype == torch.float64
    other_batch = index_normal(7, torch.tensor([9, 123, 5, 1, 5]), 6)
    assert torch.equal(other_batch[0], rows[2])
    assert torch.equal(other_batch[2], rows[0]) and torch.equal(other_batch[4], rows[0])
    assert torch.equal(other_batch[3], rows[1])
    # draw j of an example does not depend on how many draws were asked for
    assert torch.equal(index_normal(7, torch.tensor([5, 1, 9]), 10)[:, :6], rows)
    assert not torch.equal(index_normal(8, torch.tensor([5, 1, 9]), 6), rows)
    assert not torch.equal(rows[0], rows[1])


def test_index_normal_is_standard_normal():
    z = index_normal(3, torch.arange(2000), 100)  # 200k draws
    assert torch.isfinite(z).all()
    assert abs(z.mean().item()) < 0.01
    assert abs(z.std().item() - 1.0) < 0.01
    assert abs((z.abs() < 1).double().mean().item() - 0.6827) < 0.005
    assert abs((z.abs() < 2).double().mean().item() - 0.9545) < 0.003
    # neighbouring draws and neighbouring examples are uncorrelated
    assert abs((z[:, :-1] * z[:, 1:]).mean().item()) < 0.01
    assert abs((z[:-1] * z[1:]).mean().item()) < 0.01


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def trained_state(single_thread, tiny_data):
    """Weights of a small MLP trained with cross-entropy on the tiny synthetic data."""
    torch.manual_seed(0)
    model = build_model(SPEC)
    spec = TrainSpec(epochs=20, batch_size=32, optimizer=Optimizer.adam, lr=1e-2, momentum=0.9, weight_decay=0.0,
                     seed=0)
    train(model, tiny_data.train.inputs, tiny_data.train.labels, None,
          lambda logits, labels, _: F.cross_entropy(logits, labels, reduction="none"), spec, "teacher")
    return {k: v.clone() for k, v in model.state_dict().items()}


def fresh_model(state):
    model = build_model(SPEC)
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def fitted(trained_state, tiny_data):
    """(subset, hessian, link) -> a LaplaceTeacher fitted on the training split (built once per module)."""
    cache = {}

    def get(subset: Subset, hessian: Hessian, link: Link = Link.probit, samples: int = 64) -> LaplaceTeacher:
        key = (subset, hessian, link, samples)
        if key not in cache:
            cfg = LaplaceConfig(subset=subset, hessian=hessian, link=link, samples=samples,
                                grid_min=-2.0, grid_max=3.0, grid_size=11)
            teacher = LaplaceTeacher(fresh_model(trained_state), cfg, noise_seed=5)
            teacher.fit(tiny_data.train.inputs, tiny_data.train.labels)
            cache[key] = teacher
        teacher = cache[key]
        teacher.la.prior_precision = torch.tensor([1.0])
        teacher.calibration_temperature = 1.0
        return teacher

    return get


def heldout(tiny_data, n: int = 40):
    return tiny_data.heldout.inputs[:n], torch.arange(n)


# ---------------------------------------------------------------------------------------------- probit

@pytest.mark.parametrize(("subset", "hessian"), POSTERIORS, ids=POSTERIOR_IDS)
def test_probit_at_temperature_one_is_laplace_torchs_predictive(fitted, tiny_data, subset, hessian):
    teacher = fitted(subset, hessian)
    teacher.la.prior_precision = torch.tensor([2.0])
    x, index = heldout(tiny_data)
    got = teacher.predict_probs(x, index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = teacher.la(x, pred_type="glm", link_approx="probit")
    assert got.shape == (40, 5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # and it is not just the network's softmax: the posterior spreads the probabilities
    map_probs = torch.softmax(predict_logits(teacher.model, x), dim=1)
    assert (got - map_probs).abs().max().item() > 1e-3


@pytest.mark.parametrize(("subset", "hessian"), POSTERIORS, ids=POSTERIOR_IDS)
def test_probit_temperature_divides_the_logit_distribution(fitted, tiny_data, subset, hessian):
    teacher = fitted(subset, hessian)
    x, index = heldout(tiny_data)
    f_mu, var = teacher.logit_moments(x)  # the probit link needs only the diagonal [B, C]

    def by_hand(t: float) -> torch.Tensor:
        return torch.softmax((f_mu / t) / torch.sqrt(1 + math.pi / 8 * var / t**2), dim=1)

    for temperature in (0.5, 2.0, 4.0):
        torch.testing.assert_close(teacher.predict_probs(x, index, temperature), by_hand(temperature),
                                   atol=1e-6, rtol=0)
    teacher.calibration_temperature = 1.5  # T_cal multiplies the requested T
    torch.testing.assert_close(teacher.predict_probs(x, index, 2.0), by_hand(3.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(teacher.predictive_at(x, index)(2.0), by_hand(3.0), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- MC link

@pytest.mark.parametrize(("subset", "hessian"), POSTERIORS[::2], ids=POSTERIOR_IDS[::2])
def test_mc_predictive_is_reproducible_and_index_seeded(fitted, tiny_data, subset, hessian):
    teacher = fitted(subset, hessian, Link.mc)
    x, index = heldout(tiny_data, 30)
    index = index + 1000  # example ids, not positions in the batch
    first = teacher.predict_probs(x, index)
    assert torch.equal(first, teacher.predict_probs(x, index))
    torch.testing.assert_close(first.double().sum(1), torch.ones(30, dtype=torch.float64), atol=1e-5, rtol=0)

    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    shuffled = teacher.predict_probs(x[perm], index[perm])
    torch.testing.assert_close(shuffled, first[perm], atol=1e-6, rtol=0)
    part = teacher.predict_probs(x[7:12], index[7:12])  # a different batch composition
    torch.testing.assert_close(part, first[7:12], atol=1e-6, rtol=0)

    other_ids = teacher.predict_probs(x, index + 1)  # same inputs, other example ids -> other draws
    assert not torch.equal(other_ids, first)
    teacher.noise_seed = 6
    try:
        assert not torch.equal(teacher.predict_probs(x, index), first)
    finally:
        teacher.noise_seed = 5


@pytest.mark.parametrize(("subset", "hessian"), POSTERIORS, ids=POSTERIOR_IDS)
def test_mc_predictive_averages_softmax_of_tempered_logit_samples(fitted, tiny_data, subset, hessian):
    """MC at T ~ E[softmax(f / T)], f ~ N(f_mu, f_var), checked against an independent 50k-draw estimate."""
    teacher = fitted(subset, hessian, Link.mc, samples=2000)
    x, index = heldout(tiny_data, 20)
    f_mu, f_var = teacher.logit_moments(x)
    eigvals, eigvecs = torch.linalg.eigh(f_var.double())
    root = eigvecs * eigvals.clamp_min(0).sqrt()[:, None, :]
    eps = torch.randn(20, 50000, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    draws = f_mu.double()[:, None, :] + eps @ root.transpose(1, 2)
    for temperature in (1.0, 2.0):
        want = torch.softmax(draws / temperature, dim=2).mean(1)
        got = teacher.predict_probs(x, index, temperature).double()
        error = (got - want).abs().max().item()
        assert error < 0.03
        # the variance matters: the softmax of the mean logits is further away than the MC estimate
        assert (torch.softmax(f_mu.double() / temperature, 1) - want).abs().max().item() > 2 * error


# ---------------------------------------------------------------------------------------------- persistence

def _roundtrip_weights_only(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(("subset", "hessian"), POSTERIORS, ids=POSTERIOR_IDS)
@pytest.mark.parametrize("link", [Link.probit, Link.mc])
def test_posterior_state_round_trip(fitted, trained_state, tiny_data, subset, hessian, link):
    teacher = fitted(subset, hessian, link)
    teacher.la.prior_precision = torch.tensor([3.7])
    x, index = heldout(tiny_data, 30)
    want = teacher.predict_probs(x, index, 1.5)

    state = _roundtrip_weights_only(teacher.posterior_state())
    fresh = LaplaceTeacher(fresh_model(trained_state), teacher.cfg, noise_seed=teacher.noise_seed)
    fresh.load_posterior_state(state)
    assert fresh.prior_precision == pytest.approx(3.7)
    assert torch.equal(fresh.predict_probs(x, index, 1.5), want)


_CHILD = """
import sys, torch
torch.set_num_threads(1)
from bcpkd_cli import artifacts
from bcpkd_cli.teachers import load_teacher
batch = torch.load(sys.argv[1], weights_only=True)
out = {}
for name in batch["teachers"]:
    payload = artifacts.load_checkpoint(batch["teachers"][name], artifacts.TEACHER_FORMAT)
    teacher = load_teacher(payload, torch.device("cpu"))
    out[name] = teacher.predict_probs(batch["inputs"], batch["index"], batch["temperature"])
torch.save(out, sys.argv[2])
"""


def _save_teacher(path, teacher, hidden=(16,)):
    recipe = Recipe(teacher=TeacherConfig(bayes=Bayes.laplace, hidden=hidden, laplace=teacher.cfg),
                    data=DataConfig(n_train=300, n_heldout=100, n_test=100))
    payload = teacher_payload(teacher, SPEC, to_plain(recipe),
                              {"fingerprint": "0" * 16, "config": to_plain(recipe.data)}, None, {})
    return artifacts.save_checkpoint(path, payload)


def test_teacher_checkpoint_gives_the_same_predictive_in_another_process(fitted, tiny_data, tmp_path):
    x, index = heldout(tiny_data, 30)
    index = index + 17
    settings = {"kron_mc": (Subset.last_layer, Hessian.kron, Link.mc, 2.5, 1.3),
                "all_diag_probit": (Subset.all, Hessian.diag, Link.probit, 0.8, 1.0)}
    paths, want = {}, {}
    for name, (subset, hessian, link, prior, t_cal) in settings.items():
        teacher = fitted(subset, hessian, link)
        teacher.la.prior_precision = torch.tensor([prior])
        teacher.calibration_temperature = t_cal
        paths[name] = str(_save_teacher(tmp_path / name / "teacher.pt", teacher))
        want[name] = teacher.predict_probs(x, index, 2.0)
        # in this process too: load_teacher rebuilds the same predictive
        payload = artifacts.load_checkpoint(paths[name], artifacts.TEACHER_FORMAT)
        assert torch.equal(load_teacher(payload, torch.device("cpu")).predict_probs(x, index, 2.0), want[name])

    batch = tmp_path / "batch.pt"
    torch.save({"teachers": paths, "inputs": x, "index": index, "temperature": 2.0}, batch)
    out = tmp_path / "out.pt"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _CHILD, str(batch), str(out)], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    got = torch.load(out, weights_only=True)
    for name in settings:
        assert torch.equal(got[name], want[name]), name


# ---------------------------------------------------------------------------------------------- prior tuning

@pytest.mark.parametrize(("subset", "hessian"), POSTERIORS, ids=POSTERIOR_IDS)
def test_gridsearch_picks_the_grid_point_with_the_lowest_heldout_nll(fitted, tiny_data, subset, hessian):
    teacher = fitted(subset, hessian)
    held = tiny_data.heldout
    index = torch.arange(len(held))
    teacher.tune_prior(PriorMethod.gridsearch, held.inputs, held.labels)
    chosen = teacher.prior_precision
    grid = teacher.grid()
    assert len(grid) == 11
    position = (math.log10(chosen) - teacher.cfg.grid_min) / 0.5  # grid steps of 10^0.5 (widened: the same steps)
    assert abs(position - round(position)) < 1e-4, f"{chosen} is not a point of the grid's spacing"
    assert teacher.la.prior_precision.shape == (1,)
    chosen_nll = metrics.nll(teacher.predict_probs(held.inputs, index), held.labels)

    nlls = {}
    for value in grid.tolist():
        teacher.la.prior_precision = torch.tensor([value])
        nlls[value] = metrics.nll(teacher.predict_probs(held.inputs, index), held.labels)
    for value, nll in nlls.items():
        assert chosen_nll <= nll + 1e-7, f"prior {value}: NLL {nll} < {chosen_nll} at the chosen {chosen}"


def test_gridsearch_with_the_mc_link_minimises_the_teachers_own_heldout_nll(fitted, tiny_data):
    held = tiny_data.heldout
    index = torch.arange(len(held))
    misses = []
    for subset, hessian in POSTERIORS:
        teacher = fitted(subset, hessian, Link.mc)
        torch.manual_seed(0)  # laplace-torch's draws come from the global generator
        teacher.tune_prior(PriorMethod.gridsearch, held.inputs, held.labels)
        chosen = teacher.prior_precision
        chosen_nll = metrics.nll(teacher.predict_probs(held.inputs, index), held.labels)
        for value in teacher.grid().tolist():
            teacher.la.prior_precision = torch.tensor([value])
            nll = metrics.nll(teacher.predict_probs(held.inputs, index), held.labels)
            if nll < chosen_nll - 1e-7:
                misses.append(f"{subset.value}-{hessian.value}: prior {value:.3g} NLL {nll:.5f} < {chosen_nll:.5f} "
                              f"at the chosen {chosen:.3g}")
    assert not misses, "; ".join(misses)


def test_marglik_tuning_sets_a_positive_scalar_prior(fitted):
    teacher = fitted(Subset.last_layer, Hessian.kron)
    teacher.tune_prior(PriorMethod.marglik)
    assert teacher.la.prior_precision.shape == (1,)
    assert teacher.prior_precision > 0 and teacher.prior_precision != pytest.approx(1.0)


def test_full_hessian_over_too_many_weights_is_refused():
    big = build_model({**SPEC, "hidden": [200, 100]})  # about 26k weights
    with pytest.raises(BcpkdError, match="hessian=full"):
        LaplaceTeacher(big, LaplaceConfig(subset=Subset.all, hessian=Hessian.full))


# ---------------------------------------------------------------------------------------------- deterministic

def test_deterministic_teacher_divides_logits_by_both_temperatures(trained_state, tiny_data):
    model = fresh_model(trained_state)
    x, index = heldout(tiny_data)
    with torch.no_grad():
        logits = model(x)
    teacher = DeterministicTeacher(model, calibration_temperature=1.7)
    for temperature in (1.0, 0.5, 3.0):
        torch.testing.assert_close(teacher.predict_probs(x, index, temperature),
                                   torch.softmax(logits / (1.7 * temperature), dim=1), atol=1e-7, rtol=0)
    assert teacher.posterior_state() is None
    assert teacher.predictive_settings() == {"calibration_temperature": 1.7}


def test_deterministic_teacher_checkpoint_round_trip(trained_state, tiny_data, tmp_path):
    teacher = DeterministicTeacher(fresh_model(trained_state), calibration_temperature=0.9)
    recipe = Recipe(teacher=TeacherConfig(hidden=(16,)))
    payload = teacher_payload(teacher, SPEC, to_plain(recipe), {"fingerprint": "0" * 16}, None, {})
    path = artifacts.save_checkpoint(tmp_path / "teacher.pt", payload)
    loaded = load_teacher(artifacts.load_checkpoint(path, artifacts.TEACHER_FORMAT), torch.device("cpu"))
    x, index = heldout(tiny_data)
    assert loaded.calibration_temperature == 0.9
    assert torch.equal(loaded.predict_probs(x, index, 2.0), teacher.predict_probs(x, index, 2.0))


def test_all_weights_posterior_over_batchnorm_is_refused_before_training():
    from bcpkd_cli.models import model_spec
    from bcpkd_cli.teachers.laplace import check_hessian_size

    resnet = build_model(model_spec("resnet20", (3, 16, 16), 3, ()))
    with pytest.raises(BcpkdError, match="BatchNorm"):
        check_hessian_size(resnet, LaplaceConfig(subset=Subset.all, hessian=Hessian.kron))
    check_hessian_size(resnet, LaplaceConfig(subset=Subset.last_layer, hessian=Hessian.kron))  # fine


def test_last_layer_laplace_on_a_batchnorm_network(tiny_data):
    from bcpkd_cli.models import model_spec

    torch.manual_seed(0)
    resnet = build_model(model_spec("resnet20", (3, 8, 8), 3, ())).eval()
    images = torch.randint(0, 256, (24, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 3, (24,))
    teacher = LaplaceTeacher(resnet, LaplaceConfig(subset=Subset.last_layer, hessian=Hessian.kron, grid_size=3))
    teacher.fit(images, labels, batch_size=8)
    probs = teacher.predict_probs(images, torch.arange(24))
    assert probs.shape == (24, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(24))
    torch.testing.assert_close(probs, teacher.la(images, pred_type="glm", link_approx="probit"), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- tempering

def test_the_two_temperings_of_the_laplace_probit_predictive(fitted, tiny_data):
    """logits: softmax(mu / sqrt(T^2 + pi/8 var)); predictive (the authors'): softmax(mu / (T sqrt(1 + pi/8 var)))."""
    from bcpkd_cli.calibration import at_temperature
    from bcpkd_cli.choices import Temper

    teacher = fitted(Subset.last_layer, Hessian.kron)
    x = tiny_data.heldout.inputs[:50]
    f_mu, f_var = teacher.logit_moments(x)
    predictive = teacher.predictive_at(x, torch.arange(50))
    t = 2.0
    logits_way = torch.softmax(f_mu / torch.sqrt(t**2 + math.pi / 8 * f_var), dim=1)
    authors_way = torch.softmax(f_mu / (t * torch.sqrt(1 + math.pi / 8 * f_var)), dim=1)
    torch.testing.assert_close(at_temperature(predictive, t, Temper.logits), logits_way, atol=1e-6, rtol=0)
    torch.testing.assert_close(at_temperature(predictive, t, Temper.predictive), authors_way, atol=1e-6, rtol=0)
    assert (logits_way - authors_way).abs().max() > 1e-3  # they differ visibly at T_t = 2
    assert torch.equal(at_temperature(predictive, 1.0, Temper.predictive), predictive(1.0))
