"""Last-layer Laplace logit moments in closed form from the penultimate features phi [B, F].

laplace-torch builds a dense Jacobian [B, C, C*F] per batch and multiplies it through the posterior
covariance (about 9x a forward pass at 100 classes). For a last-layer posterior over the head
W [C, F] (+ bias b [C]) the same GLM covariance J Sigma J^T has a closed form in the posterior
precision's own factors:

  kron: weight block Sigma_W = (Q_C (x) Q_F) diag(1 / (l_C l_F^T + delta)) (Q_C (x) Q_F)^T, so with
        psi = Q_F^T phi and m_i = sum_j psi_j^2 / (l_C,i l_F,j + delta):
        Cov(f) = Q_C diag(m) Q_C^T + Sigma_b,   Sigma_b = Q_b diag(1 / (l_b + delta)) Q_b^T
        (with laplace-torch's damping: 1 / ((l_C,i + sqrt(delta)) (l_F,j + sqrt(delta))))
  diag: Cov(f) = diag(phi^2 @ var_W^T + var_b)

Cost per example: one F x F rotation and a [F] x [F, C] product, negligible beside the backbone.
"""

from __future__ import annotations

import torch


def kron_inverse_eigenvalues(precision) -> torch.Tensor:
    """1 / the eigenvalues of the head's weight block of laplace-torch's KronDecomposed posterior precision, as the
    grid [C, F] over (l_C,i, l_F,j), with laplace-torch's damping rule."""
    (l_out, l_in), delta = precision.eigenvalues[0], precision.deltas[0]
    if precision.damping:
        return 1.0 / torch.outer(l_out + delta.sqrt(), l_in + delta.sqrt())
    return 1.0 / (torch.outer(l_out, l_in) + delta)


def kron_bias_covariance(precision) -> torch.Tensor:
    """The posterior covariance of the head's bias [C, C] (KronDecomposed: its second block)."""
    l_bias, q_bias = precision.eigenvalues[1][0], precision.eigenvectors[1][0]
    return (q_bias / (l_bias + precision.deltas[1])) @ q_bias.T


def kron_logit_covariance(features: torch.Tensor, precision, has_bias: bool, full: bool) -> torch.Tensor:
    """features [B, F], laplace-torch's KronDecomposed posterior precision of the head ->
    logit covariance [B, C, C] (full) or its diagonal [B, C]."""
    q_out, q_in = precision.eigenvectors[0]
    inverse = kron_inverse_eigenvalues(precision)  # [C, F]
    weights = (features.to(q_in.dtype) @ q_in).square() @ inverse.T  # m [B, C]
    if full:
        cov = torch.einsum("ci,bi,di->bcd", q_out, weights, q_out)
    else:
        cov = weights @ q_out.square().T
    if has_bias:
        sigma_bias = kron_bias_covariance(precision)  # [C, C]
        cov = cov + (sigma_bias if full else sigma_bias.diagonal())
    return cov


def diag_logit_covariance(features: torch.Tensor, posterior_variance: torch.Tensor, n_classes: int,
                          has_bias: bool, full: bool) -> torch.Tensor:
    """features [B, F], laplace-torch's diagonal posterior variance [C*F (+ C)] ->
    logit covariance [B, C, C] (full, diagonal matrices) or its diagonal [B, C]."""
    n_features = features.shape[1]
    var_weight = posterior_variance[: n_classes * n_features].reshape(n_classes, n_features)
    var = features.to(var_weight.dtype).square() @ var_weight.T  # [B, C]
    if has_bias:
        var = var + posterior_variance[-n_classes:]
    return torch.diag_embed(var) if full else var
