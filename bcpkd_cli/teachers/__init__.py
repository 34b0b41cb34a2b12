"""Teachers behind one interface: `predict_probs(inputs [B, ...], index [B], temperature) -> [B, C]`.

A teacher checkpoint holds the network, the posterior state of Bayesian kinds and the predictive
settings (link, samples, calibration temperature, noise seed), so another process rebuilds the
same predictive exactly.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from bcpkd_cli.artifacts import TEACHER_FORMAT, VERSION
from bcpkd_cli.config import Bayes, LaplaceConfig, build_recipe
from bcpkd_cli.models import build_model
from bcpkd_cli.teachers.deterministic import DeterministicTeacher
from bcpkd_cli.teachers.laplace import LaplaceTeacher


class Teacher(Protocol):
    calibration_temperature: float

    def predictive_at(self, inputs: torch.Tensor, index: torch.Tensor) -> Callable[[float], torch.Tensor]: ...

    def predict_probs(self, inputs: torch.Tensor, index: torch.Tensor, temperature: float = 1.0) -> torch.Tensor: ...

    def posterior_state(self) -> dict | None: ...

    def predictive_settings(self) -> dict: ...


def teacher_payload(teacher: Teacher, bayes: Bayes, model_spec: dict, config: dict, data_info: dict,
                    parent_sha256: str | None, history: dict) -> dict:
    """Everything a checkpoint needs to rebuild this teacher's predictive (plain values and tensors)."""
    return {
        "format": TEACHER_FORMAT, "version": VERSION, "bayes": bayes.value, "model": model_spec,
        "state_dict": teacher.model.state_dict(), "posterior": teacher.posterior_state(),
        "predictive": teacher.predictive_settings(), "config": config, "data": data_info,
        "parent_sha256": parent_sha256, "history": history,
    }


def load_teacher(payload: dict, device: torch.device) -> Teacher:
    """Rebuild a teacher from a loaded checkpoint payload."""
    model = build_model(payload["model"], payload["state_dict"]).to(device).eval()
    settings = payload["predictive"]
    if payload["bayes"] == Bayes.none.value:
        return DeterministicTeacher(model, settings["calibration_temperature"])
    laplace_cfg: LaplaceConfig = build_recipe(payload["config"], "checkpoint config").teacher.laplace
    teacher = LaplaceTeacher(model, laplace_cfg, settings["calibration_temperature"], settings["noise_seed"])
    teacher.load_posterior_state(payload["posterior"])
    return teacher
