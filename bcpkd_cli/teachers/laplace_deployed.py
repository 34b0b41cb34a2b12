"""The last-layer Laplace probit predictive as one graph: softmax(f_mu / t / sqrt(1 + pi/8 * var / t^2)), t = T_cal.

f_mu = head(phi), phi the network's features; var [B, C], the diagonal of the GLM logit covariance, is a quadratic
form in phi whose constants come from the posterior once, when the graph is built (no eigh or Cholesky inside):

  kron: var = ((phi Q_F)^2 @ inv^T) @ (Q_C^2)^T + var_b   (laplace_closed_form.py; inv [C, F] the inverse
        eigenvalue grid with laplace-torch's damping, var_b [C] the bias covariance's diagonal)
  diag: var = phi^2 @ var_W^T + var_b
  full: var_c = phi~^T Sigma_c phi~, phi~ = [phi, 1], Sigma_c [F+1, F+1] the covariance of head row c and bias c
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bcpkd_cli.models import feature_input
from bcpkd_cli.teachers.deployed import snapshot
from bcpkd_cli.teachers.laplace_closed_form import kron_bias_covariance, kron_inverse_eigenvalues


class KronVariance(nn.Module):
    """phi [B, F] -> var [B, C] under laplace-torch's KronDecomposed posterior precision of the head."""

    def __init__(self, precision, n_classes: int, has_bias: bool):
        super().__init__()
        q_out, q_in = precision.eigenvectors[0]
        self.register_buffer("q_in", q_in.clone())  # [F, F]
        self.register_buffer("inverse", kron_inverse_eigenvalues(precision))  # [C, F]
        self.register_buffer("q_out_squared", q_out.square())  # [C, C]
        bias = kron_bias_covariance(precision).diagonal() if has_bias else \
            torch.zeros(n_classes, dtype=q_in.dtype, device=q_in.device)
        self.register_buffer("bias", bias.clone())  # [C]

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        weights = (phi.to(self.q_in.dtype) @ self.q_in).square() @ self.inverse.T  # m [B, C]
        return weights @ self.q_out_squared.T + self.bias


class DiagVariance(nn.Module):
    """phi [B, F] -> var [B, C] under laplace-torch's diagonal posterior variance [C*F (+ C)]."""

    def __init__(self, posterior_variance: torch.Tensor, n_classes: int, has_bias: bool):
        super().__init__()
        n_features = (len(posterior_variance) - (n_classes if has_bias else 0)) // n_classes
        weight = posterior_variance[: n_classes * n_features].reshape(n_classes, n_features)
        self.register_buffer("weight", weight.clone())  # [C, F]
        bias = posterior_variance[-n_classes:] if has_bias else torch.zeros_like(posterior_variance[:n_classes])
        self.register_buffer("bias", bias.clone())  # [C]

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        return phi.to(self.weight.dtype).square() @ self.weight.T + self.bias


class FullVariance(nn.Module):
    """phi [B, F] -> var [B, C] under laplace-torch's dense posterior covariance [P, P] of the head: parameter
    c*F + j is W[c, j], C*F + c is b[c] (laplace-torch's last-layer Jacobian order)."""

    def __init__(self, covariance: torch.Tensor, n_classes: int, has_bias: bool):
        super().__init__()
        n_features = (len(covariance) - (n_classes if has_bias else 0)) // n_classes
        classes = torch.arange(n_classes, device=covariance.device)[:, None]
        rows = classes * n_features + torch.arange(n_features, device=covariance.device)  # [C, F]
        if has_bias:
            rows = torch.cat([rows, n_classes * n_features + classes], dim=1)  # [C, F+1]
        blocks = covariance[rows[:, :, None], rows[:, None, :]]  # [C, F+1, F+1] ([C, F, F] without bias)
        if not has_bias:  # phi~ = [phi, 1] all the same: a zero row and column for the missing bias
            blocks = torch.nn.functional.pad(blocks, (0, 1, 0, 1))
        self.register_buffer("blocks", blocks)

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        phi = phi.to(self.blocks.dtype)
        extended = torch.cat([phi, torch.ones_like(phi[:, :1])], dim=1)  # phi~ [B, F+1]
        return ((extended @ self.blocks) * extended).sum(dim=2).T  # [C, B, F+1] -> [B, C]


class LastLayerProbit(nn.Module):
    """inputs -> (probit logits [B, C], probs [B, C], the variance of the predicted class's logit at T_cal [B])."""

    def __init__(self, model: nn.Module, variance: nn.Module, temperature: float):
        super().__init__()
        self.network, self.variance, self.temperature = snapshot(model), variance, temperature

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        phi = self.network.features(feature_input(self.network, x))  # [B, F]
        f_mu = self.network.head(phi)  # [B, C]
        var = self.variance(phi).to(f_mu.dtype)  # [B, C]
        t = self.temperature
        logits = f_mu / t / torch.sqrt(1.0 + math.pi / 8.0 * var / t**2)
        probs = torch.softmax(logits, dim=1)
        return logits, probs, var.gather(1, probs.argmax(dim=1, keepdim=True)).squeeze(1) / t**2
