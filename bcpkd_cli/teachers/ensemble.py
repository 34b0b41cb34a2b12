"""Deep ensemble (kind `ensemble`): M networks of one architecture, their softmax outputs averaged.

The members are trained with seeds seed, seed+1, ..., or assembled from existing single-network
teacher.pt files (`teacher.ensemble.checkpoints`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bcpkd_cli import artifacts
from bcpkd_cli.choices import Bayes
from bcpkd_cli.config import TeacherConfig
from bcpkd_cli.console import console
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.models import build_model
from bcpkd_cli.teachers.base import Teacher
from bcpkd_cli.teachers.deployed import Averaged, Deployed, check_draws
from bcpkd_cli.teachers.sampled import SampledTeacher
from bcpkd_cli.teachers.training import TrainingRun, cross_entropy, load_single_network


class EnsembleTeacher(SampledTeacher):
    """`members[0]` is the checkpoint's main network; the others are its posterior state."""

    kind = Bayes.ensemble
    section = "ensemble"
    assembles = True

    def __init__(self, members: list[nn.Module], calibration_temperature: float = 1.0, batch_size: int = 1024):
        super().__init__(members[0], calibration_temperature, 0, batch_size)
        self.members = [m.eval() for m in members]

    @classmethod
    def problems(cls, cfg: TeacherConfig) -> list[str]:
        errors = super().problems(cfg)
        if cfg.ensemble.checkpoints and len(cfg.ensemble.checkpoints) < 2:
            errors.append("teacher.ensemble.checkpoints: an ensemble needs at least 2 teacher.pt files")
        if cfg.init:
            errors.append("teacher.init: ensemble members from one set of weights would be one network; assemble "
                          "trained teachers with --member a.pt --member b.pt instead")
        return errors

    @classmethod
    def starting_points(cls, cfg: TeacherConfig, data_fingerprint: str) -> list[dict]:
        """The payloads of the teachers named by teacher.ensemble.checkpoints; all of one architecture."""
        kinds = (Bayes.none, Bayes.mse, Bayes.mcmi)  # the single-network kinds
        payloads = [load_single_network(p, "teacher.ensemble.checkpoints:", data_fingerprint, kinds)
                    for p in cfg.ensemble.checkpoints]
        for path, payload in zip(cfg.ensemble.checkpoints, payloads):
            if payload["predictive"]["calibration_temperature"] != 1.0:
                console.print(f"[yellow]warning:[/] {path} carries a calibration temperature; the ensemble averages "
                              f"its network's softmax at T = 1 (calibrate the ensemble instead)")
            if payload["model"] != payloads[0]["model"]:
                raise BcpkdError(f"teacher.ensemble.checkpoints: {path} is a {payload['model']['arch']} network "
                                 f"unlike {cfg.ensemble.checkpoints[0]} ({payloads[0]['model']['arch']}); members "
                                 f"must share one architecture")
        return payloads

    @classmethod
    def train(cls, run: TrainingRun) -> tuple[Teacher, dict]:
        cfg = run.recipe.teacher
        if run.starts:
            networks = [build_model(p["model"], p["state_dict"]).to(run.device) for p in run.starts]
            return cls(networks), {"members_sha256": [artifacts.sha256_file(Path(p)) for p in cfg.ensemble.checkpoints]}
        networks, seconds = [], []
        for m in range(cfg.ensemble.members):
            member = run.network(seed=cfg.seed + m)
            seconds.append(run.fit(member, cross_entropy, f"member{m + 1}",
                                   f"ensemble member {m + 1}/{cfg.ensemble.members}", seed=cfg.seed + m)["seconds"])
            networks.append(member)
        return cls(networks), {"seconds": round(sum(seconds), 2), "member_seconds": seconds}

    @classmethod
    def from_checkpoint(cls, payload: dict, cfg: TeacherConfig, device: torch.device) -> Teacher:
        members = [build_model(payload["model"], state).to(device)
                   for state in (payload["state_dict"], *payload["posterior"]["members"])]
        return cls(members, payload["predictive"]["calibration_temperature"])

    def sample_logits(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(inputs) for member in self.members])  # [M, B, C]

    def deployable(self, draws: int = 0) -> Deployed:
        """Every member in one module: the predictive itself, with the members' mutual information."""
        check_draws(draws, self.kind, takes_draws=False)
        t = self.calibration_temperature
        return Deployed(Averaged(self.members, t), f"mean of the {len(self.members)} members' softmax(logits / T_cal), "
                        f"T_cal {t:.3f}", exact=True, epistemic="mutual_information")

    def posterior_state(self) -> dict:
        return {"members": [member.state_dict() for member in self.members[1:]]}

    def predictive_settings(self) -> dict:
        return {"calibration_temperature": self.calibration_temperature, "members": len(self.members)}
