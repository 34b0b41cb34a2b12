"""Training loop, per-example gradients, temperature fitting and Dirichlet-noised targets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bcpkd_cli import targets
from bcpkd_cli.config import Optimizer
from bcpkd_cli.engine import TrainSpec, train
from bcpkd_cli.grad_noise import per_example_grad_sq_norms
from bcpkd_cli.losses import kd_loss
from bcpkd_cli.models import build_model, predict_logits
from bcpkd_cli.teachers.temperature import fit_temperature

pytestmark = pytest.mark.usefixtures("single_thread")

SPEC = {"arch": "mlp", "input_shape": [30], "n_classes": 5, "hidden": [8]}


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(SPEC)


def _cross_entropy(logits, labels, _targets):
    return F.cross_entropy(logits, labels, reduction="none")


def _grad_sq_norms_by_loop(model, inputs, labels, target_probs, loss_fn):
    norms = []
    params = list(model.parameters())
    for i in range(len(labels)):
        t = None if target_probs is None else target_probs[i:i + 1]
        loss = loss_fn(model(inputs[i:i + 1]), labels[i:i + 1], t).sum()
        grads = torch.autograd.grad(loss, params)
        norms.append(sum(g.square().sum() for g in grads))
    return torch.stack(norms)


def test_per_example_grad_sq_norms_with_soft_targets(tiny_data):
    model = _model()
    x, y = tiny_data.train.inputs[:10], tiny_data.train.labels[:10]
    soft = targets.dirichlet_noised(tiny_data.train.true_bcp[:10], 2.0, seed=1)

    def loss_fn(logits, labels, target_probs):
        return kd_loss(logits, labels, target_probs, alpha=0.7, t_teacher=2.0, t_student=1.5)

    n_params = sum(p.numel() for p in model.parameters())
    got = per_example_grad_sq_norms(model, x, y, soft, loss_fn, floats_per_chunk=3 * n_params)  # chunks 3, 3, 3, 1
    want = _grad_sq_norms_by_loop(model, x, y, soft, loss_fn)
    assert got.shape == (10,)
    assert (want > 1e-6).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_per_example_grad_sq_norms_without_targets(tiny_data):
    model = _model(1)
    x, y = tiny_data.train.inputs[:10], tiny_data.train.labels[:10]
    got = per_example_grad_sq_norms(model, x, y, None, _cross_entropy)
    torch.testing.assert_close(got, _grad_sq_norms_by_loop(model, x, y, None, _cross_entropy), atol=1e-5, rtol=1e-5)


def test_gradient_noise_vanishes_for_a_students_own_predictions(tiny_data):
    # sigma* of the theory: targets equal to the student's own probabilities give zero per-example gradients
    model = _model(2)
    x, y = tiny_data.train.inputs[:10], tiny_data.train.labels[:10]
    own = torch.softmax(predict_logits(model, x), dim=1)

    def loss_fn(logits, labels, target_probs):
        return kd_loss(logits, labels, target_probs, 1.0, 1.0, 1.0)

    assert per_example_grad_sq_norms(model, x, y, own, loss_fn).max().item() < 1e-10


def _train_once(tiny_data, seed: int, optimizer: Optimizer = Optimizer.sgd):
    model = _model(seed)
    spec = TrainSpec(epochs=2, batch_size=16, optimizer=optimizer, lr=0.05, momentum=0.9, weight_decay=1e-4,
                     seed=seed)
    log: list[dict] = []
    steps = train(model, tiny_data.train.inputs, tiny_data.train.labels, None, _cross_entropy, spec, "test",
                  log_every=7, curve=lambda m: {}, log=log)
    return model, steps, [entry["step"] for entry in log]


@pytest.mark.parametrize("optimizer", [Optimizer.sgd, Optimizer.adam])
def test_train_is_deterministic_for_a_seed(tiny_data, optimizer):
    a, steps_a, _ = _train_once(tiny_data, 0, optimizer)
    b, steps_b, _ = _train_once(tiny_data, 0, optimizer)
    assert steps_a == steps_b == 2 * math.ceil(300 / 16)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    c, _, _ = _train_once(tiny_data, 1, optimizer)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_train_reduces_the_loss_and_logs_at_fixed_steps(tiny_data):
    before = F.cross_entropy(predict_logits(_model(0), tiny_data.train.inputs), tiny_data.train.labels).item()
    model, steps, logged = _train_once(tiny_data, 0)
    after = F.cross_entropy(predict_logits(model, tiny_data.train.inputs), tiny_data.train.labels).item()
    assert after < before
    assert logged == list(range(0, steps, 7)) + [steps]


def test_fit_temperature_recovers_a_known_temperature():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 5, generator=gen, dtype=torch.float64) * 4.0
    labels = torch.multinomial(torch.softmax(z / 2.0, dim=1), 1, generator=gen).squeeze(1)
    fitted = fit_temperature(lambda temperature: torch.softmax(z / temperature, dim=1), labels)
    assert abs(fitted - 2.0) < 0.15


def test_fit_temperature_on_calibrated_logits_is_about_one():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(20000, 5, generator=gen, dtype=torch.float64) * 3.0
    labels = torch.multinomial(torch.softmax(z, dim=1), 1, generator=gen).squeeze(1)
    assert abs(fit_temperature(lambda temperature: torch.softmax(z / temperature, dim=1), labels) - 1.0) < 0.1


def _bcp(n: int = 4) -> torch.Tensor:
    return torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.05, 0.9, 0.05], [1 / 3, 1 / 3, 1 / 3]][:n])


def test_dirichlet_noised_rows_sum_to_one():
    noisy = targets.dirichlet_noised(_bcp(), alpha=0.5, seed=3)
    assert noisy.shape == (4, 3) and noisy.dtype == torch.float32
    assert (noisy >= 0).all()
    torch.testing.assert_close(noisy.double().sum(1), torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", [5.0, 0.5])
def test_dirichlet_noised_mean_and_variance(alpha):
    n = 20000
    bcp = _bcp().repeat(n, 1)  # each of the 4 rows n times
    draws = targets.dirichlet_noised(bcp, alpha, seed=0).double().view(n, 4, 3)
    p = _bcp().double()
    mean, var = draws.mean(0), draws.var(0)
    torch.testing.assert_close(mean, p, atol=0.015, rtol=0)
    want_var = p * (1 - p) / (alpha + 1)
    torch.testing.assert_close(var, want_var, atol=0.001, rtol=0.05)  # 1/alpha would fail


def test_dirichlet_noised_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = targets.dirichlet_noised(_bcp(), 5.0, seed=7)
    assert torch.equal(torch.rand(1), expected_next)  # the global generator was not advanced
    assert torch.equal(a, targets.dirichlet_noised(_bcp(), 5.0, seed=7))
    assert not torch.equal(a, targets.dirichlet_noised(_bcp(), 5.0, seed=8))


def test_onehot_and_temper():
    assert torch.equal(targets.onehot(torch.tensor([2, 0]), 3), torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    p = _bcp()
    assert targets.temper(p, 1.0) is p
    torch.testing.assert_close(targets.temper(p, 2.0), torch.softmax(p.log() / 2.0, dim=1))
    hot = targets.temper(p, 0.01)
    assert torch.equal(hot[:3].argmax(1), p[:3].argmax(1)) and hot[:3].max(1).values.min() > 0.99


def test_lr_milestones_divide_the_learning_rate_by_ten(tiny_data):
    from bcpkd_cli.config import Optimizer
    from bcpkd_cli.engine import TrainSpec, train
    from bcpkd_cli.models import build_model, model_spec

    model = build_model(model_spec("mlp", (30,), 5, (8,)))
    seen = []
    spec = TrainSpec(epochs=4, batch_size=100, optimizer=Optimizer.sgd, lr=0.5, momentum=0.0, weight_decay=0.0,
                     seed=0, lr_milestones=(1, 3))
    original_step = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    torch.optim.SGD.step = spy
    try:
        train(model, tiny_data.train.inputs, tiny_data.train.labels, None,
              lambda logits, labels, _: torch.nn.functional.cross_entropy(logits, labels, reduction="none"),
              spec, "test")
    finally:
        torch.optim.SGD.step = original_step
    per_epoch = len(seen) // 4
    assert [seen[e * per_epoch] for e in range(4)] == pytest.approx([0.5, 0.05, 0.05, 0.005])


def test_a_last_batch_of_one_example_joins_the_one_before():
    from bcpkd_cli.steps import batch_bounds

    assert batch_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batch_bounds(9, 4) == [(0, 4), (4, 9)]  # BatchNorm cannot train on one example
    assert batch_bounds(1, 4) == [(0, 1)] and batch_bounds(8, 4) == [(0, 4), (4, 8)]
