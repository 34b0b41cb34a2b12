"""Teachers behind one interface: `predict_probs(inputs [B, ...], index [B], temperature) -> [B, C]`.

Kinds (`Bayes`): none, temperature, mse and mcmi are one network (they differ in how it was
trained or calibrated); laplace is a Laplace posterior; vi, mc-dropout and ensemble average S
networks. A teacher checkpoint holds the network, the posterior state of Bayesian kinds and the
predictive settings (link, samples, calibration temperature, noise seed), so another process
rebuilds the same predictive exactly.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from bcpkd_cli.artifacts import TEACHER_FORMAT, VERSION
from bcpkd_cli.config import Bayes, TeacherConfig, build_recipe, to_plain
from bcpkd_cli.models import build_model
from bcpkd_cli.teachers.deterministic import DeterministicTeacher
from bcpkd_cli.teachers.ensemble import EnsembleTeacher
from bcpkd_cli.teachers.laplace import LaplaceTeacher
from bcpkd_cli.teachers.mc_dropout import MCDropoutTeacher
from bcpkd_cli.teachers.vi import VITeacher, to_bayesian


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
    bayes = Bayes(payload["bayes"])
    settings = payload["predictive"]
    t_cal = settings["calibration_temperature"]
    cfg = build_recipe(payload["config"], "checkpoint config").teacher
    if bayes == Bayes.vi:
        model = to_bayesian(build_model(payload["model"]), cfg.vi, from_base=False)
        model.load_state_dict(payload["state_dict"])
        return VITeacher(model.to(device), payload["model"], settings["samples"], t_cal, settings["noise_seed"])
    model = build_model(payload["model"], payload["state_dict"]).to(device).eval()
    if bayes == Bayes.laplace:
        teacher = LaplaceTeacher(model, cfg.laplace, t_cal, settings["noise_seed"])
        teacher.load_posterior_state(payload["posterior"])
        return teacher
    if bayes == Bayes.mc_dropout:
        return MCDropoutTeacher(model, settings["samples"], t_cal, settings["noise_seed"])
    if bayes == Bayes.ensemble:
        others = [build_model(payload["model"], state).to(device) for state in payload["posterior"]["members"]]
        return EnsembleTeacher([model, *others], t_cal)
    return DeterministicTeacher(model, t_cal)


def method_settings(teacher_cfg: TeacherConfig) -> dict:
    """The kind's own section of the teacher config (cache provenance)."""
    section = {Bayes.laplace: teacher_cfg.laplace, Bayes.vi: teacher_cfg.vi, Bayes.mc_dropout: teacher_cfg.mc_dropout,
               Bayes.ensemble: teacher_cfg.ensemble, Bayes.mcmi: teacher_cfg.mcmi}.get(teacher_cfg.bayes)
    return to_plain(section) if section is not None else {}
