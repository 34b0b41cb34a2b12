"""Metrics on hand-made inputs whose values are known."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from bcpkd_cli import metrics


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def labels(values):
    return torch.tensor(values, dtype=torch.long)


def test_accuracy():
    probs = t([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    assert metrics.accuracy(probs, labels([0, 1, 1, 0])) == pytest.approx(0.5)
    assert metrics.accuracy(probs, labels([0, 1, 0, 1])) == pytest.approx(1.0)


def test_nll():
    assert metrics.nll(t([[0.5, 0.5]]), labels([0])) == pytest.approx(math.log(2))
    probs = t([[0.5, 0.5], [0.1, 0.9], [0.25, 0.75]])
    want = -(math.log(0.5) + math.log(0.9) + math.log(0.25)) / 3
    assert metrics.nll(probs, labels([1, 1, 0])) == pytest.approx(want, abs=1e-12)


def test_nll_clamps_zero_probabilities():
    assert metrics.nll(t([[1.0, 0.0]]), labels([1])) == pytest.approx(-math.log(1e-12))


def test_brier():
    assert metrics.brier(t([[1.0, 0.0]]), labels([1])) == pytest.approx(2.0)
    assert metrics.brier(t([[1.0, 0.0]]), labels([0])) == pytest.approx(0.0)
    # (0.2-1)^2 + 0.3^2 + 0.5^2 = 0.98 and (0.5-1)^2 + 0.5^2 + 0 = 0.5
    assert metrics.brier(t([[0.2, 0.3, 0.5], [0.0, 0.5, 0.5]]), labels([0, 2])) == pytest.approx((0.98 + 0.5) / 2)


# Top-1 confidences 0.9 (right), 0.62 (wrong), 0.7 (right), 0.65 (right), 0.41 (wrong), none on a bin edge.
ECE_PROBS = t([[0.9, 0.05, 0.05], [0.62, 0.3, 0.08], [0.2, 0.7, 0.1], [0.1, 0.25, 0.65], [0.41, 0.35, 0.24]])
ECE_LABELS = labels([0, 1, 1, 2, 1])


def test_ece_15_bins_by_hand():
    # bin b = (b/15, (b+1)/15]: 0.9 -> 13, 0.62 -> 9, 0.65 -> 9, 0.7 -> 10, 0.41 -> 6
    bins = {13: [(0.9, 1)], 9: [(0.62, 0), (0.65, 1)], 10: [(0.7, 1)], 6: [(0.41, 0)]}
    want = sum(abs(sum(c for c, _ in v) - sum(a for _, a in v)) for v in bins.values()) / 5
    assert want == pytest.approx((0.1 + 0.27 + 0.3 + 0.41) / 5)
    assert metrics.ece(ECE_PROBS, ECE_LABELS) == pytest.approx(want, abs=1e-12)
    assert metrics.ece(ECE_PROBS, ECE_LABELS, n_bins=15) == pytest.approx(want, abs=1e-12)


def test_ece_2_bins_by_hand():
    # (0, 0.5]: 0.41 wrong -> |0.41 - 0|; (0.5, 1]: conf 0.9+0.62+0.7+0.65 = 2.87 vs 3 right -> 0.13
    assert metrics.ece(ECE_PROBS, ECE_LABELS, n_bins=2) == pytest.approx((0.41 + 0.13) / 5, abs=1e-12)


def test_ece_bin_edges_are_right_closed():
    # confidence exactly 0.5 belongs to (0, 0.5], confidence 1.0 to the last bin
    probs = t([[0.5, 0.5], [0.75, 0.25], [1.0, 0.0]])
    y = labels([0, 1, 0])
    # bin 0: 0.5 right -> |0.5 - 1| = 0.5; bin 1: 0.75 wrong + 1.0 right -> |1.75 - 1| = 0.75
    assert metrics.ece(probs, y, n_bins=2) == pytest.approx((0.5 + 0.75) / 3, abs=1e-12)
    # with one bin everything pools: |2.25 - 2| / 3
    assert metrics.ece(probs, y, n_bins=1) == pytest.approx(0.25 / 3, abs=1e-12)


def test_ece_of_perfect_confident_predictions_is_zero():
    assert metrics.ece(t([[1.0, 0.0], [0.0, 1.0]]), labels([0, 1])) == pytest.approx(0.0)


def test_kl_to_bcp_by_hand():
    q, p = t([[0.25, 0.75]]), t([[0.5, 0.5]])
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert metrics.kl_to_bcp(q, p) == pytest.approx(want, abs=1e-12)
    # KL(true || model) direction, zero BCP entries contribute nothing, mean over rows
    q2, p2 = t([[0.25, 0.75], [0.1, 0.9]]), t([[0.5, 0.5], [0.0, 1.0]])
    want2 = (want + math.log(1 / 0.9)) / 2
    assert metrics.kl_to_bcp(q2, p2) == pytest.approx(want2, abs=1e-12)
    assert metrics.kl_to_bcp(p2, p2) == pytest.approx(0.0, abs=1e-12)


def test_tv_to_bcp_by_hand():
    assert metrics.tv_to_bcp(t([[0.25, 0.75]]), t([[0.5, 0.5]])) == pytest.approx(0.25)
    q, p = t([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]), t([[0.1, 0.6, 0.3], [0.0, 0.0, 1.0]])
    assert metrics.tv_to_bcp(q, p) == pytest.approx((0.5 * (0.1 + 0.3 + 0.2) + 1.0) / 2)


def test_convergence_noise_of_a_linear_curve_is_zero():
    assert metrics.convergence_noise([float(v) for v in range(10)]) == pytest.approx(0.0, abs=1e-12)


def test_convergence_noise_of_an_alternating_curve():
    values = [0.0, 1.0] * 5  # last half [1, 0, 1, 0, 1] -> differences [-1, 1, -1, 1]
    assert metrics.convergence_noise(values) == pytest.approx(statistics.stdev([-1, 1, -1, 1]))
    assert metrics.convergence_noise(values) == pytest.approx(math.sqrt(4 / 3))


def test_convergence_noise_uses_only_the_last_half():
    noisy_start = [5.0, -3.0, 8.0, 0.0, 1.0, 2.0, 3.0, 4.0]  # last half 1, 2, 3, 4: constant steps
    assert metrics.convergence_noise(noisy_start) == pytest.approx(0.0, abs=1e-12)
    values = [0.0, 0.0, 0.0, 1.0, 3.0, 4.0]  # last half [1, 3, 4] -> differences [2, 1]
    assert metrics.convergence_noise(values) == pytest.approx(statistics.stdev([2, 1]))


def test_convergence_noise_of_a_too_short_curve_is_nan():
    assert math.isnan(metrics.convergence_noise([1.0, 2.0, 3.0, 4.0]))
    assert math.isnan(metrics.convergence_noise([]))


def test_classification_report_keys_and_values():
    probs = t([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    y = labels([0, 1, 1])
    report = metrics.classification_report(probs, y, None)
    assert set(report) == {"accuracy", "nll", "ece", "brier"}
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert report["nll"] == pytest.approx(metrics.nll(probs, y))
    assert all(isinstance(v, float) for v in report.values())

    bcp = t([[0.8, 0.2], [0.3, 0.7], [0.5, 0.5]])
    with_bcp = metrics.classification_report(probs, y, bcp, n_bins=2)
    assert set(with_bcp) == {"accuracy", "nll", "ece", "brier", "kl_to_bcp", "tv_to_bcp"}
    assert with_bcp["ece"] == pytest.approx(metrics.ece(probs, y, n_bins=2))
    assert with_bcp["tv_to_bcp"] == pytest.approx((0.1 + 0.0 + 0.1) / 3)


def test_metrics_accept_float16_and_float32():
    probs = t([[0.5, 0.5], [0.25, 0.75]])
    y = labels([0, 1])
    for dtype in (torch.float16, torch.float32):
        assert metrics.nll(probs.to(dtype), y) == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2, abs=1e-6)


def test_ece_confidence_on_a_bin_edge_belongs_to_the_lower_bin():
    # 0.2 = 3/15 closes bin (2/15, 3/15], the bin of 0.19 too: one bin with mean confidence 0.195 and
    # accuracy 0.5 gives 0.305; splitting them (0.2 counted in the next bin) would give 0.4 + 0.095
    probs = torch.tensor([[0.20, 0.16, 0.16, 0.16, 0.16, 0.16],
                          [0.19, 0.17, 0.16, 0.16, 0.16, 0.16]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    assert metrics.ece(probs, labels, 15) == pytest.approx(0.305, abs=1e-12)
