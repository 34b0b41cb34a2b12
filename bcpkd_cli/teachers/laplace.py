"""Laplace-approximation teacher through laplace-torch (GLM predictive, probit or MC link).

laplace-torch fits the posterior; the mean and covariance of the logits, f_mu [B, C] and f_var
[B, C, C], come in closed form from the penultimate features for last-layer Kron and diagonal
posteriors (laplace_closed_form.py) and from laplace-torch's Jacobians otherwise. Temperature T (calibration
T_cal times the requested T) divides the logit distribution: mean f_mu / T, covariance f_var / T^2; then
  probit: softmax((f_mu / T) / sqrt(1 + pi/8 * diag(f_var) / T^2))   (laplace-torch's probit at T=1)
  mc:     mean over S draws of softmax((f_mu + L eps) / T), eps seeded by example index.
The last-layer probit predictive deploys as one graph (laplace_deployed.py); the others as the MAP network.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import nn

from bcpkd_cli import metrics
from bcpkd_cli.choices import Bayes, Hessian, Link, PriorMethod, PriorTuning, Subset, teacher_label
from bcpkd_cli.config import CalibrateConfig, LaplaceConfig, TeacherConfig
from bcpkd_cli.console import console
from bcpkd_cli.data import Split
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.models import HEAD_NAME, build_model, feature_input
from bcpkd_cli.teachers.base import Teacher
from bcpkd_cli.teachers.deployed import Deployed, Tempered, check_draws
from bcpkd_cli.teachers.index_noise import index_normal
from bcpkd_cli.teachers.laplace_closed_form import diag_logit_covariance, kron_logit_covariance
from bcpkd_cli.teachers.laplace_deployed import DiagVariance, FullVariance, KronVariance, LastLayerProbit
from bcpkd_cli.teachers.training import TrainingRun, cross_entropy

FULL_HESSIAN_MAX_PARAMS = 20_000


def check_hessian_size(model: nn.Module, cfg: LaplaceConfig) -> None:
    """Refuse posteriors laplace-torch cannot fit here: BatchNorm under an all-weights posterior, or a
    dense Hessian that would not fit in memory."""
    if cfg.subset == Subset.all and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise BcpkdError("teacher.laplace.subset=all: this network has BatchNorm layers, which laplace-torch 0.3's "
                         "curvature backends do not support; use --set teacher.laplace.subset=last_layer")
    n_params = sum(p.numel() for p in (model.head if cfg.subset == Subset.last_layer else model).parameters())
    if cfg.hessian == Hessian.full and n_params > FULL_HESSIAN_MAX_PARAMS:
        raise BcpkdError(f"teacher.laplace.hessian=full over {n_params} weights needs a {n_params}^2 matrix; "
                         f"use --set teacher.laplace.hessian=kron or teacher.laplace.subset=last_layer")


def _plain_state(state: dict) -> dict:
    """laplace-torch's state_dict with its enums as plain strings, loadable with weights_only=True."""
    return {k: (v.value if hasattr(v, "value") and isinstance(v, str) else v) for k, v in state.items()}


def _to_device(obj, device: torch.device):
    """Tensors inside nested lists and dicts (laplace-torch's Kron factors) moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


MAX_WIDENINGS = 4  # a grid whose optimum stays at an edge is moved by its own span at most this often


class RowBatches:
    """(inputs [B, ...], labels [B]) in order, sliced a batch at a time (images read per batch are read ahead):
    what laplace-torch's fit iterates; `dataset` gives it N."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int):
        self.inputs, self.dataset, self.batch_size = inputs, labels, batch_size

    def __iter__(self):
        for start in range(0, len(self.dataset), self.batch_size):
            yield self.inputs[start:start + self.batch_size], self.dataset[start:start + self.batch_size]


def grid_search(score: Callable[[float], float], lo: float, hi: float, size: int, what: str) -> tuple[float, list]:
    """The value in a log grid (torch.logspace(lo, hi, size)) with the least score. An optimum at an edge of the
    grid is not trusted: the grid moves by its span in that direction (same spacing), with a warning, until
    the optimum lies inside or MAX_WIDENINGS moves are made. Returns it and the range searched."""
    values = torch.logspace(lo, hi, size).tolist()
    scores = [score(v) for v in values]
    span = hi - lo
    for _ in range(MAX_WIDENINGS if size >= 3 else 0):
        best = min(range(len(values)), key=scores.__getitem__)
        if 0 < best < len(values) - 1:
            break
        top = best == len(values) - 1
        lo, hi = (hi + span / (size - 1), hi + span) if top else (lo - span, lo - span / (size - 1))
        new = torch.logspace(lo, hi, size - 1).tolist()
        console.print(f"[yellow]warning:[/] the best {what} lies at the {'top' if top else 'bottom'} of the grid "
                      f"({values[best]:.3g}); searching {new[0]:.3g} .. {new[-1]:.3g} too")
        new_scores = [score(v) for v in new]
        values, scores = (values + new, scores + new_scores) if top else (new + values, new_scores + scores)
    best = min(range(len(values)), key=scores.__getitem__)
    if best in (0, len(values) - 1) and size >= 3:
        console.print(f"[yellow]warning:[/] the best {what} is still at the edge of the searched range "
                      f"({values[best]:.3g}); search further with teacher.laplace.grid_min/grid_max (log10) when "
                      f"training, calibrate.prior_grid when calibrating")
    return values[best], [values[0], values[-1]]


class LaplaceTeacher(Teacher):
    """Predictive of a Laplace posterior around a trained network."""

    kind = Bayes.laplace
    section = "laplace"
    samples_key = "laplace.samples"
    takes_base = True

    def __init__(self, model: nn.Module, cfg: LaplaceConfig, calibration_temperature: float = 1.0,
                 noise_seed: int = 0, batch_size: int = 1024):
        check_hessian_size(model, cfg)
        super().__init__(model.eval(), calibration_temperature, noise_seed, batch_size)
        self.cfg = cfg
        self.searched: list[float] = []  # the prior precisions the last grid search covered
        self.kept_prior = False  # the last grid search found no precision with a lower held-out NLL than the start
        from laplace import Laplace  # imported here: it costs seconds at start-up, and only Laplace teachers need it

        kwargs = {"last_layer_name": HEAD_NAME} if cfg.subset == Subset.last_layer else {}
        self.closed_form_fit = cfg.subset == Subset.last_layer and cfg.hessian == Hessian.kron
        if self.closed_form_fit:  # the same factors as laplace-torch's backend, without a backward pass per class
            from bcpkd_cli.teachers.laplace_fit import LastLayerKron

            kwargs["backend"] = LastLayerKron
        self.la = Laplace(model, "classification", subset_of_weights=cfg.subset.value,
                          hessian_structure=cfg.hessian.value, **kwargs)

    @classmethod
    def needs_heldout(cls, cfg: TeacherConfig) -> bool:
        return cfg.laplace.prior == PriorMethod.gridsearch

    @classmethod
    def train(cls, run: TrainingRun) -> tuple[Teacher, dict]:
        """Cross-entropy training (or teacher.base), then laplace-torch's fit and prior precision."""
        cfg, held = run.recipe.teacher, run.data.heldout
        model = run.network()
        check_hessian_size(model, cfg.laplace)  # before spending any time on training
        history = run.fit_unless_base(model, cross_entropy, teacher_label(cls.kind))
        teacher = cls(model, cfg.laplace, noise_seed=cfg.seed)
        teacher.fit(run.data.train.inputs, run.data.train.labels)
        teacher.tune_prior(cfg.laplace.prior, held.inputs, held.labels)
        history["prior_precision"] = teacher.prior_precision
        return teacher, history

    @classmethod
    def from_checkpoint(cls, payload: dict, cfg: TeacherConfig, device: torch.device) -> Teacher:
        settings = payload["predictive"]
        model = build_model(payload["model"], payload["state_dict"]).to(device).eval()
        teacher = cls(model, cfg.laplace, settings["calibration_temperature"], settings["noise_seed"])
        teacher.load_posterior_state(payload["posterior"])
        return teacher

    def tune(self, cfg: CalibrateConfig, held: Split) -> dict:
        """The prior precision on held-out data (calibrate.prior), unless it is kept."""
        if cfg.prior == PriorTuning.keep:
            return {}
        grid = tuple(cfg.prior_grid) if cfg.prior_grid else None
        self.tune_prior(PriorMethod(cfg.prior.value), held.inputs, held.labels, keep_better=True, grid=grid)
        searched = {"prior_grid": self.searched, "prior_kept": self.kept_prior} \
            if cfg.prior == PriorTuning.gridsearch else {}
        return {"prior_precision": self.prior_precision, "prior_method": cfg.prior.value, **searched}

    def fit(self, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> None:
        """laplace-torch's fit over the training split. Its curvlinops backend (all but last-layer Kron) holds a
        [B, C, C] Hessian of the loss per batch: past 512 classes the batch shrinks to keep it at 2^26 numbers."""
        if not self.closed_form_fit:
            n_classes = getattr(self.model, HEAD_NAME).out_features
            batch_size = max(8, min(batch_size, 2 ** 26 // n_classes ** 2))
        self.la.fit(RowBatches(inputs, labels, batch_size))

    @property
    def prior_precision(self) -> float:
        return float(self.la.prior_precision.reshape(-1)[0])

    def tune_prior(self, method: PriorMethod, heldout_inputs: torch.Tensor | None = None,
                   heldout_labels: torch.Tensor | None = None, keep_better: bool = False,
                   grid: tuple[float, float, float] | None = None) -> None:
        """Scalar prior precision by laplace-torch's marginal likelihood, or by held-out NLL over a log grid (with
        `keep_better`, as calibrate tunes a trained teacher: the precision it had is kept where no grid point has a
        lower held-out NLL). `grid`: (log10 min, log10 max, points), else teacher.laplace's.

        The grid search scores exactly the predictive that gets cached (probit, or MC with
        index-seeded draws), with a plain NLL computed afresh for every grid point (laplace-torch 0.3's
        default grid metric is a running average never reset between points: it favours far too
        large precisions). In closed form the held-out features are computed once for the whole grid.
        """
        if method == PriorMethod.marglik:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.la.optimize_prior_precision(pred_type="glm", method="marglik", prior_structure="scalar",
                                                 link_approx=self.cfg.link.value)
            self.la.prior_precision = torch.as_tensor([self.prior_precision])
            return
        index = torch.arange(len(heldout_labels))
        features = self.penultimate(heldout_inputs) if self.closed_form else None

        def score(prior_precision: float) -> float:
            self.la.prior_precision = torch.tensor([prior_precision])
            try:
                moments = self.moments_from_features(features) if self.closed_form else \
                    self.logit_moments(heldout_inputs)
                return metrics.nll(self.link(*moments, index)(1.0), heldout_labels)
            except torch.linalg.LinAlgError:  # posterior precision not positive definite at this prior
                return math.inf

        start = self.prior_precision
        low, high, size = grid or (self.cfg.grid_min, self.cfg.grid_max, self.cfg.grid_size)
        best, self.searched = grid_search(score, low, high, int(size), "prior precision")
        self.kept_prior = keep_better and score(start) <= score(best)  # then calibration never makes it worse
        self.la.prior_precision = torch.tensor([start if self.kept_prior else best])

    def grid(self) -> torch.Tensor:
        """The configured grid of prior precisions (before any widening)."""
        return torch.logspace(self.cfg.grid_min, self.cfg.grid_max, self.cfg.grid_size)

    @property
    def closed_form(self) -> bool:
        """Last-layer Kron or diagonal posteriors: logit moments from the features (laplace_closed_form)."""
        return self.cfg.subset == Subset.last_layer and self.cfg.hessian in (Hessian.kron, Hessian.diag)

    @torch.no_grad()
    def penultimate(self, inputs: torch.Tensor) -> torch.Tensor:
        """Features phi [N, F] that the head sees, in chunks."""
        self.model.eval()
        inputs = feature_input(self.model, inputs)
        return torch.cat([self.model.features(inputs[i:i + self.batch_size])
                          for i in range(0, len(inputs), self.batch_size)])

    @torch.no_grad()
    def moments_from_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-form GLM logit mean [B, C] and covariance ([B, C, C] for mc, its diagonal [B, C] for probit)."""
        head = self.model.head
        f_mu = head(features)
        full, has_bias = self.cfg.link == Link.mc, head.bias is not None
        if self.cfg.hessian == Hessian.kron:
            cov = kron_logit_covariance(features, self.la.posterior_precision, has_bias, full)
        else:
            cov = diag_logit_covariance(features, self.la.posterior_variance, f_mu.shape[1], has_bias, full)
        return f_mu, cov.to(f_mu.dtype)

    def logit_moments(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GLM logit mean [B, C] and covariance (full [B, C, C] for mc, diagonal [B, C] for probit):
        in closed form where it exists, else from laplace-torch's Jacobians, in chunks."""
        if self.closed_form:
            return self.moments_from_features(self.penultimate(inputs))
        means, covs = [], []
        for i in range(0, len(inputs), self.batch_size):
            f_mu, f_var = self.la._glm_predictive_distribution(inputs[i:i + self.batch_size])
            means.append(f_mu.detach())
            covs.append(f_var.detach() if self.cfg.link == Link.mc else f_var.detach().diagonal(dim1=1, dim2=2))
        return torch.cat(means), torch.cat(covs)

    def predictive_at(self, inputs: torch.Tensor, index: torch.Tensor) -> Callable[[float], torch.Tensor]:
        """Compute the logit moments once; return temperature -> probabilities [B, C] at T_cal * T."""
        return self.link(*self.logit_moments(inputs), index)

    def draws_at(self, inputs: torch.Tensor, index: torch.Tensor) -> Callable[[float], torch.Tensor]:
        """The MC link's S draws [S, B, C] (the probit link draws nothing: its predictive, [1, B, C])."""
        if self.cfg.link == Link.probit:
            return super().draws_at(inputs, index)
        return self.link(*self.logit_moments(inputs), index, each_draw=True)

    def link(self, f_mu: torch.Tensor, f_var: torch.Tensor, index: torch.Tensor,
             each_draw: bool = False) -> Callable[[float], torch.Tensor]:
        """Logit moments -> (temperature -> probabilities [B, C]) through the probit or MC link (`each_draw`: the
        MC link's draws [S, B, C], not their mean)."""
        if self.cfg.link == Link.probit:
            def probit(temperature: float) -> torch.Tensor:
                t = self.calibration_temperature * temperature
                return torch.softmax(f_mu / t / torch.sqrt(1.0 + math.pi / 8.0 * f_var / t**2), dim=1)

            return probit
        # The principal (symmetric) square root: unique and continuous in f_var, so a draw does not
        # depend on how eigh picks eigenvectors of (nearly) equal eigenvalues in a given batch.
        eigvals, eigvecs = torch.linalg.eigh(f_var.double())
        sqrt_cov = (eigvecs * eigvals.clamp_min(0.0).sqrt()[:, None, :]) @ eigvecs.transpose(1, 2)  # [B, C, C]
        n_classes = f_mu.shape[1]
        eps = index_normal(self.noise_seed, index.cpu(), self.cfg.samples * n_classes)
        eps = eps.view(len(index), self.cfg.samples, n_classes).to(f_mu.device)  # [B, S, C]
        samples = f_mu.double()[:, None, :] + eps @ sqrt_cov.transpose(1, 2)  # [B, S, C]

        def monte_carlo(temperature: float) -> torch.Tensor:
            t = self.calibration_temperature * temperature
            draws = torch.softmax(samples / t, dim=2)  # [B, S, C]
            return draws.transpose(0, 1).to(f_mu.dtype) if each_draw else draws.mean(dim=1).to(f_mu.dtype)

        return monte_carlo

    def deployable(self, draws: int = 0) -> Deployed:
        """The last-layer probit predictive itself (any Hessian structure), with the predicted class's logit variance;
        otherwise the MAP network, and says so."""
        check_draws(draws, self.kind, takes_draws=False)
        t, cfg = self.calibration_temperature, self.cfg
        if cfg.subset == Subset.last_layer and cfg.link == Link.probit:
            n_classes, has_bias = self.model.head.out_features, self.model.head.bias is not None
            with torch.no_grad():
                if cfg.hessian == Hessian.kron:
                    variance = KronVariance(self.la.posterior_precision, n_classes, has_bias)
                elif cfg.hessian == Hessian.diag:
                    variance = DiagVariance(self.la.posterior_variance, n_classes, has_bias)
                else:
                    variance = FullVariance(self.la.posterior_covariance, n_classes, has_bias)
            return Deployed(LastLayerProbit(self.model, variance, t), f"probit of the last-layer {cfg.hessian.value} "
                            f"Laplace posterior (prior precision {self.prior_precision:.4g}), T_cal {t:.3f}",
                            exact=True, epistemic="logit_variance")
        subset = "last-layer" if cfg.subset == Subset.last_layer else "all-weights"
        return Deployed(Tempered(self.model, t), f"MAP network, softmax(logits / T_cal), T_cal {t:.3f}: the {subset} "
                        f"{cfg.hessian.value} Laplace predictive ({cfg.link.value} link) has no closed form in one "
                        f"graph", exact=False, epistemic=None)

    def posterior_state(self) -> dict:
        return _plain_state(self.la.state_dict())

    def load_posterior_state(self, state: dict) -> None:
        device = next(self.model.parameters()).device
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.la.load_state_dict(_to_device(dict(state), device))

    def predictive_settings(self) -> dict:
        return {"calibration_temperature": self.calibration_temperature, "noise_seed": self.noise_seed,
                "prior_precision": self.prior_precision}
