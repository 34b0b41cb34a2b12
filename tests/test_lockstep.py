"""Students trained in lockstep (one pass over the data) equal students trained one by one."""

from __future__ import annotations

import pytest
import torch

from bcpkd_cli.config import build_recipe, parse_sweep
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.stages import distill, train_teacher

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one thread, here and in the CLI

BASE = {"device": "cpu", "data": {"n_train": 300, "n_heldout": 100, "n_test": 100},
        "teacher": {"hidden": [16], "epochs": 3, "batch_size": 32},
        "distill": {"hidden": [8], "epochs": 2, "batch_size": 16, "log_every": 7, "data_seed": 7}}


@pytest.fixture(scope="module")
def teacher(single_thread, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    return train_teacher.run(build_recipe({**BASE, "out": str(out / "t")}))


def _recipe(tmp_path, name: str, **distill_settings):
    return build_recipe({**BASE, "out": str(tmp_path / name), "distill": {**BASE["distill"], **distill_settings}})


def _students(paths):
    return [torch.load(p, weights_only=True) for p in paths]


POINTS = [{"alpha": 0.5, "seed": 0}, {"alpha": 1.0, "seed": 1, "t_teacher": 2.0, "t_student": 2.0},
          {"targets": "onehot", "seed": 2}, {"targets": "true", "seed": 0, "lr": 0.05},
          {"targets": "online", "seed": 3}, {"targets": "online", "seed": 4, "alpha": 0.7}]


def test_lockstep_students_equal_separate_runs(teacher, tmp_path):
    recipes = [_recipe(tmp_path, f"lock{i}", **point) for i, point in enumerate(POINTS)]
    together = _students(distill.run_lockstep(recipes, teacher))
    alone = _students([distill.run(_recipe(tmp_path, f"alone{i}", **point), teacher) for i, point in enumerate(POINTS)])
    for point, a, b in zip(POINTS, together, alone):
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for key in a["state_dict"]:
            assert torch.equal(a["state_dict"][key], b["state_dict"][key]), (point, key)
        assert a["log"] == b["log"] and a["history"]["grad_noise"] == b["history"]["grad_noise"]
        assert a["targets"]["kind"] == point.get("targets", "teacher")
    # different settings really give different students
    assert not torch.equal(together[0]["state_dict"]["head.weight"], together[1]["state_dict"]["head.weight"])


def test_default_data_seed_is_the_seed(teacher, tmp_path):
    """Without data_seed, a run is the same as before lockstep existed: order and views from distill.seed."""
    with_default = _recipe(tmp_path, "a", seed=5, data_seed=-1)
    explicit = _recipe(tmp_path, "b", seed=5, data_seed=5)
    a, b = _students([distill.run(with_default, teacher), distill.run(explicit, teacher)])
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_groups_that_do_not_share_the_data_pass_are_refused(tmp_path):
    for bad in ({"epochs": 3}, {"batch_size": 8}, {"data_seed": 8}, {"few_shot": 5}):
        with pytest.raises(BcpkdError, match="must share distill"):
            distill.check_group([_recipe(tmp_path, "x"), _recipe(tmp_path, "y", **bad)])
    with pytest.raises(BcpkdError, match="data_seed"):  # seeds swept without a fixed data seed
        distill.check_group([_recipe(tmp_path, "x", data_seed=-1, seed=0), _recipe(tmp_path, "y", data_seed=-1, seed=1)])


def test_sweep_grid_is_the_product_in_order():
    assert parse_sweep(["alpha=0.5,1", "distill.seed=0,1"]) == [
        {"alpha": 0.5, "seed": 0}, {"alpha": 0.5, "seed": 1}, {"alpha": 1, "seed": 0}, {"alpha": 1, "seed": 1}]
    assert parse_sweep([]) == [{}]
    with pytest.raises(BcpkdError, match="--sweep 'beta=1'"):
        parse_sweep(["beta=1"])
    with pytest.raises(BcpkdError, match="list-valued keys cannot be swept"):
        parse_sweep(["hidden=[64,64]"])
    with pytest.raises(BcpkdError, match="swept twice"):
        parse_sweep(["alpha=0.5", "alpha=1"])
    with pytest.raises(BcpkdError, match="plain numbers or words"):
        parse_sweep(["lr=[1"])


def test_a_shared_online_teacher_runs_once_per_batch_at_every_temperature(teacher, tmp_path, monkeypatch):
    from bcpkd_cli.teachers.deterministic import DeterministicTeacher

    calls = []
    original = DeterministicTeacher.predictive_at
    monkeypatch.setattr(DeterministicTeacher, "predictive_at",
                        lambda self, *args: calls.append(len(args[0])) or original(self, *args))
    recipes = [_recipe(tmp_path, f"o{i}", targets="online", seed=i, alpha=a, t_teacher=t)
               for i, (a, t) in enumerate(((0.3, 1.0), (0.6, 2.0), (0.9, 4.0)))]
    distill.run_lockstep(recipes, teacher)
    steps = 2 * (300 // 16 + 1)
    assert calls.count(16) + calls.count(300 % 16) == steps  # one teacher pass per batch, not three


def test_compiled_training_forward_keeps_the_plain_state_dict(teacher, tmp_path, monkeypatch):
    """compile=true trains through torch.compile of the same parameters (here with the eager backend, the
    inductor compile takes a minute on 2 cores); the checkpoint keeps the plain parameter names."""
    import functools

    compiled = []
    eager_compile = functools.partial(torch.compile, backend="eager")
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or eager_compile(model))
    plain = torch.load(distill.run(_recipe(tmp_path, "plain", seed=1), teacher), weights_only=True)
    recipe = build_recipe({**BASE, "out": str(tmp_path / "compiled"), "compile": True,
                           "distill": {**BASE["distill"], "seed": 1}})
    with_compile = torch.load(distill.run(recipe, teacher), weights_only=True)
    assert len(compiled) == 1 and with_compile["state_dict"].keys() == plain["state_dict"].keys()
    for key, value in plain["state_dict"].items():
        torch.testing.assert_close(with_compile["state_dict"][key], value, atol=1e-6, rtol=1e-5)


def test_cpu_training_runs_in_float32():
    from bcpkd_cli.config import Precision
    from bcpkd_cli.engine import prepare_for_device, training_precision

    with training_precision(torch.device("cpu"), Precision.auto):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    model = prepare_for_device(torch.nn.Conv2d(3, 4, 3), torch.device("cpu"), Precision.auto)
    assert model.weight.is_contiguous()  # channels_last only on CUDA
