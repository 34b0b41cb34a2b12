"""The teacher family behind one interface: vi, mc-dropout, ensemble, temperature, mse, mcmi.

Exact predictive formulas against hand computations, index seeding (no dependence on batch layout),
checkpoint round trips in this and in another process, and each kind through calibrate, cache,
distill and evaluate on tiny synthetic data and on a tiny image folder.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bcpkd_cli import artifacts, losses
from bcpkd_cli.config import Bayes, VIConfig, build_recipe
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.models import build_model, model_spec
from bcpkd_cli.stages import distill, evaluate, train_teacher
from bcpkd_cli.teachers import load_teacher, recipe_problems
from bcpkd_cli.teachers.index_noise import index_bits
from bcpkd_cli.teachers.mc_dropout import MCDropoutTeacher, mask_pool, mask_rows, mask_stream
from bcpkd_cli.teachers.mcmi import class_centroids
from bcpkd_cli.teachers.temperature import fit_temperature
from bcpkd_cli.teachers.vi import draw_seed, kl_divergence, kl_weight, to_bayesian

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one thread, here and in the CLI

KINDS = [Bayes.none, Bayes.temperature, Bayes.mse, Bayes.mcmi, Bayes.mc_dropout, Bayes.vi, Bayes.ensemble]
TINY = {"data": {"n_train": 300, "n_heldout": 100, "n_test": 100},
        "teacher": {"hidden": [16], "epochs": 3, "batch_size": 32,
                    "vi": {"samples": 4, "ml_epochs": 1, "anneal_epochs": 1},
                    "mc_dropout": {"samples": 4}, "ensemble": {"members": 2}, "mcmi": {"epochs": 2}},
        "calibrate": {"temperature": "fit"},
        "distill": {"hidden": [8], "epochs": 1, "batch_size": 32, "log_every": 5},
        "device": "cpu"}


def _tree(kind: Bayes, out, **teacher) -> dict:
    tree = {**TINY, "out": str(out)}
    tree["teacher"] = {**TINY["teacher"], "bayes": kind.value, **teacher}
    return tree


@pytest.fixture(scope="module")
def teachers(single_thread, tmp_path_factory):
    """One tiny teacher of every kind: kind -> teacher.pt."""
    work = tmp_path_factory.mktemp("kinds")
    return {kind: train_teacher.run(build_recipe(_tree(kind, work / kind.value))) for kind in KINDS}


def _load(path):
    payload = artifacts.load_checkpoint(path, artifacts.TEACHER_FORMAT)
    return payload, load_teacher(payload, torch.device("cpu"))


def _inputs(tiny_data, n: int = 40):
    return tiny_data.heldout.inputs[:n], torch.arange(n) + 1000


# ------------------------------------------------------------------------------------------ exact formulas

def test_mse_loss_is_the_squared_distance_to_the_onehot_label():
    logits = torch.tensor([[0.5, 0.2, -0.1], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    want = torch.tensor([(0.25 + 0.04 + 0.01) / 3, (1.0 + 0.0 + 1.0) / 3])
    torch.testing.assert_close(losses.mse_to_onehot(logits, labels), want)


def test_mean_kl_to_the_class_centroid_is_the_conditional_mutual_information():
    """Within a class, mean_i KL(p_i || mean p) = H(mean p) - mean_i H(p_i) = I(X; Y_hat | Y = y)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=gen)
    probs = logits.softmax(1)
    centroid = probs.mean(0, keepdim=True).expand(6, 4)

    def entropy(p):
        return -(p * p.log()).sum(-1)

    cmi = losses.cmi_to_centroids(logits, centroid).mean()
    torch.testing.assert_close(cmi, entropy(centroid[0]) - entropy(probs).mean())


def test_kl_weight_schedule_is_zero_then_linear_to_one():
    cfg = VIConfig(ml_epochs=2, anneal_epochs=3)
    assert [kl_weight(e, cfg) for e in range(7)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert kl_weight(0, VIConfig(ml_epochs=0, anneal_epochs=0)) == 1.0


def test_vi_kl_is_the_closed_form_gaussian_kl_over_every_weight():
    model = to_bayesian(build_model(model_spec("mlp", (3,), 2, (4,))), VIConfig(prior_sigma=0.5), from_base=False)
    want = 0.0
    for name, mu in model.named_parameters():
        if name.rsplit(".", 1)[-1].startswith("mu_"):
            sigma = F.softplus(dict(model.named_parameters())[name.replace("mu_", "rho_")])
            want += (torch.log(0.5 / sigma) + (sigma**2 + mu**2) / (2 * 0.25) - 0.5).sum()
    torch.testing.assert_close(kl_divergence(model), want)
    rho = [p for n, p in model.named_parameters() if "rho_" in n]
    assert all(torch.all(p == -3.0) for p in rho)  # posterior_rho_init


def test_vi_predictive_averages_softmax_over_seeded_weight_samples(teachers, tiny_data):
    """Draw s: W = mu + softplus(rho) * eps, eps from a generator seeded by draw_seed(seed, s), drawn
    in parameter order; the predictive is the mean of the S networks' softmax (here by hand)."""
    _, teacher = _load(teachers[Bayes.vi])
    x, index = _inputs(tiny_data)
    params = dict(teacher.model.named_parameters())
    want = 0
    for draw in range(teacher.samples):
        gen = torch.Generator().manual_seed(draw_seed(teacher.noise_seed, draw))
        w = {name: mu + F.softplus(params[name.replace("mu_", "rho_")]) * torch.randn(mu.shape, generator=gen)
             for name, mu in params.items() if ".mu_" in name}
        z = teacher.model.features[0](x)  # the training split's standardisation (data.standardize)
        hidden = torch.relu(z @ w["features.1.mu_weight"].T + w["features.1.mu_bias"])
        logits = hidden @ w["head.mu_weight"].T + w["head.mu_bias"]
        want = want + torch.softmax(logits / (teacher.calibration_temperature * 2.0), 1) / teacher.samples
    torch.testing.assert_close(teacher.predict_probs(x, index, 2.0), want)
    torch.manual_seed(123)
    assert not torch.allclose(teacher.model(x), teacher.model(x))  # training-time layers sample anew


def test_mc_dropout_predictive_by_hand(teachers, tiny_data):
    """logits_s = head(mask_s * relu(W x + b)); mask_s is row (bits s of hash(seed, 1, i) mod 1024) of
    1024 masks (rand >= p) / (1 - p) drawn from a generator seeded by (seed, stream), stream = 1 + s."""
    payload, teacher = _load(teachers[Bayes.mc_dropout])
    rate = payload["model"]["dropout"]
    x, index = _inputs(tiny_data)
    standardize, linear, head = teacher.model.features[0], teacher.model.features[1], teacher.model.head
    hidden = torch.relu(linear(standardize(x)))
    want = 0
    for draw in range(teacher.samples):
        stream = 1 + draw
        gen = torch.Generator().manual_seed(teacher.noise_seed * 1_000_003 + stream)
        pool = (torch.rand(1024, hidden.shape[1], generator=gen) >= rate).float() / (1 - rate)
        rows = index_bits(teacher.noise_seed, index, teacher.samples, 1)[:, draw] % 1024  # one dropout layer
        logits = head(hidden * pool[rows])
        want = want + torch.softmax(logits / teacher.calibration_temperature, 1) / teacher.samples
    torch.testing.assert_close(teacher.predict_probs(x, index), want)


def test_mc_dropout_masks_of_one_example_are_independent_bernoulli():
    """Over many draws one example's masks keep each unit with probability 1 - p, independently of
    the other units and of the previous draw (each draw has its own pool)."""
    model = build_model(model_spec("mlp", (4,), 3, (64,), dropout=0.25))
    teacher = MCDropoutTeacher(model, samples=1, noise_seed=7)
    draws = 2000
    rows = mask_rows(7, torch.tensor([5]), draws)[0]  # example 5, one dropout layer
    keep = torch.stack([mask_pool(7, mask_stream(0, s), 64, 0.25)[rows[s]] for s in range(draws)]) > 0  # [draws, 64]
    assert abs(keep.float().mean().item() - 0.75) < 0.01  # 128,000 Bernoulli(0.75): sd 0.0012
    lag = (keep[1:] & keep[:-1]).float().mean().item()  # P(kept twice in a row) = 0.75^2 if independent
    pair = (keep[:, 0] & keep[:, 1]).float().mean().item()
    assert abs(lag - 0.5625) < 0.01 and abs(pair - 0.5625) < 0.04
    assert teacher.trunk(torch.ones(2, 4)).shape == (2, 64)  # the layers before the first dropout run once


def test_ensemble_predictive_is_the_mean_of_its_members(teachers, tiny_data):
    payload, teacher = _load(teachers[Bayes.ensemble])
    assert len(payload["posterior"]["members"]) == 1 and payload["predictive"]["members"] == 2
    x, index = _inputs(tiny_data)
    t = teacher.calibration_temperature * 1.5
    want = sum(torch.softmax(m(x) / t, 1) for m in teacher.members) / 2
    torch.testing.assert_close(teacher.predict_probs(x, index, 1.5), want)
    assert not torch.allclose(teacher.members[0](x), teacher.members[1](x))  # different seeds


def test_temperature_teacher_stores_the_nll_minimising_temperature(teachers, tiny_data):
    payload, teacher = _load(teachers[Bayes.temperature])
    held = tiny_data.heldout
    teacher.calibration_temperature = 1.0
    fitted = fit_temperature(teacher.predictive_at(held.inputs, torch.arange(len(held))), held.labels)
    assert payload["predictive"]["calibration_temperature"] == pytest.approx(fitted, rel=1e-6)
    assert payload["history"]["temperature"] != 1.0


@pytest.mark.parametrize("kind", [Bayes.vi, Bayes.mc_dropout, Bayes.ensemble])
def test_sampled_predictive_does_not_depend_on_batch_layout(teachers, tiny_data, kind):
    _, teacher = _load(teachers[kind])
    x, index = _inputs(tiny_data)
    whole = teacher.predict_probs(x, index)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    teacher.batch_size = 7  # other chunks, other order
    torch.testing.assert_close(teacher.predict_probs(x[perm], index[perm]), whole[perm], rtol=0, atol=1e-6)


def test_mc_dropout_masks_depend_on_the_example_index(teachers, tiny_data):
    _, teacher = _load(teachers[Bayes.mc_dropout])
    x = tiny_data.heldout.inputs[:1].repeat(2, 1)
    probs = teacher.predict_probs(x, torch.tensor([3, 4]))
    assert not torch.allclose(probs[0], probs[1])  # same input, other example: other masks
    torch.testing.assert_close(teacher.predict_probs(x, torch.tensor([3, 3]))[1], probs[0])


# ----------------------------------------------------------------------------------------- MCMI, MSE effects

def test_mcmi_weight_sign_raises_or_lowers_the_cmi(single_thread, tmp_path, tiny_data):
    """lambda > 0 (the original MCMI) ends with a larger CMI estimate than lambda < 0."""
    base = train_teacher.run(build_recipe(_tree(Bayes.none, tmp_path / "base")))
    cmi = {}
    for weight in (1.0, -1.0):
        path = train_teacher.run(build_recipe(_tree(Bayes.mcmi, tmp_path / str(weight), base=str(base),
                                                    mcmi={"weight": weight, "epochs": 5})))
        _, teacher = _load(path)
        centroids = class_centroids(teacher.model, tiny_data)
        with torch.no_grad():
            logits = teacher.model(tiny_data.train.inputs)
        cmi[weight] = float(losses.cmi_to_centroids(logits, centroids[tiny_data.train.labels]).mean())
    assert cmi[1.0] > 1.2 * cmi[-1.0]


def test_mse_teacher_logits_estimate_probabilities(single_thread, tiny_data, tmp_path):
    """MSE to one-hot labels drives the logits towards P(y|x): rows sum to about 1 (after 30 short epochs)."""
    _, teacher = _load(train_teacher.run(build_recipe(_tree(Bayes.mse, tmp_path / "mse", epochs=30))))
    with torch.no_grad():
        sums = teacher.model(tiny_data.heldout.inputs).sum(1)
    assert abs(float(sums.mean()) - 1.0) < 0.1


# ----------------------------------------------------------------------------------- checkpoints, processes

_CHILD = """
import sys, torch
from bcpkd_cli import artifacts
from bcpkd_cli.teachers import load_teacher
batch = torch.load(sys.argv[1], weights_only=True)
out = {}
for name, path in batch["teachers"].items():
    payload = artifacts.load_checkpoint(path, artifacts.TEACHER_FORMAT)
    out[name] = load_teacher(payload, torch.device("cpu")).predict_probs(batch["inputs"], batch["index"], 2.0)
torch.save(out, sys.argv[2])
"""


def test_every_kind_gives_the_same_predictive_in_another_process(teachers, tiny_data, tmp_path):
    x, index = _inputs(tiny_data)
    want = {}
    for kind, path in teachers.items():
        payload, teacher = _load(path)
        assert payload["bayes"] == kind.value
        want[kind.value] = teacher.predict_probs(x, index, 2.0)
        torch.testing.assert_close(want[kind.value].sum(1), torch.ones(len(x)))
    torch.save({"teachers": {k.value: str(p) for k, p in teachers.items()}, "inputs": x, "index": index},
               tmp_path / "batch.pt")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for name, probs in want.items():
        assert torch.equal(got[name], probs), name


def test_ensemble_assembled_from_checkpoints(teachers, tiny_data, tmp_path):
    members = [str(teachers[Bayes.none]), str(teachers[Bayes.mcmi])]
    path = train_teacher.run(build_recipe(_tree(Bayes.ensemble, tmp_path / "e", ensemble={"checkpoints": members})))
    payload, teacher = _load(path)
    assert payload["history"]["members_sha256"] == [artifacts.sha256_file(p) for p in map(artifacts.Path, members)]
    x, index = _inputs(tiny_data)
    want = sum(_load(p)[1].predict_probs(x, index) for p in members) / 2
    torch.testing.assert_close(teacher.predict_probs(x, index), want)


def test_ensemble_of_other_architectures_or_kinds_is_refused(teachers, tmp_path):
    wide = train_teacher.run(build_recipe(_tree(Bayes.none, tmp_path / "wide", hidden=[12], epochs=1)))
    tree = _tree(Bayes.ensemble, tmp_path / "e", ensemble={"checkpoints": [str(teachers[Bayes.none]), str(wide)]})
    with pytest.raises(BcpkdError, match="share one architecture"):
        train_teacher.run(build_recipe(tree))
    tree = _tree(Bayes.ensemble, tmp_path / "e", ensemble={"checkpoints": [str(teachers[Bayes.vi])] * 2})
    with pytest.raises(BcpkdError, match="is a vi teacher"):
        train_teacher.run(build_recipe(tree))
    assert not (tmp_path / "e").exists()


def test_bad_teacher_settings_are_reported_together():
    with pytest.raises(BcpkdError) as err:
        build_recipe({"teacher": {"bayes": "mse", "base": "t.pt", "mc_dropout": {"rate": 1.5},
                                  "ensemble": {"members": 1, "checkpoints": ["a.pt", "b.pt"]}, "vi": {"samples": 0}}},
                     checks=(recipe_problems,))
    for fragment in ("teacher.base", "mc_dropout.rate", "ensemble.members", "vi.samples", "only a --bayes ensemble"):
        assert fragment in str(err.value)
    with pytest.raises(BcpkdError, match="leave no epoch"):
        build_recipe({"teacher": {"bayes": "vi", "epochs": 20, "vi": {"ml_epochs": 20}}}, checks=(recipe_problems,))


# ------------------------------------------------------------------------- the whole chain for every kind

def _chain(teacher_path, tree, tmp_path) -> tuple[dict, dict]:
    student = distill.run(build_recipe({**tree, "out": str(tmp_path / "s")}), teacher_path)
    payload = torch.load(student, weights_only=True)
    cache = artifacts.Path(payload["targets"]["cache"])
    probs, meta = artifacts.load_cache(cache, {})
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:2]), atol=1e-5)
    report = evaluate.evaluate_one(student, {"device": "cpu"})["metrics"]
    teacher_report = evaluate.evaluate_one(cache.parent / "teacher.pt", {"device": "cpu"})["metrics"]
    return meta, {"student": report, "teacher": teacher_report}


@pytest.mark.parametrize("kind", KINDS, ids=[k.value for k in KINDS])
def test_every_kind_calibrates_caches_distills_and_evaluates(teachers, kind, tmp_path):
    meta, reports = _chain(teachers[kind], TINY, tmp_path)
    assert meta["bayes"] == kind.value and meta["predictive"]["calibration_temperature"] > 0
    assert 0.0 <= reports["student"]["accuracy"] <= 1.0 and math.isfinite(reports["teacher"]["kl_to_bcp"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS, ids=[k.value for k in KINDS])
def test_every_kind_on_a_tiny_image_folder(single_thread, image_folder, kind, tmp_path):
    tree = {"device": "cpu", "data": {"name": "imagefolder", "root": str(image_folder), "n_heldout": 15},
            "teacher": {"bayes": kind.value, "arch": "resnet8x4", "epochs": 1, "batch_size": 25,
                        "vi": {"samples": 2, "ml_epochs": 0, "anneal_epochs": 1}, "mc_dropout": {"samples": 2},
                        "ensemble": {"members": 2}, "mcmi": {"epochs": 1}},
            "calibrate": {"views": 2, "temperature": "fit", "batch_size": 64},
            "distill": {"arch": "wrn_16_1", "epochs": 1, "batch_size": 25, "log_every": 2}}
    teacher = train_teacher.run(build_recipe({**tree, "out": str(tmp_path / "t")}))
    meta, reports = _chain(teacher, tree, tmp_path)
    assert meta["n_views"] == 2 and len(meta["views"]["ids"]) == 2
    assert "kl_to_bcp" not in reports["teacher"] and 0.0 <= reports["teacher"]["accuracy"] <= 1.0


def test_sampled_kinds_temper_each_draw_or_the_average(teachers, tiny_data):
    """calibrate.temper: logits averages softmax(z_s / T) over draws; predictive tempers the average."""
    from bcpkd_cli.calibration import at_temperature
    from bcpkd_cli.choices import Temper

    _, teacher = _load(teachers[Bayes.ensemble])
    x, index = _inputs(tiny_data)
    with torch.no_grad():
        logits = torch.stack([member(x) for member in teacher.members])  # [M, B, C]
    t = 2.0 * teacher.calibration_temperature
    each = torch.softmax(logits / t, dim=2).mean(0)
    average = torch.softmax(torch.softmax(logits / teacher.calibration_temperature, dim=2).mean(0).log() / 2.0, dim=1)
    predictive = teacher.predictive_at(x, index)
    torch.testing.assert_close(at_temperature(predictive, 2.0, Temper.logits), each, atol=1e-6, rtol=0)
    torch.testing.assert_close(at_temperature(predictive, 2.0, Temper.predictive), average, atol=1e-6, rtol=0)
