"""Metrics (pure). Probabilities [N, C], labels [N]; all return Python floats."""

from __future__ import annotations

import math

import torch

_EPS = 1e-12


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return (probs.argmax(dim=1) == labels).double().mean().item()


def per_class_accuracy(probs: torch.Tensor, labels: torch.Tensor) -> tuple[list[int], list[float | None]]:
    """Per class c (of probs' C): the number of examples labelled c, and the share of them predicted c (None
    where there are none)."""
    n_classes = probs.shape[1]
    counts = torch.bincount(labels, minlength=n_classes).double()
    hits = torch.bincount(labels[probs.argmax(dim=1) == labels], minlength=n_classes).double()
    return ([int(n) for n in counts.tolist()],
            [None if n == 0 else h / n for h, n in zip(hits.tolist(), counts.tolist())])


def confusion_matrix(probs: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Counts [C][C] (C of probs): row = true class, column = predicted class (the top-1), both in label order."""
    n_classes = probs.shape[1]
    pairs = labels.long() * n_classes + probs.argmax(dim=1)
    counts = torch.bincount(pairs, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    return [[int(v) for v in row] for row in counts.tolist()]


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels (probabilities clamped at 1e-12)."""
    picked = probs.double().gather(1, labels[:, None]).squeeze(1)
    return -picked.clamp_min(_EPS).log().mean().item()


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over examples of sum_k (p_k - onehot_k)^2 (ranges over [0, 2])."""
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return (probs.double() - onehot).square().sum(dim=1).mean().item()


def _confidence_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> tuple[torch.Tensor, ...]:
    """Per equal-width bin of (0, 1] of the top-1 confidence: summed confidence, summed correctness, count [n_bins]."""
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == labels).double()
    inner_edges = torch.arange(1, n_bins, dtype=torch.float64, device=probs.device) / n_bins  # k/n, rounded once
    bins = torch.bucketize(confidence, inner_edges)  # bin b is (b/n, (b+1)/n]; confidence k/n lands in bin k-1
    zeros = torch.zeros(n_bins, dtype=torch.float64, device=probs.device)
    return (zeros.index_add(0, bins, confidence), zeros.index_add(0, bins, correct),
            zeros.index_add(0, bins, torch.ones_like(confidence)))


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence over `n_bins` equal-width bins of (0, 1]."""
    conf_sum, acc_sum, _ = _confidence_bins(probs, labels, n_bins)
    return ((conf_sum - acc_sum).abs().sum() / len(labels)).item()


def reliability(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, list]:
    """The reliability diagram's data: per confidence bin, its mean confidence, accuracy and size (empty bins:
    None)."""
    conf_sum, acc_sum, count = _confidence_bins(probs, labels, n_bins)
    mean = [None if n == 0 else v for v, n in zip((conf_sum / count.clamp_min(1)).tolist(), count.tolist())]
    accuracy = [None if n == 0 else v for v, n in zip((acc_sum / count.clamp_min(1)).tolist(), count.tolist())]
    return {"confidence": mean, "accuracy": accuracy, "count": [int(n) for n in count.tolist()]}


def kl_to_bcp(probs: torch.Tensor, true_bcp: torch.Tensor) -> float:
    """Mean KL(true_bcp || probs): how far a model's probabilities are from the exact BCPs."""
    p, q = true_bcp.double(), probs.double().clamp_min(_EPS)
    return (torch.xlogy(p, p) - p * q.log()).sum(dim=1).mean().item()


def tv_to_bcp(probs: torch.Tensor, true_bcp: torch.Tensor) -> float:
    """Mean total-variation distance 0.5 * sum_k |p_k - q_k|."""
    return 0.5 * (probs.double() - true_bcp.double()).abs().sum(dim=1).mean().item()


def convergence_noise(values: list[float]) -> float:
    """Standard deviation of successive differences over the last half of a logged curve."""
    tail = torch.tensor(values[len(values) // 2:], dtype=torch.float64)
    if len(tail) < 3:
        return math.nan
    return tail.diff().std().item()


def classification_report(probs: torch.Tensor, labels: torch.Tensor, true_bcp: torch.Tensor | None,
                          n_bins: int = 15) -> dict[str, float]:
    """accuracy, nll, ece, brier, and kl_to_bcp / tv_to_bcp where the true BCPs are known."""
    report = {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels),
              "ece": ece(probs, labels, n_bins), "brier": brier(probs, labels)}
    if true_bcp is not None:
        report["kl_to_bcp"] = kl_to_bcp(probs, true_bcp)
        report["tv_to_bcp"] = tv_to_bcp(probs, true_bcp)
    return report
