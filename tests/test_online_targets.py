"""`distill --targets online` runs the calibrated teacher on every batch: it calibrates (or finds the calibration)
and builds no cache, and the student records which calibrated teacher it learned from."""

from __future__ import annotations

from pathlib import Path

import torch

from cli_helpers import here

SMALL = ["--set", "data.n_train=300", "--set", "data.n_heldout=200", "--set", "data.n_test=200"]


def test_online_targets_calibrate_without_building_a_cache(tmp_path):
    here("train-teacher", "--bayes", "laplace", "--epochs", "1", *SMALL, "--out", "t", cwd=tmp_path)
    here("distill", "--teacher", "t/teacher.pt", "--targets", "online", "--epochs", "1", "--out", "s", cwd=tmp_path)
    assert not list((tmp_path / "t").rglob("bcp.safetensors"))  # nothing cached
    calibrated = list((tmp_path / "t/bcp").glob("*/teacher.pt"))
    assert len(calibrated) == 1 and (calibrated[0].parent / "report.json").is_file()
    targets = torch.load(tmp_path / "s/student.pt", weights_only=True)["targets"]
    assert targets["kind"] == "online" and Path(targets["calibrated_teacher"]) == calibrated[0].resolve()
    assert "prior_precision" in targets["calibration"] and "cache" not in targets
    before = calibrated[0].stat().st_mtime_ns
    here("distill", "--teacher", "t/teacher.pt", "--targets", "online", "--epochs", "1", "--out", "s2", cwd=tmp_path)
    assert calibrated[0].stat().st_mtime_ns == before  # the calibration is found, not done again
    here("distill", "--teacher", "t/teacher.pt", "--epochs", "1", "--out", "s3", cwd=tmp_path)  # cached targets
    assert len(list((tmp_path / "t").rglob("bcp.safetensors"))) == 1
