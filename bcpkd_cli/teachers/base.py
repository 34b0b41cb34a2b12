"""What every teacher kind has, and what each kind adds.

Every kind has a network (`model`), a calibration temperature T_cal and one way to predict:
`predictive_at(inputs, index)` runs the networks once and returns temperature -> probabilities, and
`predict_probs` is that at one temperature. Each kind adds, as class attributes and methods:

- how it trains, or fits after training (`train`), from a `TrainingRun` that the stage prepares;
- how it is rebuilt from a checkpoint (`from_checkpoint`) and what it stores there
  (`posterior_state`, `predictive_settings`);
- how its options are validated (`problems`) and which config section enters the cache key (`section`);
- what `calibrate` tunes besides a temperature (`tune`, e.g. Laplace's prior precision);
- its predictive as one deployable graph (`deployable`, teachers/deployed.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import torch
from torch import nn

from bcpkd_cli.choices import Bayes
from bcpkd_cli.config import CalibrateConfig, TeacherConfig, to_plain
from bcpkd_cli.data import Split
from bcpkd_cli.teachers.deployed import Deployed
from bcpkd_cli.teachers.training import TrainingRun, load_single_network


class Teacher(ABC):
    """A teacher's predictive: inputs [B, ...] and example indices [B] -> probabilities [B, C]."""

    kind: ClassVar[Bayes]
    section: ClassVar[str | None] = None  # the kind's own TeacherConfig section (cache provenance), if any
    samples_key: ClassVar[str | None] = None  # the TeacherConfig key that `--samples` sets, if the kind samples
    takes_base: ClassVar[bool] = False  # fits around an existing deterministic teacher.pt (`teacher.base`)
    assembles: ClassVar[bool] = False  # is assembled from existing teacher.pt files (teacher.ensemble.checkpoints)

    def __init__(self, model: nn.Module, calibration_temperature: float = 1.0, noise_seed: int = 0,
                 batch_size: int = 1024):
        self.model = model
        self.calibration_temperature = calibration_temperature
        self.noise_seed = noise_seed
        self.batch_size = batch_size

    # ------------------------------------------------------------------ what each kind adds

    @classmethod
    def problems(cls, cfg: TeacherConfig) -> list[str]:
        """The kind's rules on the teacher section (one message each); the base class checks teacher.base
        and teacher.ensemble.checkpoints, which only some kinds take."""
        errors = []
        if cfg.base and not cls.takes_base:
            errors.append(f"teacher.base: a {cls.kind.value} teacher is trained from scratch; base works with "
                          f"bayes laplace, vi, mcmi or temperature")
        if cfg.base and cfg.init:
            errors.append("teacher.init: a teacher starts from teacher.base or from teacher.init, not both")
        if cfg.ensemble.checkpoints and not cls.assembles:
            errors.append(f"teacher.ensemble.checkpoints (--member): only a --bayes ensemble teacher is assembled "
                          f"from checkpoints, not a {cls.kind.value} one")
        return errors

    @classmethod
    def starting_points(cls, cfg: TeacherConfig, data_fingerprint: str) -> list[dict]:
        """The payloads of the existing teacher.pt files the kind starts from: teacher.base (a deterministic
        teacher) when given; the stored config then describes their network."""
        if not cfg.base:
            return []
        return [load_single_network(cfg.base, "teacher.base", data_fingerprint, (Bayes.none,))]

    @classmethod
    def needs_heldout(cls, cfg: TeacherConfig) -> bool:
        """Whether training tunes something on held-out data (then data.n_heldout must not be 0)."""
        return False

    @classmethod
    def dropout(cls, cfg: TeacherConfig) -> float:
        """Dropout rate the network is built with (0: none)."""
        return 0.0

    @classmethod
    @abstractmethod
    def train(cls, run: TrainingRun) -> tuple[Teacher, dict]:
        """Train (or take `run.base`) and fit; the teacher and its history (plain values)."""

    @classmethod
    @abstractmethod
    def from_checkpoint(cls, payload: dict, cfg: TeacherConfig, device: torch.device) -> Teacher:
        """Rebuild the predictive a checkpoint payload describes."""

    @abstractmethod
    def predictive_at(self, inputs: torch.Tensor, index: torch.Tensor) -> Callable[[float], torch.Tensor]:
        """Run the network(s) once on inputs [B, ...]; return temperature T -> probabilities [B, C] at T_cal * T."""

    def draws_at(self, inputs: torch.Tensor, index: torch.Tensor) -> Callable[[float], torch.Tensor]:
        """Run the network(s) once; return temperature -> the probabilities of each Monte Carlo draw [S, B, C]
        (the predictive averages them; one draw, the predictive itself, for kinds that draw nothing)."""
        predictive = self.predictive_at(inputs, index)
        return lambda temperature: predictive(temperature)[None]

    @abstractmethod
    def deployable(self, draws: int = 0) -> Deployed:
        """The predictive at T=1 as one traceable module, or what comes closest (says which); `draws` K > 0: a
        sampling kind's K fixed seeded draws (vi, mc-dropout; other kinds refuse it)."""

    def tune(self, cfg: CalibrateConfig, held: Split) -> dict:
        """Tune the kind's own predictive settings on held-out data, in place; what was tuned."""
        return {}

    def posterior_state(self) -> dict | None:
        return None

    def predictive_settings(self) -> dict:
        return {"calibration_temperature": self.calibration_temperature}

    # ------------------------------------------------------------------ what every kind has

    def predict_probs(self, inputs: torch.Tensor, index: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """inputs [B, ...], example indices [B] -> probabilities [B, C] at T_cal * temperature."""
        return self.predictive_at(inputs, index)(temperature)

    @classmethod
    def method_settings(cls, cfg: TeacherConfig) -> dict:
        """The kind's own section of the teacher config (cache provenance)."""
        return to_plain(getattr(cfg, cls.section)) if cls.section else {}
