"""Reports and figures that say what they show: which teacher a row is (raw or calibrated, and how), the
calibrated teacher a student learned from, a Laplace posterior that calibration left with nothing to add,
reliability bins with their counts (too-thin bins grey), curves after the first logged point, per-class
accuracy and confusion matrices."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest
import torch

from bcpkd_cli import figures, metrics, tuning
from bcpkd_cli.cli import main
from bcpkd_cli.stages import evaluate
from cli_helpers import here

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one thread, here and in the CLI

TINY = ["--set", "data.n_train=300", "--set", "data.n_heldout=100", "--set", "data.n_test=100",
        "--set", "teacher.hidden=[16]", "--set", "distill.hidden=[8]", "--set", "distill.batch_size=32",
        "--set", "distill.log_every=5", "--device", "cpu"]
# A prior precision searched only at 1e10 and 1e12 (two points: the grid is not widened), when the teacher is
# trained and when it is calibrated: a posterior that adds nothing to the network, whichever is chosen.
NO_POSTERIOR = ["--set", "teacher.laplace.prior=gridsearch", "--set", "teacher.laplace.grid_min=10",
                "--set", "teacher.laplace.grid_max=12", "--set", "teacher.laplace.grid_size=2"]


def here_both(*args: str, cwd: Path) -> tuple[str, str]:
    """The CLI in this process; its stdout and stderr."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setattr(sys, "argv", ["bcpkd", *args])
        out, err = io.StringIO(), io.StringIO()
        patch.setattr(sys, "stdout", out)
        patch.setattr(sys, "stderr", err)
        main()
    return out.getvalue(), err.getvalue()


def saved_figures(monkeypatch) -> dict:
    """{file name: figure} of every figure saved from now on."""
    saved, save = {}, figures._save

    def keep(fig, path, *rest):
        saved[path.name] = fig
        return save(fig, path, *rest)

    monkeypatch.setattr(figures, "_save", keep)
    return saved


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def work(single_thread, tmp_path_factory):
    """A Laplace teacher whose prior grid leaves it no posterior, and a student of it calibrated with a
    temperature (as a shell script makes them; the student's stderr kept)."""
    folder = tmp_path_factory.mktemp("reports")
    teacher = here("train-teacher", "--bayes", "laplace", "--epochs", "2", "--out", "t", *TINY, *NO_POSTERIOR,
                   cwd=folder).strip()
    out, err = here_both("distill", "--teacher", "t", "--out", "s", "--set", "calibrate.temperature=fit", *TINY,
                         cwd=folder)
    cache = next((folder / "t" / "bcp").glob("*/bcp.safetensors"))
    return {"folder": folder, "teacher": folder / teacher, "student": folder / out.strip(), "cache": cache,
            "calibrated": cache.parent / "teacher.pt", "distill_stderr": err}


# ------------------------------------------------------------------------------ pure pieces

def test_confusion_matrix_rows_are_true_classes_columns_predicted():
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8],
                          [0.3, 0.4, 0.3]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1, 2, 0])
    assert metrics.confusion_matrix(probs, labels) == [[1, 1, 0], [1, 1, 0], [0, 0, 2]]
    assert metrics.confusion_matrix(probs[:1], torch.tensor([2])) == [[0, 0, 0], [0, 0, 0], [1, 0, 0]]


def test_labels_say_which_teacher():
    assert evaluate.teacher_row_label("laplace", None) == "laplace teacher (raw)"
    assert evaluate.teacher_row_label("none", None) == "deterministic teacher (raw)"
    assert evaluate.teacher_row_label("laplace", {"heldout_examples": 100, "temperature": 1.2345,
                                              "prior_precision": 6.3}) == \
        "laplace teacher (calibrated, T=1.23, prior precision 6.3)"
    assert evaluate.teacher_row_label("vi", {"heldout_examples": 100}) == "vi teacher (calibrated, nothing tuned)"
    student = {"kind": "teacher", "teacher": "/elsewhere/t/teacher.pt", "teacher_kind": "laplace",
               "calibration": {"temperature": 1.5}}
    assert evaluate.student_row_label(student) == \
        "student of laplace teacher (calibrated, T=1.5) /elsewhere/t/teacher.pt"
    assert evaluate.student_row_label({**student, "calibration": {}}) == \
        "student of laplace teacher (raw) /elsewhere/t/teacher.pt"
    assert evaluate.student_row_label({"kind": "onehot"}) == "student of one-hot labels"
    assert evaluate.student_row_label({"kind": "noisy", "dirichlet_alpha": 10.0}) == \
        "student of Dirichlet-noised exact BCPs (alpha 10)"


def test_no_posterior_is_said_at_the_top_of_the_grid_or_when_nothing_changes():
    top = {"prior_precision": 1e12, "prior_method": "gridsearch", "prior_grid": [1e-4, 999999995904.0]}
    assert tuning.no_posterior_note(top, 3e-8) == ("held-out NLL prefers the network: the Laplace posterior "
                                                        "adds nothing here (prior precision 1e+12, the largest tried)")
    assert "adds little here" in tuning.no_posterior_note(top, 2e-3)
    assert "within 0.002 of the network's softmax" in tuning.no_posterior_note(top, 2e-3)
    inside = {"prior_precision": 5.0, "prior_method": "gridsearch", "prior_grid": [1e-4, 1e4]}
    assert tuning.no_posterior_note(inside, 0.05) is None
    assert "equals the network's softmax within 1e-06" in tuning.no_posterior_note(inside, 1e-7)
    assert tuning.no_posterior_note({"prior_precision": 1e9, "prior_method": "marglik"}, 0.01) is None


def test_calibration_detects_a_posterior_at_the_top_of_the_grid(tiny_data, capsys):
    """calibrate() on a teacher whose tuning chose the grid's largest prior precision and whose predictive is
    its network's softmax: one line on stderr and `no_posterior` in the report."""
    from bcpkd_cli.config import CalibrateConfig
    from bcpkd_cli.choices import TemperatureFit
    from bcpkd_cli.teachers.base import Teacher

    class Collapsed(Teacher):  # a posterior with nothing left: the network's softmax
        def tune(self, cfg, held):
            return {"prior_precision": 1e12, "prior_method": "gridsearch", "prior_grid": [1e-4, 1e12]}

        def predictive_at(self, inputs, index):
            logits = self.model(inputs)
            return lambda t: torch.softmax(logits / (self.calibration_temperature * t), dim=1)

        train = from_checkpoint = deployable = None

    torch.manual_seed(0)
    teacher = Collapsed(torch.nn.Linear(tiny_data.train.inputs.shape[1], tiny_data.n_classes))
    report = tuning.calibrate(teacher, tiny_data, CalibrateConfig(temperature=TemperatureFit.none))
    note = "held-out NLL prefers the network: the Laplace posterior adds nothing here (prior precision 1e+12, " \
           "the largest tried)"
    assert report["no_posterior"] == note and note in capsys.readouterr().err


def test_reliability_csv_has_counts_and_greys_out_thin_bins(tmp_path):
    pytest.importorskip("matplotlib")
    assert figures.min_bin_count(200) == 10 and figures.min_bin_count(5000) == 50 and figures.min_bin_count(1001) == 11
    # 200 examples: 150 at confidence 0.55 (100 right), 49 at 0.75 (40 right), one at 0.95 (right)
    probs = torch.tensor([[0.55, 0.45]] * 150 + [[0.75, 0.25]] * 49 + [[0.95, 0.05]], dtype=torch.float64)
    labels = torch.tensor([0] * 100 + [1] * 50 + [0] * 40 + [1] * 9 + [0])
    report = {"checkpoint": "t/teacher.pt", "kind": "teacher", "label": "laplace teacher (raw)",
              "reliability": metrics.reliability(probs, labels, 10), "metrics": {"ece": metrics.ece(probs, labels, 10)}}
    figures.reliability([("t/teacher.pt", report)], tmp_path, "t/teacher.pt")
    rows = read_csv(tmp_path / "reliability.csv")
    assert list(rows[0]) == ["model", "checkpoint", "bin_low", "bin_high", "confidence", "accuracy", "count",
                             "min_count", "greyed"]
    filled = {round(float(r["bin_low"]), 1): r for r in rows if int(r["count"])}
    assert {k: int(r["count"]) for k, r in filled.items()} == {0.5: 150, 0.7: 49, 0.9: 1}
    assert {k: int(r["greyed"]) for k, r in filled.items()} == {0.5: 0, 0.7: 0, 0.9: 1}  # 1 < 10 examples
    assert float(filled[0.9]["accuracy"]) == 1.0 and all(r["min_count"] == "10" for r in rows)
    assert sum(int(r["count"]) for r in rows) == 200 and len(rows) == 10


def test_curves_leave_out_the_first_logged_point_and_say_so(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    saved = saved_figures(monkeypatch)
    log = [{"step": s, "heldout_nll": v} for s, v in ((0, 9.0), (10, 0.5), (20, 0.45), (30, 0.47))]
    figures.curves({"kd": [log, log]}, "heldout_nll", tmp_path, "runs/r1")
    rows = read_csv(tmp_path / "curves-nll.csv")
    assert [(r["step"], r["drawn"]) for r in rows] == [("0", "0"), ("10", "1"), ("20", "1"), ("30", "1")]
    fig = saved["curves-nll.png"]
    ax = fig.axes[0]
    assert list(ax.lines[0].get_xdata()) == [10, 20, 30] and ax.get_yscale() == "log"
    assert "runs/r1" in fig.get_suptitle() and "step 0 is in the CSV" in ax.get_xlabel()


# ------------------------------------------------------------------------------ through the CLI

def test_calibration_says_when_the_posterior_adds_nothing(work):
    note = json.loads((work["cache"].parent / "report.json").read_text())["no_posterior"]
    assert "the Laplace posterior adds nothing here" in note and "prior precision 1e+1" in note
    assert note in work["distill_stderr"]
    calibrated = torch.load(work["calibrated"], weights_only=True)
    assert calibrated["history"]["calibration"]["no_posterior"] == note


def test_rows_are_named_by_what_they_are(work):
    folder = work["folder"]
    out, err = here_both("evaluate", "s", "t", "--json", "--device", "cpu", cwd=folder)
    student, teacher = json.loads(out)  # one object per checkpoint given
    tuned = torch.load(work["calibrated"], weights_only=True)["history"]["calibration"]
    assert tuned["prior_precision"] in (pytest.approx(1e10), pytest.approx(1e12))
    calibrated = f"laplace teacher (calibrated, T={tuned['temperature']:.3g}, prior precision " \
                 f"{tuned['prior_precision']:.3g})"
    assert teacher["label"] == "laplace teacher (raw)" and "no_posterior" not in teacher
    assert student["label"] == f"student of {calibrated} t/teacher.pt"  # relative where it lies under the cwd
    assert student["cache"] == str(work["cache"].resolve())
    extra = student["teacher_report"]  # the calibrated teacher it learned from, beside the cache
    assert extra["label"] == calibrated and extra["checkpoint"] == str(work["calibrated"].resolve())
    assert extra["calibrated"] is True and "adds nothing" in extra["no_posterior"]
    assert extra["metrics"]["ece"] != teacher["metrics"]["ece"]  # the temperature changed it
    table = " ".join(err.split())
    for label, path in ((student["label"], "s/student.pt"), ("laplace teacher (raw)", "t/teacher.pt"),
                        (calibrated, str(work["calibrated"].relative_to(folder)))):
        assert label in table and path in table
    assert f"{work['calibrated'].relative_to(folder)}: {extra['no_posterior']}" in table


def test_evaluate_a_student_alone_finds_its_calibrated_teacher(work, tmp_path):
    folder = work["folder"]
    out, err = here_both("evaluate", "s", "--json", "--device", "cpu", cwd=folder)
    (student,) = json.loads(out)
    assert student["teacher_report"]["checkpoint"] == str(work["calibrated"].resolve())
    assert student["teacher_report"]["kind"] == "teacher" and "accuracy" in student["teacher_report"]["metrics"]
    assert str(work["calibrated"].relative_to(folder)) in err
    moved = tmp_path / "teacher.pt"
    work["calibrated"].rename(moved)
    try:
        out, err = here_both("evaluate", "s", "--json", "--device", "cpu", cwd=folder)
    finally:
        moved.rename(work["calibrated"])
    (student,) = json.loads(out)
    assert student["teacher_report"] == {"checkpoint": str(work["calibrated"].resolve()), "missing": True}
    gone = [line for line in err.splitlines() if "is gone" in line]
    assert len(gone) == 1 and "evaluating the student alone" in gone[0]


def test_reports_carry_a_confusion_matrix_and_plot_draws_it(work, monkeypatch):
    pytest.importorskip("matplotlib")
    folder = work["folder"]
    (teacher,) = json.loads(here("evaluate", "t", "--json", "--device", "cpu", cwd=folder))
    confusion = teacher["confusion"]
    assert len(confusion) == 5 and all(len(row) == 5 for row in confusion)
    assert [sum(row) for row in confusion] == [e["n"] for e in teacher["per_class"]]
    assert [row[i] for i, row in enumerate(confusion)] == \
        [round(e["accuracy"] * e["n"]) for e in teacher["per_class"]]
    saved = saved_figures(monkeypatch)
    made = here("plot", "t", "s", "--out", "figs", "--device", "cpu", cwd=folder).split()
    assert {Path(p).name for p in made} == {"reliability.png", "per-class.png", "confusion.png", "curves-nll.png",
                                            "curves-accuracy.png"}
    assert all(fig.get_suptitle().split("\n")[0].endswith(" of t, s") for fig in saved.values())  # the files shown
    cells = read_csv(folder / "figs" / "confusion.csv")
    mine = [int(r["count"]) for r in cells if r["model"] == "t/teacher.pt"]
    assert mine == [v for row in confusion for v in row]
    per_class = [r for r in read_csv(folder / "figs" / "per-class.csv") if r["model"] == "t/teacher.pt"]
    assert [(r["class"], int(r["n"])) for r in per_class] == [(e["class"], e["n"]) for e in teacher["per_class"]]


def test_plot_draws_the_held_out_curves_of_teachers_as_of_students(work, monkeypatch):
    pytest.importorskip("matplotlib")
    folder = work["folder"]
    saved = saved_figures(monkeypatch)
    here("plot", "t", "s", "--out", "curves", "--device", "cpu", cwd=folder)
    logs = {name: torch.load(folder / name / file, weights_only=True)["log"]
            for name, file in (("t", "teacher.pt"), ("s", "student.pt"))}
    named = {"t": "laplace teacher t/teacher.pt", "s": "s/student.pt"}  # checkpoints given as files: their paths
    for key in ("nll", "accuracy"):
        rows = read_csv(folder / "curves" / f"curves-{key}.csv")
        assert {r["model"] for r in rows} == set(named.values())
        for name, curve in named.items():
            assert [(int(r["step"]), float(r["mean"])) for r in rows if r["model"] == curve] == \
                [(e["step"], pytest.approx(e[f"heldout_{key}"])) for e in logs[name]], (key, name)
        students, teachers = saved[f"curves-{key}.png"].axes  # teachers in a panel of their own
        assert (students.get_title(), teachers.get_title()) == ("students", "teachers")
        drawn = {line.get_label(): list(line.get_xdata()) for line in teachers.lines}
        assert drawn == {f"{named['t']} (1 seed)": [e["step"] for e in logs["t"]][1:]}  # from the second point on
        assert [line.get_label() for line in students.lines] == [f"{named['s']} (1 seed)"]


def test_a_teacher_around_a_base_shares_the_bases_curve(single_thread, tmp_path):
    pytest.importorskip("matplotlib")
    here("train-teacher", "--epochs", "2", "--out", "d", *TINY, cwd=tmp_path)
    here("train-teacher", "--bayes", "laplace", "--base", "d/teacher.pt", "--out", "l", *TINY, cwd=tmp_path)
    here("plot", "d", "l", "--out", "figs", "--device", "cpu", cwd=tmp_path)
    rows = read_csv(tmp_path / "figs" / "curves-nll.csv")  # the base's network and log: one curve, both names
    assert {r["model"] for r in rows} == {"deterministic teacher d/teacher.pt, laplace teacher l/teacher.pt"}
    assert [int(r["step"]) for r in rows] == [e["step"] for e in torch.load(tmp_path / "d" / "teacher.pt",
                                                                            weights_only=True)["log"]]


def test_a_run_says_under_its_teachers_why_a_calibrated_row_equals_its_teacher(single_thread, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""
device: cpu
data: {n_train: 300, n_heldout: 100, n_test: 100}
teacher: {hidden: [16], epochs: 2}
distill: {hidden: [8], batch_size: 32, log_every: 5, epochs: 1}
experiment:
  teachers: {lap: {bayes: laplace, laplace: {prior: gridsearch, grid_min: 10, grid_max: 12, grid_size: 2}}}
  students: {from_lap: {targets: teacher, teacher: lap}}
  seeds: [0]
  workers: 1
""")
    out, err = here_both("run", str(recipe), "--out", "run", cwd=tmp_path)
    summary = (tmp_path / "run" / "summary.md").read_text()
    note = "teacher lap -> from_lap (as calibrated): the Laplace posterior adds nothing here"
    assert f"- {note}" in summary and note in " ".join(err.split())
    reports = json.loads((tmp_path / "run" / "reports.json").read_text())
    labels = {e["name"]: e["report"]["label"] for e in reports}
    assert labels["teacher lap"] == "laplace teacher (raw)"
    if (tmp_path / "run" / "figures").is_dir():  # matplotlib: the teacher's curve beside its student's, by name
        curves = {r["model"] for r in read_csv(tmp_path / "run" / "figures" / "curves-nll.csv")}
        assert curves == {"teacher lap", "from_lap"}  # the calibrated teacher trained nothing: no curve
    assert labels["teacher lap -> from_lap (as calibrated)"] in ("laplace teacher (calibrated, prior precision 1e+10)",
                                                                 "laplace teacher (calibrated, prior precision 1e+12)")


def test_calibration_never_makes_held_out_nll_worse(tmp_path):
    """calibrate.prior_grid: a grid far below the teacher's trained prior (marglik) loses to it, which is kept and
    said; on a fine grid the best of the grid and the trained prior is taken. Held-out NLL never rises. A
    --set teacher.KEY on calibrate that differs from the checkpoint's setting (which calibrate uses) is said."""
    here("train-teacher", "--bayes", "laplace", "--epochs", "2", "--out", "t", *TINY, cwd=tmp_path)
    trained = torch.load(tmp_path / "t" / "teacher.pt", weights_only=True)["predictive"]["prior_precision"]
    said = {}
    for name, grid in (("far", "[-12,-8,2]"), ("fine", "[-4,4,81]")):  # 2 points: not widened
        said[name] = here_both("calibrate", "--teacher", "t/teacher.pt", "--out", name, "--set",
                               f"calibrate.prior_grid={grid}", cwd=tmp_path)[1]
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert report["after"]["nll"] <= report["before"]["nll"] + 1e-12, said[name]
        assert report["prior_kept"] == (report["prior_precision"] == pytest.approx(trained))
    far = json.loads((tmp_path / "far" / "report.json").read_text())
    assert far["prior_kept"] and far["after"] == far["before"] and far["prior_grid"][1] == pytest.approx(1e-8)
    assert f"calibrated: prior precision {trained:.4g} (the teacher's own: no grid point lowered held-out NLL)" \
        in said["far"]
    same, other = ("teacher.laplace.grid_min=-4", "teacher.hidden=[16]"), "teacher.laplace.grid_min=-8"
    err = here_both("calibrate", "--teacher", "t/teacher.pt", *[a for s in (*same, other) for a in ("--set", s)],
                    cwd=tmp_path)[1]
    notes = [text for text in err.splitlines() if text.startswith("note: --set")]
    assert notes == ["note: --set teacher.laplace.grid_min=-8 is not used: t/teacher.pt was trained with "
                     "teacher.laplace.grid_min -4.0, and this command uses its settings (calibration's own keys are "
                     "calibrate.*, e.g. calibrate.prior_grid=[-4,4,21] for the prior grid search)"]
