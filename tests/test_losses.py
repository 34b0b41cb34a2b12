"""The KD loss of the paper's code: (1 - a) CE + a T_t T_s KL(p_teacher || softmax(z / T_s))."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bcpkd_cli.losses import kd_loss, kl_to_student


def _batch(seed: int = 0, b: int = 6, c: int = 4):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(c, (b,), generator=gen)
    teacher = torch.softmax(torch.randn(b, c, generator=gen, dtype=torch.float64) * 1.5, dim=1)
    return logits, labels, teacher


def _kl_by_hand(p: torch.Tensor, z: torch.Tensor, t_s: float) -> torch.Tensor:
    """sum_k p_k log(p_k / q_k) with q = softmax(z / t_s), term by term in plain Python."""
    out = []
    for p_row, z_row in zip(p.tolist(), z.tolist()):
        e = [math.exp(v / t_s) for v in z_row]
        q = [v / sum(e) for v in e]
        out.append(sum(pk * math.log(pk / qk) for pk, qk in zip(p_row, q) if pk > 0))
    return torch.tensor(out, dtype=torch.float64)


def test_alpha_zero_is_cross_entropy():
    z, y, p = _batch()
    got = kd_loss(z, y, p, alpha=0.0, t_teacher=3.0, t_student=2.0)
    assert got.shape == (6,)
    torch.testing.assert_close(got, F.cross_entropy(z, y, reduction="none"), atol=1e-12, rtol=0)


def test_alpha_one_unit_temperatures_onehot_targets_is_cross_entropy():
    z, y, _ = _batch(1)
    onehot = F.one_hot(y, 4).double()
    got = kd_loss(z, y, onehot, alpha=1.0, t_teacher=1.0, t_student=1.0)
    torch.testing.assert_close(got, F.cross_entropy(z, y, reduction="none"), atol=1e-12, rtol=0)


def test_kl_term_vanishes_when_teacher_equals_student():
    z, y, _ = _batch(2)
    for t_s in (1.0, 2.5):
        p = torch.softmax(z / t_s, dim=1)
        torch.testing.assert_close(kl_to_student(p, z, t_s), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(kd_loss(z, y, p, 1.0, 1.7, t_s), torch.zeros(6, dtype=torch.float64),
                                   atol=1e-12, rtol=0)


def test_exact_targets_give_zero_gradient():
    # the theory's interpolation: with alpha=1 and targets softmax(z / T_s), every per-example gradient is 0
    z, y, _ = _batch(3)
    p = torch.softmax(z / 2.0, dim=1)
    z = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kd_loss(z, y, p, 1.0, 1.0, 2.0).sum(), z)
    torch.testing.assert_close(g, torch.zeros_like(g), atol=1e-12, rtol=0)


def test_kl_matches_hand_formula_with_zero_teacher_entries():
    z, _, p = _batch(4)
    p = p.clone()
    p[0] = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)  # zeros contribute 0 * log 0 = 0
    got = kl_to_student(p, z, 1.5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _kl_by_hand(p, z, 1.5), atol=1e-10, rtol=0)


def test_temperature_factor_t_teacher_times_t_student():
    z, y, p = _batch(5)
    got = kd_loss(z, y, p, alpha=1.0, t_teacher=2.0, t_student=3.0)
    torch.testing.assert_close(got, 6.0 * kl_to_student(p, z, 3.0), atol=1e-12, rtol=0)
    torch.testing.assert_close(got, 6.0 * _kl_by_hand(p, z, 3.0), atol=1e-10, rtol=0)


def test_mixture_alpha_0_3_is_the_weighted_sum():
    z, y, p = _batch(6)
    got = kd_loss(z, y, p, alpha=0.3, t_teacher=2.0, t_student=1.5)
    log_q1 = z - torch.logsumexp(z, dim=1, keepdim=True)
    ce = -log_q1.gather(1, y[:, None]).squeeze(1)
    want = 0.7 * ce + 0.3 * 2.0 * 1.5 * _kl_by_hand(p, z, 1.5)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


