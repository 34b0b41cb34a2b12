"""Mean-field Gaussian variational inference through bayesian-torch's network conversion.

bayesian-torch (Intel Labs) turns every Linear and Conv layer of a network into a reparameterised
Gaussian layer (`dnn_to_bnn`), so every architecture of the zoo becomes a VI network without
hand-written layers; the KL term of the ELBO is summed here over every weight. Training uses the
library's layers (a new weight sample per forward pass). The predictive draws weight sample s once,
mu + softplus(rho) * eps with eps from a generator seeded by (noise seed, s), and runs it as plain
weights of the deterministic twin network over all chunks: every example, batch layout, process
and device sees the same S weight samples, and a sample costs one deterministic pass. So the predictive
deploys as one graph of S twins (--draws S); the mean network holds the posterior means.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bcpkd_cli.choices import Bayes
from bcpkd_cli.config import TeacherConfig, VIConfig
from bcpkd_cli.engine import prepare_for_device
from bcpkd_cli.models import build_model
from bcpkd_cli.teachers.base import Teacher
from bcpkd_cli.teachers.deployed import Averaged, Deployed, Tempered, check_draws
from bcpkd_cli.teachers.index_noise import hash32
from bcpkd_cli.teachers.sampled import SampledTeacher
from bcpkd_cli.teachers.training import TrainingRun, cross_entropy


def to_bayesian(model: nn.Module, cfg: VIConfig, from_base: bool) -> nn.Module:
    """Convert in place. Posterior means start at the network's weights (its initialisation, or a trained
    base); sigma starts at log(1 + exp(rho_init)), or at moped_delta * |w| around a trained base (MOPED)."""
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn  # imported here: only VI teachers need it

    dnn_to_bnn(model, {"prior_mu": 0.0, "prior_sigma": cfg.prior_sigma, "posterior_mu_init": 0.0,
                       "posterior_rho_init": cfg.posterior_rho_init, "type": "Reparameterization",
                       "moped_enable": True, "moped_delta": cfg.moped_delta})
    if not from_base:
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("rho_"):
                param.data.fill_(cfg.posterior_rho_init)
    return model


_GAUSSIANS = (("mu_weight", "rho_weight", "prior_weight_mu", "prior_weight_sigma"),  # Linear
              ("mu_kernel", "rho_kernel", "prior_weight_mu", "prior_weight_sigma"),  # Conv
              ("mu_bias", "rho_bias", "prior_bias_mu", "prior_bias_sigma"))


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """KL(q(w) || p(w)) summed over every weight of every variational layer (a scalar).

    Computed here from the layers' parameters: bayesian-torch 0.5's `get_kl_loss` sums each layer's
    *mean* KL per weight, which under-weights the KL term of the ELBO by the layer sizes."""
    terms = []
    for layer in model.modules():
        for mu_name, rho_name, prior_mu_name, prior_sigma_name in _GAUSSIANS:
            mu = getattr(layer, mu_name, None)
            if not isinstance(mu, nn.Parameter):
                continue
            sigma = F.softplus(getattr(layer, rho_name))
            prior_mu, prior_sigma = getattr(layer, prior_mu_name), getattr(layer, prior_sigma_name)
            kl = torch.log(prior_sigma / sigma) + (sigma**2 + (mu - prior_mu) ** 2) / (2 * prior_sigma**2) - 0.5
            terms.append(kl.sum())
    return torch.stack(terms).sum()


def kl_weight(epoch: int, cfg: VIConfig) -> float:
    """0 during the maximum-likelihood epochs, then rising linearly to 1 over `anneal_epochs`."""
    if epoch < cfg.ml_epochs:
        return 0.0
    return min(1.0, (epoch - cfg.ml_epochs + 1) / (cfg.anneal_epochs + 1))


def draw_seed(noise_seed: int, draw: int) -> int:
    return int(hash32(torch.tensor([(noise_seed * 0x9E3779B9 + draw) & 0xFFFFFFFF]))[0])


_DETERMINISTIC_NAME = {"weight": "weight", "kernel": "weight", "bias": "bias"}  # mu_<x> -> the twin's <name>


def sample_weights(model: nn.Module, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """One posterior draw of every parameter, named as in the deterministic network; eps is drawn from
    the (CPU) `generator` in parameter order and moved to the parameter's device (None: the posterior means)."""
    params = dict(model.named_parameters())
    draw = {}
    for name, param in params.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf.startswith("mu_"):
            name = f"{prefix}.{_DETERMINISTIC_NAME[leaf[3:]]}"
            if generator is None:
                draw[name] = param
                continue
            sigma = F.softplus(params[f"{prefix}.rho_{leaf[3:]}"])
            eps = torch.randn(param.shape, generator=generator, dtype=param.dtype).to(param.device)
            draw[name] = param + sigma * eps
        elif not leaf.startswith("rho_"):
            draw[name] = param  # BatchNorm and other deterministic parameters
    return draw


def network_with(twin: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the deterministic twin holding `weights` (parameters and buffers by name; the rest its own)."""
    network = copy.deepcopy(twin).eval()
    with torch.no_grad():
        for name, tensor in [*network.named_parameters(), *network.named_buffers()]:
            if name in weights:
                tensor.copy_(weights[name])
    return network


class VITeacher(SampledTeacher):
    """Average of S weight samples of a variational posterior, each run as a plain network."""

    kind = Bayes.vi
    section = "vi"
    samples_key = "vi.samples"
    takes_base = True

    def __init__(self, model: nn.Module, spec: dict, samples: int, calibration_temperature: float = 1.0,
                 noise_seed: int = 0, batch_size: int = 1024):
        super().__init__(model, calibration_temperature, noise_seed, batch_size)
        self.samples = samples
        device = next(model.parameters()).device
        self.twin = build_model(spec).to(device).eval()
        twin_buffers = dict(self.twin.named_buffers())
        self.buffers = {name: b for name, b in model.named_buffers() if name in twin_buffers}  # BatchNorm statistics

        self._draws: list[dict[str, torch.Tensor]] | None = None

    @classmethod
    def problems(cls, cfg: TeacherConfig) -> list[str]:
        errors = super().problems(cfg)
        if cfg.arch.startswith("hf:"):
            errors.append(f"--bayes vi: {cfg.arch} is a transformer, and this VI makes every weight of the network "
                          f"Gaussian (bayesian-torch's layer conversion), which doubles its parameters and does not "
                          f"reach the attention projections inside it; use --bayes laplace (last layer), mc-dropout "
                          f"or ensemble")
        if cfg.epochs <= cfg.vi.ml_epochs:
            errors.append(f"teacher.vi.ml_epochs: {cfg.vi.ml_epochs} maximum-likelihood epochs leave no epoch of "
                          f"the {cfg.epochs} for the KL term; lower it or raise teacher.epochs")
        return errors

    @classmethod
    def train(cls, run: TrainingRun) -> tuple[Teacher, dict]:
        """Cross-entropy + beta(epoch) * KL(q || p) / N: beta is 0 for vi.ml_epochs, then rises linearly to 1."""
        cfg, n_train = run.recipe.teacher, len(run.data.train)
        trained = run.base is not None or run.init is not None  # posterior means start at trained weights (MOPED)
        model = to_bayesian(run.network(), cfg.vi, from_base=trained)
        model = prepare_for_device(model, run.device, run.recipe.precision)

        def penalty(epoch: int):
            weight = kl_weight(epoch, cfg.vi)
            return weight * kl_divergence(model) / n_train if weight else 0.0  # no KL work in the ML epochs

        history = run.fit(model, cross_entropy, "vi", "vi teacher", penalty=penalty)
        return cls(model, run.spec, cfg.vi.samples, noise_seed=cfg.seed), history

    @classmethod
    def from_checkpoint(cls, payload: dict, cfg: TeacherConfig, device: torch.device) -> Teacher:
        settings = payload["predictive"]
        model = to_bayesian(build_model(payload["model"]), cfg.vi, from_base=False)
        model.load_state_dict(payload["state_dict"])
        return cls(model.to(device), payload["model"], settings["samples"], settings["calibration_temperature"],
                   settings["noise_seed"])

    def draws(self) -> list[dict[str, torch.Tensor]]:
        """The S weight samples, drawn on first use and kept (like an ensemble's S members), so that an online
        teacher does not redraw them for every batch. Their noise comes from CPU generators seeded by
        (noise seed, s): the same samples on every device."""
        if self._draws is None:
            self._draws = self.weight_samples(self.samples)
        return self._draws

    @torch.no_grad()
    def weight_samples(self, count: int) -> list[dict[str, torch.Tensor]]:
        """The first `count` weight samples (sample s from a CPU generator seeded by (noise seed, s)), with the
        network's buffers."""
        generators = [torch.Generator().manual_seed(draw_seed(self.noise_seed, s)) for s in range(count)]
        return [{**sample_weights(self.model, g), **self.buffers} for g in generators]

    def all_logits(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.cat([functional_call(self.twin, weights, (inputs[i:i + self.batch_size],))
                                       for i in range(0, len(inputs), self.batch_size)])
                            for weights in self.draws()])  # [S, B, C]

    def deployable(self, draws: int = 0) -> Deployed:
        """The mean network (the posterior means as weights; draws 0), or the teacher's first K weight samples as K
        twins: its own predictive when K is its sample count S."""
        check_draws(draws, self.kind, takes_draws=True)
        t = self.calibration_temperature
        if not draws:
            with torch.no_grad():
                mean = network_with(self.twin, {**sample_weights(self.model, None), **self.buffers})
            return Deployed(Tempered(mean, t), f"mean network (posterior means as weights), softmax(logits / T_cal), "
                            f"T_cal {t:.3f}: the {self.samples}-sample average is not exported; --draws K exports K "
                            f"fixed seeded weight samples", exact=False, epistemic=None)
        networks = [network_with(self.twin, weights) for weights in self.weight_samples(draws)]
        exact = draws == self.samples
        whose = "the teacher's own predictive" if exact else f"the teacher averages {self.samples}"
        return Deployed(Averaged(networks, t), f"{draws} fixed seeded weight samples ({whose}), mean of "
                        f"softmax(logits / T_cal), T_cal {t:.3f}", exact=exact, epistemic="mutual_information")

    def predictive_settings(self) -> dict:
        return {**super().predictive_settings(), "samples": self.samples}
