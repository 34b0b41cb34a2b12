"""The real CLI in subprocesses, chained the way a shell script chains it, on tiny synthetic data.

The chain, a missing teacher, Ctrl-C and concurrent jobs run as real processes (exit code, stdout, stderr, signals,
two jobs at once); the other refusals and runs call the same CLI in this process (`cli`: cli_helpers.here_run), which
saves an interpreter and its imports (torch, laplace: 5-10 s of CPU) per call and checks the same exit code and
streams."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bcpkd_cli import artifacts
from cli_helpers import bcpkd, default_sigint, files_under, here_run as cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]  # tiny MLPs: one thread, here and in jobs

TINY = ["--set", "data.n_train=400", "--set", "data.n_heldout=150", "--set", "data.n_test=200",
        "--set", "teacher.hidden=[32]", "--set", "teacher.epochs=3", "--set", "distill.hidden=[16]",
        "--set", "distill.epochs=1", "--set", "distill.batch_size=16", "--set", "distill.log_every=5",
        "--set", "teacher.laplace.grid_size=5", "--device", "cpu"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """train-teacher -> calibrate -> distill -> evaluate, each stage reading the previous one's stdout."""
    work = tmp_path_factory.mktemp("chain")
    teacher = bcpkd("train-teacher", "--bayes", "laplace", "--out", "t", *TINY, cwd=work).stdout.strip()
    calibrate = bcpkd("calibrate", "--teacher", teacher, "--temperature", "fit", *TINY, cwd=work)
    cache = calibrate.stdout.strip()
    student = bcpkd("distill", "--teacher", teacher, "--temperature", "fit", "--out", "s", *TINY,
                    cwd=work).stdout.strip()
    report = bcpkd("evaluate", student, teacher, "--json", "--grad-targets", "onehot,true", *TINY, cwd=work)
    return {"work": work, "teacher": work / teacher, "cache": work / cache, "student": work / student,
            "calibrate": calibrate, "report": json.loads(report.stdout)}


def test_stdout_carries_only_the_artifact_path(chain):
    assert chain["teacher"] == chain["work"] / "t" / "teacher.pt" and chain["teacher"].is_file()
    assert chain["student"] == chain["work"] / "s" / "student.pt" and chain["student"].is_file()
    assert chain["cache"].name == "bcp.safetensors" and chain["cache"].parent.parent.name == "bcp"
    assert chain["calibrate"].stdout.count("\n") == 1
    assert "held-out calibration" in chain["calibrate"].stderr


def test_cache_provenance_and_reuse(chain):
    probs, meta = artifacts.load_cache(chain["cache"], {})
    assert probs.shape == (400, 1, 5)
    assert meta["teacher_sha256"] == artifacts.sha256_file(chain["teacher"])
    assert meta["split"] == "train" and meta["bayes"] == "laplace"
    assert meta["calibrate"]["temperature"] == "fit" and meta["predictive"]["calibration_temperature"] > 0
    student = torch.load(chain["student"], weights_only=True)
    assert student["targets"]["cache"] == str(chain["cache"]) and chain["cache"].is_absolute()
    assert student["targets"]["cache_sha256"] == artifacts.sha256_file(chain["cache"])
    calibrated = torch.load(chain["cache"].parent / "teacher.pt", weights_only=True)
    assert calibrated["parent_sha256"] == meta["teacher_sha256"]


def test_student_log_and_config(chain):
    student = torch.load(chain["student"], weights_only=True)
    steps = [entry["step"] for entry in student["log"]]
    assert steps == list(range(0, 25, 5)) + [25]  # 400 / 16 = 25 steps, logged every 5 and at the end
    assert student["config"]["distill"]["hidden"] == [16]
    assert (chain["student"].parent / "metrics.jsonl").read_text().count("\n") == len(steps)


def test_evaluate_json(chain):
    student, teacher = chain["report"]
    student_report, teacher_report = student["metrics"], teacher["metrics"]
    for key in ("accuracy", "nll", "ece", "brier", "kl_to_bcp", "tv_to_bcp"):
        assert 0.0 <= student_report[key] and 0.0 <= teacher_report[key]
    assert student["kind"] == "student" and teacher["kind"] == "teacher"
    assert student_report["grad_noise_onehot"] > student_report["grad_noise_true"] > 0
    assert student_report["convergence_noise_nll"] >= 0


def test_same_command_reuses_the_cache(chain):
    again = cli("calibrate", "--teacher", str(chain["teacher"]), "--temperature", "fit", *TINY, cwd=chain["work"])
    assert Path(chain["work"] / again.stdout.strip()) == chain["cache"]
    assert "already exists" in again.stderr


def _assert_bad_input(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0]
    assert result.stdout == ""


def test_missing_teacher(tmp_path):
    _assert_bad_input(bcpkd("distill", "--teacher", "nope/teacher.pt", *TINY, cwd=tmp_path, check=False),
                      "nope/teacher.pt", "bcpkd train-teacher")
    assert files_under(tmp_path) == set()


def test_corrupt_and_foreign_files(tmp_path, chain):
    (tmp_path / "corrupt.pt").write_bytes(chain["teacher"].read_bytes()[:500])
    _assert_bad_input(cli("calibrate", "--teacher", "corrupt.pt", *TINY, cwd=tmp_path, check=False), "corrupt.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    _assert_bad_input(cli("evaluate", "notes.txt", *TINY, cwd=tmp_path, check=False), "notes.txt")
    _assert_bad_input(cli("distill", "--teacher", str(chain["student"]), *TINY, cwd=tmp_path, check=False),
                      "bcpkd.teacher", "student.pt")
    assert files_under(tmp_path) == {tmp_path / "corrupt.pt", tmp_path / "notes.txt"}


def test_a_cache_of_an_older_predictive_is_neither_found_nor_accepted(chain, tmp_path, monkeypatch):
    """A change of a kind's predictive (PREDICTIVE_VERSION) moves the cache key and refuses old caches."""
    from bcpkd_cli import calibration
    from bcpkd_cli.config import CalibrateConfig

    probs, meta = artifacts.load_cache(chain["cache"], {})
    assert meta["predictive_version"] == calibration.PREDICTIVE_VERSION
    old = artifacts.save_cache(tmp_path / "old.safetensors", probs.clone(), dict(meta, predictive_version=1))
    result = cli("distill", "--teacher", str(chain["teacher"]), "--temperature", "fit", "--cache", str(old),
                 *TINY, cwd=tmp_path, check=False)
    _assert_bad_input(result, "old.safetensors", "predictive_version", "bcpkd calibrate")
    key = calibration.cache_key("sha", "data", CalibrateConfig(), 1.0)
    monkeypatch.setattr(calibration, "PREDICTIVE_VERSION", calibration.PREDICTIVE_VERSION + 1)
    assert calibration.cache_key("sha", "data", CalibrateConfig(), 1.0) != key


def test_cache_for_other_data_is_refused(tmp_path, chain):
    cache = chain["cache"]
    _, meta = artifacts.load_cache(cache, {})
    probs = torch.full((400, 1, 5), 0.2)
    forged = dict(meta, data_fingerprint="0" * 16)
    teacher_copy = tmp_path / "teacher.pt"
    teacher_copy.write_bytes(chain["teacher"].read_bytes())
    target = tmp_path / cache.relative_to(chain["teacher"].parent)
    target.parent.mkdir(parents=True)
    artifacts.save_cache(target, probs, forged)
    result = cli("distill", "--teacher", "teacher.pt", "--temperature", "fit", *TINY, cwd=tmp_path, check=False)
    _assert_bad_input(result, str(target.relative_to(tmp_path)), "data_fingerprint", "bcpkd calibrate")
    assert not (tmp_path / "runs").exists()


def test_recipe_typos_reported_together(tmp_path):
    (tmp_path / "r.yaml").write_text("teacher:\n  bayes: laplce\n  epoch: 3\ndistill:\n  alpha: 2\n")
    result = cli("train-teacher", "--recipe", "r.yaml", cwd=tmp_path, check=False)
    _assert_bad_input(result, "r.yaml", "3 problem(s)", "laplce", "none, laplace", "teacher.epoch", "distill.alpha")
    assert files_under(tmp_path) == {tmp_path / "r.yaml"}


def test_bad_set_and_choice(tmp_path):
    _assert_bad_input(cli("distill", "--set", "distill.nope=1", cwd=tmp_path, check=False), "distill.nope")
    result = cli("train-teacher", "--bayes", "magic", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "magic" in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("; see bcpkd train-teacher --help")
    typo = cli("train-teacher", "--epocs", "3", cwd=tmp_path, check=False)  # click's usage errors: one line too
    assert typo.returncode == 2 and typo.stderr.strip() == \
        "error: No such option: --epocs (Possible options: --epochs, --help); see bcpkd train-teacher --help"


def test_help_lists_choices(tmp_path):
    result = cli("train-teacher", "--help", cwd=tmp_path)
    for choice in ("none", "laplace", "last_layer", "kron", "marglik", "probit"):
        assert choice in result.stdout


def test_run_tiny_recipe(tmp_path, monkeypatch):
    recipe = Path(__file__).parents[1] / "recipes" / "synthetic.yaml"
    result = cli("run", str(recipe), "--out", "run", *TINY, "--set", "experiment.seeds=[0,1]",
                 "--set", "experiment.workers=1", cwd=tmp_path)
    summary = json.loads((tmp_path / result.stdout.strip()).read_text())
    students = {row["name"]: row for row in summary["students"]}
    assert set(students) == {"onehot", "deterministic", "deterministic_tempscaled", "laplace", "true_bcp",
                             "noisy_alpha5", "noisy_alpha0.5"}
    assert all(row["seeds"] == 2 for row in students.values())
    true_bcp = students["true_bcp"]  # measured at the same weights: one-hot labels add the label noise
    assert true_bcp["grad_noise_onehot"][0] > true_bcp["grad_noise_noisy:0.5"][0] > true_bcp["grad_noise_true"][0]
    teachers = {row["name"] for row in summary["teachers"]}
    assert {"deterministic", "laplace", "deterministic -> deterministic_tempscaled (as calibrated)"} <= teachers
    assert (tmp_path / "run" / "summary.md").read_text().startswith("# ")
    assert {p.name for p in (tmp_path / "run" / "figures").glob("*.png")} == {  # matplotlib (the test extra) is there
        "reliability.png", "per-class.png", "confusion.png", "curves-nll.png", "curves-accuracy.png",
        "noise-vs-alpha.png"}

    # resumed: finished teachers and students are reused, a missing student is trained again, same table (the same
    # figures are not drawn a second time: 11 s of matplotlib that this test does not look at)
    from bcpkd_cli.stages import plot

    monkeypatch.setattr(plot, "draw", lambda *args, **kwargs: [])
    (tmp_path / "run" / "students" / "laplace-seed1" / "student.pt").unlink()
    again = cli("run", str(recipe), "--out", str(tmp_path / "run"), "--resume", *TINY,  # the folder spelled
                "--set", "experiment.seeds=[0,1]", "--set", "experiment.workers=1", cwd=tmp_path)  # another way
    assert again.stderr.count("reusing") == 2 + 13 and "training student" in again.stderr  # 2 teachers, 13 students
    assert json.loads(Path(again.stdout.strip()).read_text())["students"] == summary["students"]
    changed = cli("run", str(recipe), "--out", "run", "--resume", *TINY, "--set", "experiment.seeds=[0,1]",
                  "--set", "teacher.epochs=4", cwd=tmp_path, check=False)
    assert changed.returncode == 2 and "other settings (teacher.epochs)" in changed.stderr


def test_ctrl_c_exits_130_and_writes_nothing(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "bcpkd_cli", "distill", "--targets", "true", "--epochs", "50",
                                "--out", "s", "--device", "cpu"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    for line in process.stderr:  # wait until training has started
        if line.startswith("training student"):
            break
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stdout == ""
    assert "interrupted" in stderr
    assert not (tmp_path / "s" / "student.pt").exists()


def test_out_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    _assert_bad_input(cli("distill", "--targets", "onehot", "--out", "taken", *TINY, cwd=tmp_path, check=False),
                      "--out taken", "folder")


def test_explicit_cache_from_calibrate_out(chain, tmp_path):
    cache = cli("calibrate", "--teacher", str(chain["teacher"]), "--out", str(tmp_path / "c"), *TINY,
                cwd=chain["work"]).stdout.strip()
    student = cli("distill", "--teacher", str(chain["teacher"]), "--cache", cache, "--out", str(tmp_path / "s"),
                  *TINY, cwd=chain["work"]).stdout.strip()
    assert torch.load(student, weights_only=True)["targets"]["cache"] == cache
    before = chain["teacher"].read_bytes()  # --out at the teacher's own folder would replace its teacher.pt
    result = cli("calibrate", "--teacher", str(chain["teacher"]), "--out", str(chain["teacher"].parent), *TINY,
                 cwd=chain["work"], check=False)
    _assert_bad_input(result, f"--out {chain['teacher'].parent}", "would replace it")
    assert chain["teacher"].read_bytes() == before


def test_cache_of_another_teacher_is_refused(chain, tmp_path):
    other = cli("train-teacher", "--out", str(tmp_path / "other"), "--seed", "1", *TINY, cwd=tmp_path).stdout.strip()
    result = cli("distill", "--teacher", other, "--cache", str(chain["cache"]), "--out", str(tmp_path / "s"),
                 *TINY, cwd=tmp_path, check=False)
    _assert_bad_input(result, str(chain["cache"]), "teacher_sha256", "bcpkd calibrate")
    assert not (tmp_path / "s").exists()


def test_image_folder_chain(image_folder, tmp_path):
    data = ["--set", "data.name=imagefolder", "--set", f"data.root={image_folder}", "--set", "data.n_heldout=15",
            "--set", "teacher.arch=resnet20", "--set", "teacher.epochs=2", "--set", "teacher.batch_size=16",
            "--set", "distill.arch=wrn_16_1", "--set", "distill.epochs=1", "--set", "distill.batch_size=16",
            "--set", "distill.log_every=2", "--set", "teacher.laplace.grid_size=3", "--device", "cpu"]
    teacher = cli("train-teacher", "--bayes", "laplace", "--out", "t", *data, cwd=tmp_path).stdout.strip()
    data += ["--set", "calibrate.views=4"]
    student = cli("distill", "--teacher", teacher, "--out", "s", *data, cwd=tmp_path).stdout.strip()
    report = json.loads(cli("evaluate", student, teacher, "--json", *data, cwd=tmp_path).stdout)
    assert [r["kind"] for r in report] == ["student", "teacher"]
    assert all("kl_to_bcp" not in r["metrics"] and 0 <= r["metrics"]["accuracy"] <= 1 for r in report)
    probs, meta = artifacts.load_cache(Path(torch.load(tmp_path / student, weights_only=True)["targets"]["cache"]), {})
    assert probs.shape == (75, 4, 3)  # 90 training images - 15 held out, 4 views each
    assert meta["views"]["ids"][0] == 0 and len(set(meta["views"]["ids"])) == 4
    assert not torch.allclose(probs[:, 0], probs[:, 1])  # a view's target is the teacher on that view
    online = cli("distill", "--teacher", teacher, "--targets", "online", "--out", "o", *data, cwd=tmp_path)
    assert torch.load(tmp_path / online.stdout.strip(), weights_only=True)["targets"]["kind"] == "online"
    assert (image_folder / "train" / ".bcpkd-store").is_dir()  # decoded once, next to the data
    result = cli("distill", "--targets", "true", *data, cwd=tmp_path, check=False)
    _assert_bad_input(result, "has no true BCPs")


def test_few_shot_student_uses_k_examples_per_class_of_the_cache(chain, tmp_path):
    student = cli("distill", "--teacher", str(chain["teacher"]), "--temperature", "fit", "--set",
                  "distill.few_shot=10", "--out", str(tmp_path / "s"), *TINY, cwd=chain["work"]).stdout.strip()
    payload = torch.load(student, weights_only=True)
    rows = torch.tensor(payload["targets"]["few_shot_rows"])
    assert len(rows) == 50 and payload["history"]["steps"] == 4  # 5 classes x 10, batch 16
    assert payload["targets"]["cache"] == str(chain["cache"])  # the full cache, rows picked from it


def test_concurrent_jobs_build_a_cache_once(tmp_path):
    """Two jobs asking for the same new cache at once: one builds it, the other waits and uses it."""
    slow_cache = ["--bayes", "vi", "--samples", "300", "--set", "data.n_train=8000",  # a build of a few seconds
                  "--set", "teacher.vi.ml_epochs=1"]
    teacher = cli("train-teacher", "--out", str(tmp_path / "t"), *TINY, *slow_cache, cwd=tmp_path).stdout.strip()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    jobs = [subprocess.Popen([sys.executable, "-m", "bcpkd_cli", "calibrate", "--teacher", teacher, *TINY],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    outputs = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0]
    assert outputs[0][0] == outputs[1][0]  # the same cache path on stdout
    built = [err.count("calibrating vi teacher") for _, err in outputs]
    assert sorted(built) == [0, 1]
    artifacts.load_cache(Path(outputs[0][0].strip()), {})
