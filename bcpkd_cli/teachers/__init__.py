"""Teachers behind one interface (`Teacher`, teachers/base.py), one kind per module, and the one mapping
from the `Bayes` enum to the kind's class.

A teacher checkpoint holds the network, the posterior state of Bayesian kinds and the predictive
settings (link, samples, calibration temperature, noise seed), so another process rebuilds the
same predictive exactly.
"""

from __future__ import annotations

import torch

from bcpkd_cli.artifacts import TEACHER_FORMAT, VERSION
from bcpkd_cli.choices import Bayes
from bcpkd_cli.config import Recipe, build_recipe
from bcpkd_cli.teachers.base import Teacher
from bcpkd_cli.teachers.deterministic import DeterministicTeacher
from bcpkd_cli.teachers.ensemble import EnsembleTeacher
from bcpkd_cli.teachers.laplace import LaplaceTeacher
from bcpkd_cli.teachers.mc_dropout import MCDropoutTeacher
from bcpkd_cli.teachers.mcmi import MCMITeacher
from bcpkd_cli.teachers.mse import MSETeacher
from bcpkd_cli.teachers.temperature import TemperatureTeacher
from bcpkd_cli.teachers.vi import VITeacher

TEACHER_KINDS: dict[Bayes, type[Teacher]] = {
    Bayes.none: DeterministicTeacher,
    Bayes.laplace: LaplaceTeacher,
    Bayes.vi: VITeacher,
    Bayes.mc_dropout: MCDropoutTeacher,
    Bayes.ensemble: EnsembleTeacher,
    Bayes.temperature: TemperatureTeacher,
    Bayes.mse: MSETeacher,
    Bayes.mcmi: MCMITeacher,
}


def recipe_problems(recipe: Recipe) -> list[str]:
    """The teacher kind's own rules on the recipe (a `build_recipe` check)."""
    return TEACHER_KINDS[recipe.teacher.bayes].problems(recipe.teacher)


def teacher_payload(teacher: Teacher, model_spec: dict, config: dict, data_info: dict, parent_sha256: str | None,
                    history: dict) -> dict:
    """Everything a checkpoint needs to rebuild this teacher's predictive (plain values and tensors)."""
    return {
        "format": TEACHER_FORMAT, "version": VERSION, "bayes": teacher.kind.value, "model": model_spec,
        "state_dict": teacher.model.state_dict(), "posterior": teacher.posterior_state(),
        "predictive": teacher.predictive_settings(), "config": config, "data": data_info,
        "parent_sha256": parent_sha256, "history": history,
    }


def load_teacher(payload: dict, device: torch.device) -> Teacher:
    """Rebuild a teacher from a loaded checkpoint payload."""
    cfg = build_recipe(payload["config"], "checkpoint config").teacher
    return TEACHER_KINDS[Bayes(payload["bayes"])].from_checkpoint(payload, cfg, device)
