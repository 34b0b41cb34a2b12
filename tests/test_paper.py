"""The authors' protocol one setting away: training on every image (no held-out split), and the settings
the paper's recipes use."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bcpkd_cli import artifacts
from cli_helpers import here, refused_here

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one thread, here and in the CLI

TINY = ["--set", "data.n_train=300", "--set", "data.n_test=100", "--set", "teacher.hidden=[16]",
        "--set", "distill.hidden=[8]", "--set", "distill.batch_size=32", "--set", "distill.log_every=5",
        "--device", "cpu"]


def test_no_heldout_split_when_nothing_is_tuned_on_it(single_thread, tmp_path):
    no_heldout = [*TINY, "--set", "data.n_heldout=0"]
    message = refused_here("train-teacher", "--bayes", "temperature", "--out", "t0", *no_heldout, cwd=tmp_path)
    assert "data.n_heldout=0" in message and "tunes on held-out data" in message
    teacher = here("train-teacher", "--bayes", "laplace", "--prior", "marglik", "--epochs", "2", "--out", "t",
                   *no_heldout, cwd=tmp_path).strip()
    payload = torch.load(tmp_path / teacher, weights_only=True)
    assert payload["data"]["sizes"] == {"train": 300, "heldout": 0, "test": 100} and payload["history"]["heldout"] == {}
    message = refused_here("distill", "--teacher", teacher, "--out", "s0", *no_heldout, cwd=tmp_path)
    assert "calibrate.prior=keep" in message
    student = here("distill", "--teacher", teacher, "--set", "calibrate.prior=keep", "--t-teacher", "2",
                   "--set", "calibrate.temper=predictive", "--out", "s", *no_heldout, cwd=tmp_path).strip()
    report = json.loads(here("evaluate", student, "--json", "--device", "cpu", cwd=tmp_path))[0]
    assert report["metrics"]["convergence_noise_nll"] is None and 0 <= report["metrics"]["accuracy"] <= 1
    assert all(set(entry) == {"step"} for entry in torch.load(tmp_path / student, weights_only=True)["log"])


def test_mcmi_as_the_authors_script_centroids_once_and_a_cosine_schedule(single_thread, tmp_path, monkeypatch):
    """mcmi.centroids=once computes the class centroids from the network before fine-tuning and keeps them;
    mcmi.schedule cosine anneals the fine-tuning learning rate as lr * (1 + cos(pi * epoch / epochs)) / 2."""
    from bcpkd_cli import engine
    from bcpkd_cli.config import build_recipe
    from bcpkd_cli.stages import train_teacher
    from bcpkd_cli.teachers import mcmi

    calls, lrs, optimizers = [], [], []
    real_centroids, real_optimizer = mcmi.class_centroids, engine.make_optimizer
    monkeypatch.setattr(mcmi, "class_centroids", lambda model, data: calls.append(1) or real_centroids(model, data))
    monkeypatch.setattr(engine, "make_optimizer", lambda params, spec: optimizers.append(real_optimizer(params, spec))
                        or optimizers[-1])
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):  # the learning rate of every fine-tuning step
        if self is optimizers[-1] and len(optimizers) == 2:
            lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    tree = {"data": {"n_train": 100, "n_heldout": 20, "n_test": 20}, "device": "cpu", "out": str(tmp_path / "t"),
            "teacher": {"bayes": "mcmi", "hidden": [8], "epochs": 1, "batch_size": 50, "lr": 0.001,
                        "mcmi": {"weight": -0.2, "epochs": 4, "lr_scale": 0.2, "centroids": "once", "schedule": "cosine"}}}
    train_teacher.run(build_recipe(tree))
    assert len(calls) == 1  # once, not every epoch
    want = [0.0002 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4) for _ in range(2)]  # 2 steps an epoch
    assert lrs == pytest.approx(want)
    calls.clear()
    tree["teacher"]["mcmi"].update(centroids="epoch", schedule="step")
    train_teacher.run(build_recipe({**tree, "out": str(tmp_path / "t2")}))
    assert len(calls) == 4


def test_cached_draws_give_one_draw_per_example_per_epoch(single_thread, tmp_path):
    """calibrate.draws keeps each ensemble member's probabilities ([N, V, K, C]); distill.draw=one trains every
    example on one seeded draw per epoch, K on the mean of K of them, mean on their average (the predictive)."""
    from bcpkd_cli import artifacts
    from bcpkd_cli.config import build_recipe
    from bcpkd_cli.data import load_dataset
    from bcpkd_cli.targets import TableTargets, draw_weights
    from bcpkd_cli.teachers import load_teacher

    teacher = here("train-teacher", "--bayes", "ensemble", "--members", "3", "--epochs", "1", "--out", "t", *TINY,
                   "--set", "data.n_heldout=50", cwd=tmp_path).strip()
    cache = here("calibrate", "--teacher", teacher, "--set", "calibrate.draws=3", "--set", "calibrate.prior=keep",
                 *TINY, "--set", "data.n_heldout=50", cwd=tmp_path).strip()
    probs, meta = artifacts.load_cache(cache, {})
    assert probs.shape == (300, 1, 3, 5) and meta["n_draws"] == 3
    payload = torch.load(tmp_path / teacher, weights_only=True)
    ensemble = load_teacher(payload, torch.device("cpu"))
    data = load_dataset(build_recipe({"data": payload["data"]["config"]}).data)
    with torch.no_grad():
        members = torch.stack([torch.softmax(m(data.train.inputs), dim=1) for m in ensemble.members], dim=1)
    torch.testing.assert_close(probs[:, 0], members, atol=1e-6, rtol=0)
    weights = draw_weights(300, 3, "one", seed=4, epoch=2)
    assert torch.equal(weights.sum(1), torch.ones(300)) and set(weights.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(weights, draw_weights(300, 3, "one", seed=4, epoch=3))  # a new draw every epoch
    two = draw_weights(300, 3, "2", seed=4, epoch=2)
    assert set(two.unique().tolist()) == {0.0, 0.5} and torch.equal((two > 0).sum(1), torch.full((300,), 2))
    rows, slots = torch.arange(10), torch.zeros(10, dtype=torch.long)
    source = TableTargets(probs, draw="one", seed=4)
    want = (draw_weights(300, 3, "one", 4, 2)[rows, :, None] * probs[rows, 0]).sum(1)
    torch.testing.assert_close(source.batch(rows, slots, 2, None, None, {}), want)
    mean = TableTargets(probs, draw="mean").batch(rows, slots, 0, None, None, {})
    torch.testing.assert_close(mean, ensemble.predict_probs(data.train.inputs[:10], rows), atol=1e-6, rtol=0)
    student = here("distill", "--teacher", teacher, "--set", "calibrate.draws=3", "--set", "calibrate.prior=keep",
                   "--set", "distill.draw=one", "--out", "s", *TINY, "--set", "data.n_heldout=50", cwd=tmp_path).strip()
    assert torch.load(tmp_path / student, weights_only=True)["config"]["distill"]["draw"] == "one"


def test_plot_draws_figures_with_their_data_and_names_the_missing_extra(single_thread, tmp_path, monkeypatch):
    import builtins

    pytest.importorskip("matplotlib")
    teacher = here("train-teacher", "--bayes", "laplace", "--epochs", "2", "--out", "t", *TINY,
                   "--set", "data.n_heldout=50", "--set", "teacher.laplace.grid_size=3", cwd=tmp_path).strip()
    student = here("distill", "--teacher", teacher, "--out", "s", *TINY, "--set", "data.n_heldout=50",
                   "--set", "teacher.laplace.grid_size=3", cwd=tmp_path).strip()
    made = here("plot", teacher, student, "--out", "figs", "--device", "cpu", cwd=tmp_path).split()
    assert {p.split("/")[-1] for p in made} == {"reliability.png", "per-class.png", "confusion.png", "curves-nll.png",
                                                "curves-accuracy.png"}
    for p in made:
        assert (tmp_path / p).read_bytes()[:4] == b"\x89PNG" and (tmp_path / p).with_suffix(".csv").is_file()
    before = (tmp_path / "figs" / "reliability.png").read_bytes()
    assert "--force" in refused_here("plot", teacher, "--out", "figs", cwd=tmp_path)
    assert (tmp_path / "figs" / "reliability.png").read_bytes() == before  # nothing replaced unasked
    rows = (tmp_path / "figs" / "reliability.csv").read_text().splitlines()
    assert rows[0] == "model,checkpoint,bin_low,bin_high,confidence,accuracy,count,min_count,greyed" and \
        len(rows) == 1 + 2 * 15
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "matplotlib" else real_import(name, *a, **k))
    assert "pip install -e '.[plot]'" in refused_here("plot", student, "--out", "figs2", cwd=tmp_path)


@pytest.mark.slow
def test_teacher_seeds_make_teacher_variance_visible_and_students_pair_by_seed(single_thread, tmp_path, no_figures):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""
device: cpu
data: {n_train: 300, n_heldout: 100, n_test: 100}
teacher: {hidden: [16], epochs: 2}
calibrate: {prior: keep}
distill: {hidden: [8], batch_size: 32, log_every: 5}
experiment:
  teachers: {det: {bayes: none}, lap: {bayes: laplace, base: det}}
  students: {onehot: {targets: onehot}, from_lap: {targets: teacher, teacher: lap}}
  seeds: [0, 1]
  teacher_seeds: [3, 4]
""")
    summary = json.loads((tmp_path / here("run", str(recipe), "--out", "run", cwd=tmp_path).strip()).read_text())
    teachers = {row["name"]: row for row in summary["teachers"]}
    assert set(teachers) == {"det", "lap"} and teachers["det"]["seeds"] == 2 and teachers["det"]["accuracy"][1] > 0
    lap = torch.load(tmp_path / "run" / "teachers" / "lap@t4" / "teacher.pt", weights_only=True)
    assert lap["config"]["teacher"]["seed"] == 4 and lap["parent_sha256"] == artifacts.sha256_file(
        tmp_path / "run" / "teachers" / "det@t4" / "teacher.pt")
    students = {row["name"]: row["seeds"] for row in summary["students"]}
    assert students == {"onehot": 2, "from_lap": 4}  # 2 teacher seeds x 2 student seeds
    assert [row["name"] for row in summary["paired"]] == ["from_lap vs onehot"]
