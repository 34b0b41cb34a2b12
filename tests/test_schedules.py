"""Training as transformers are trained: AdamW without decay on 1-D parameters, learning-rate schedules with a
warm-up per optimizer step, gradient accumulation; the defaults train exactly as before."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bcpkd_cli import artifacts
from bcpkd_cli.choices import Optimizer, Schedule
from bcpkd_cli.config import build_recipe
from bcpkd_cli.engine import Member, TrainSpec, train, train_lockstep
from bcpkd_cli.steps import batch_bounds
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.models import build_model
from bcpkd_cli.optim import make_optimizer
from bcpkd_cli.resumption import Resume
from cli_helpers import here, refused_here

pytestmark = pytest.mark.usefixtures("single_thread")

SPEC = {"arch": "mlp", "input_shape": [30], "n_classes": 5, "hidden": [8]}  # no BatchNorm, no dropout


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(SPEC)


def _cross_entropy(logits, labels, _targets):
    return F.cross_entropy(logits, labels, reduction="none")


def _spec(**changes) -> TrainSpec:
    settings = dict(epochs=3, batch_size=16, optimizer=Optimizer.sgd, lr=0.1, momentum=0.9, weight_decay=1e-3, seed=0)
    return TrainSpec(**{**settings, **changes})


def _lrs_of_steps(tiny_data, spec: TrainSpec, monkeypatch) -> tuple[list[float], int]:
    """The learning rate of every optimizer step of a run, and the steps."""
    seen, real_step = [], torch.optim.SGD.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    steps = train(_model(), tiny_data.train.inputs, tiny_data.train.labels, None, _cross_entropy, spec, "test")
    return seen, steps


@pytest.mark.parametrize("warmup, accumulate", [(5, 1), (0.25, 2), (0, 3)])
def test_linear_schedule_warms_up_and_decays_per_optimizer_step(tiny_data, monkeypatch, warmup, accumulate):
    """transformers' get_linear_schedule_with_warmup: lr * t / W during the W warm-up steps, then
    lr * (T - t) / (T - W), T the optimizer steps of the run (a fraction < 1 of them: W = ceil(warmup * T))."""
    spec = _spec(schedule=Schedule.linear, warmup=warmup, accumulate=accumulate)
    lrs, steps = _lrs_of_steps(tiny_data, spec, monkeypatch)
    per_epoch = math.ceil(len(batch_bounds(300, 16)) / accumulate)  # 19 batches of 16 (the last of 12)
    total = 3 * per_epoch
    warm = math.ceil(warmup * total) if warmup < 1 else warmup
    assert steps == len(lrs) == total
    want = [0.1 * (t / warm if t < warm else (total - t) / (total - warm)) for t in range(total)]
    assert lrs == pytest.approx(want, abs=1e-12)
    assert lrs[0] == (0.0 if warm else 0.1) and lrs[-1] == pytest.approx(0.1 / (total - warm))


def test_cosine_and_step_schedules_after_a_warm_up(tiny_data, monkeypatch):
    """With a warm-up, cosine falls on half a cosine over the steps after it (transformers' get_cosine_schedule_with_
    warmup); step keeps its epoch milestones."""
    lrs, total = _lrs_of_steps(tiny_data, _spec(schedule=Schedule.cosine, warmup=4), monkeypatch)
    want = [0.1 * (t / 4 if t < 4 else 0.5 * (1 + math.cos(math.pi * (t - 4) / (total - 4)))) for t in range(total)]
    assert lrs == pytest.approx(want, abs=1e-12)
    lrs, total = _lrs_of_steps(tiny_data, _spec(schedule=Schedule.step, warmup=4, lr_milestones=(1, 2)), monkeypatch)
    want = [0.1 * (t / 4 if t < 4 else 0.1 ** (t // 19)) for t in range(total)]  # 19 steps an epoch
    assert lrs[19 * 3 - 1] == pytest.approx(0.001) and lrs == pytest.approx(want, abs=1e-12)


def test_default_settings_train_as_before(tiny_data):
    """Schedule step without warm-up, one batch per step: bit for bit the loop bcpkd had before schedules and
    accumulation (zero_grad, mean loss, step; MultiStepLR x0.1 after each epoch)."""
    spec = _spec(lr_milestones=(1, 2))
    model = _model()
    train(model, tiny_data.train.inputs, tiny_data.train.labels, None, _cross_entropy, spec, "test")
    reference = _model()
    torch.manual_seed(spec.seed)
    order_gen = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=True)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [1, 2], gamma=0.1)
    for _ in range(spec.epochs):
        order = torch.randperm(300, generator=order_gen)
        for start, stop in batch_bounds(300, 16):
            rows = order[start:stop]
            loss = _cross_entropy(reference(tiny_data.train.inputs[rows]), tiny_data.train.labels[rows], None).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_adamw_decays_only_the_weights_of_two_or_more_dimensions():
    model = _model()
    optimizer = make_optimizer(model.parameters(), _spec(optimizer=Optimizer.adamw, lr=0.1, weight_decay=0.5))
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, kept = optimizer.param_groups
    assert decayed["weight_decay"] == 0.5 and [p.ndim for p in decayed["params"]] == [2, 2]  # the two weight matrices
    assert kept["weight_decay"] == 0.0 and [p.ndim for p in kept["params"]] == [1, 1]  # their biases
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # a step of decay alone
    optimizer.step()
    for name, p in model.named_parameters():
        want = before[name] * (1 - 0.1 * 0.5) if p.ndim == 2 else before[name]
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-7)


def _penalty(model):
    return lambda epoch: 1e-3 * sum(p.square().sum() for p in model.parameters())


@pytest.mark.parametrize("optimizer", [Optimizer.sgd, Optimizer.adamw])
def test_accumulated_batches_step_as_one_larger_batch(tiny_data, optimizer):
    """accumulate=4 batches of 16 = batches of 64, including each epoch's short last step (16 + 16 + 12 rows
    against one batch of 44), with a penalty (as VI's KL term) counted once per step and a per-step schedule."""
    models, steps, logs = [], [], []
    for batch_size, accumulate in ((64, 1), (16, 4)):
        model = _model()
        spec = _spec(batch_size=batch_size, accumulate=accumulate, optimizer=optimizer, lr=0.05 if optimizer ==
                     Optimizer.sgd else 1e-2, schedule=Schedule.linear, warmup=2)
        log: list = []
        steps.append(train(model, tiny_data.train.inputs, tiny_data.train.labels, None, _cross_entropy, spec, "test",
                           log_every=3, curve=lambda m: {}, penalty=_penalty(model), log=log))
        models.append(model)
        logs.append(log)
    assert steps[0] == steps[1] == 3 * 5 and logs[0] == logs[1]
    for name, value in models[0].state_dict().items():
        torch.testing.assert_close(models[1].state_dict()[name], value, rtol=0, atol=1e-6)


def _members(seed: int) -> list[Member]:
    out = []
    for k, (optimizer, schedule) in enumerate(((Optimizer.adamw, Schedule.linear), (Optimizer.sgd, Schedule.cosine))):
        model = _model(seed + k)
        spec = _spec(epochs=4, batch_size=32, accumulate=2, optimizer=optimizer, schedule=schedule, warmup=0.2,
                     lr=1e-2)
        out.append(Member(model, _cross_entropy, spec,
                          lambda m: {"norm": m.head.weight.norm().item()}))
    return out


def test_resume_with_per_step_schedules_equals_an_uninterrupted_run(tiny_data, tmp_path):
    def batch(rows, epoch):
        return tiny_data.train.inputs[rows], [None, None]

    def run(members, resume):
        return train_lockstep(members, tiny_data.train.labels, 4, 32, 0, "test", batch, log_every=2, resume=resume,
                              accumulate=2)

    paths = []

    def save(state):  # through a file, as a run does: the state loads with weights_only
        paths.append(artifacts.save_training_state(tmp_path / f"after-{state['epoch']}.pt", state, {"k": 1}))

    whole = _members(0)
    steps = run(whole, Resume(save))
    assert steps == 4 * 5  # 10 batches of 32 (the last of 12) an epoch, two per step
    for path in paths[:3]:
        continued = _members(100)  # another initialisation: everything comes from the state
        assert run(continued, Resume(lambda state: None, artifacts.load_training_state(path, {"k": 1})[0])) == steps
        for a, b in zip(whole, continued):
            for name, value in a.model.state_dict().items():
                assert torch.equal(value, b.model.state_dict()[name]), (path.name, name)
            assert a.log == b.log


@pytest.mark.parametrize("key, value, message", [
    ("teacher.warmup", -1, "teacher.warmup: must be 0 (none), a number of optimizer steps or a fraction < 1"),
    ("distill.warmup", 2.5, "distill.warmup: must be 0 (none), a number of optimizer steps or a fraction < 1"),
    ("distill.accumulate", 0, "distill.accumulate: must be positive, got 0"),
    ("teacher.schedule", "exponential", "teacher.schedule: 'exponential' is not one of: step, cosine, linear"),
    ("distill.optimizer", "lamb", "distill.optimizer: 'lamb' is not one of: sgd, adam, adamw"),
])
def test_bad_training_settings_are_refused_naming_the_key(key, value, message):
    section, name = key.split(".")
    with pytest.raises(BcpkdError) as info:
        build_recipe({section: {name: value}})
    assert str(info.value).startswith("recipe: 1 problem(s): ") and message in str(info.value)


def test_the_mcmi_cosine_flag_of_earlier_checkpoints_is_the_cosine_schedule():
    """Checkpoints written before the schedules said teacher.mcmi.cosine; their configs still load."""
    assert build_recipe({"teacher": {"mcmi": {"cosine": True}}}).teacher.mcmi.schedule == Schedule.cosine
    assert build_recipe({"teacher": {"mcmi": {"cosine": False}}}).teacher.mcmi.schedule == Schedule.step


def test_the_settings_reach_the_run_and_its_saved_config(tmp_path):
    tiny = ["--set", "data.n_train=100", "--set", "data.n_heldout=20", "--set", "data.n_test=20", "--device", "cpu"]
    teacher = here("train-teacher", "--bayes", "ensemble", "--members", "2", "--epochs", "2", "--out", "t", *tiny,
                   "--set", "teacher.hidden=[8]", "--set", "teacher.batch_size=16", "--set", "teacher.accumulate=3",
                   "--set", "teacher.optimizer=adamw", "--set", "teacher.schedule=linear",
                   "--set", "teacher.warmup=0.1", "--set", "teacher.weight_decay=0.01", cwd=tmp_path).strip()
    payload = torch.load(tmp_path / teacher, weights_only=True)
    saved = payload["config"]["teacher"]
    assert (saved["optimizer"], saved["schedule"], saved["warmup"], saved["accumulate"]) == ("adamw", "linear", 0.1, 3)
    last_steps = {entry["phase"]: entry["step"] for entry in payload["log"]}  # each member's last entry
    assert last_steps == {"member1": 2 * 3, "member2": 2 * 3}  # 7 batches an epoch (the last of 4), 3 per step
    message = refused_here("distill", "--teacher", teacher, "--set", "distill.accumulate=0", *tiny, cwd=tmp_path)
    assert "distill.accumulate: must be positive, got 0" in message
