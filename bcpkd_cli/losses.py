"""Loss functions (pure). Shapes: logits and probabilities [B, C], labels [B]."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_to_student(teacher_probs: torch.Tensor, student_logits: torch.Tensor, t_student: float) -> torch.Tensor:
    """Per-example KL(teacher_probs || softmax(student_logits / t_student)) -> [B]."""
    student_log_probs = F.log_softmax(student_logits / t_student, dim=1)
    return (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * student_log_probs).sum(dim=1)


def kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_probs: torch.Tensor,
    alpha: float,
    t_teacher: float,
    t_student: float,
) -> torch.Tensor:
    """Per-example KD loss of the paper's code -> [B]:

        (1 - alpha) * CE(student_logits, label)
        + alpha * T_t * T_s * KL(p_teacher at T_t || softmax(student_logits / T_s)).

    `teacher_probs` are already at temperature T_t (the cache is built at T_t).
    """
    loss = alpha * t_teacher * t_student * kl_to_student(teacher_probs, student_logits, t_student)
    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * F.cross_entropy(student_logits, labels, reduction="none")
    return loss


def mse_to_onehot(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example mean squared error between the logits and the one-hot label -> [B] (the MSE teacher's
    loss: its minimiser is E[onehot(y) | x], the Bayes class probabilities themselves)."""
    onehot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return (logits - onehot).square().mean(dim=1)


def cmi_to_centroids(logits: torch.Tensor, centroid_probs: torch.Tensor) -> torch.Tensor:
    """Per-example KL(softmax(logits) || Q_y) -> [B], with Q_y [B, C] the centroid of the example's class
    (the mean predictive over that class). Its mean estimates the conditional mutual information
    I(X; Y_hat | Y) of the network's outputs given the label."""
    log_probs = F.log_softmax(logits, dim=1)
    return (log_probs.exp() * (log_probs - centroid_probs.clamp_min(1e-12).log())).sum(dim=1)
