"""Every teacher kind as one deployable graph (`Teacher.deployable`): what it computes against the teacher's own
predictive, fixed draws of the sampling kinds, and tracing with torch.export at a dynamic batch size."""

from __future__ import annotations

import pytest
import torch

from bcpkd_cli import artifacts
from bcpkd_cli.config import build_recipe
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.stages import train_teacher
from bcpkd_cli.teachers import load_teacher
from bcpkd_cli.teachers.mc_dropout import fixed_masks, mask_pool, mask_stream

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one thread, here and in the CLI

TINY = {"device": "cpu", "data": {"n_train": 300, "n_heldout": 100, "n_test": 100},
        "teacher": {"hidden": [16], "epochs": 3, "batch_size": 32,
                    "vi": {"samples": 4, "ml_epochs": 1, "anneal_epochs": 1},
                    "mc_dropout": {"samples": 4}, "ensemble": {"members": 2}, "mcmi": {"epochs": 2}}}
SINGLE = ["none", "temperature", "mse", "mcmi"]
LAPLACE = {"laplace-kron": ("last_layer", "kron", "probit"), "laplace-diag": ("last_layer", "diag", "probit"),
           "laplace-full": ("last_layer", "full", "probit"), "laplace-kron-mc": ("last_layer", "kron", "mc"),
           "laplace-all-diag": ("all", "diag", "probit")}
EXACT = [*SINGLE, "ensemble", "laplace-kron", "laplace-diag", "laplace-full"]
ALL = [*SINGLE, "ensemble", "mc-dropout", "vi", *LAPLACE]
T_CAL = 1.3  # every teacher but the temperature kind's (fitted) is given this calibration temperature


def _tree(out, bayes: str, **teacher) -> dict:
    return {**TINY, "out": str(out), "teacher": {**TINY["teacher"], "bayes": bayes, **teacher}}


@pytest.fixture(scope="module")
def paths(single_thread, tmp_path_factory):
    """name -> teacher.pt of one tiny teacher per kind, and Laplace teachers (around the `none` one) per posterior."""
    work = tmp_path_factory.mktemp("deployable")
    found = {name: train_teacher.run(build_recipe(_tree(work / name, name)))
             for name in [*SINGLE, "ensemble", "mc-dropout", "vi"]}
    for name, (subset, hessian, link) in LAPLACE.items():
        laplace = {"subset": subset, "hessian": hessian, "link": link, "samples": 8}
        found[name] = train_teacher.run(build_recipe(_tree(work / name, "laplace", base=str(found["none"]),
                                                           laplace=laplace)))
    return found


def _teacher(paths, name: str, **predictive):
    payload = artifacts.load_checkpoint(paths[name], artifacts.TEACHER_FORMAT)
    payload["predictive"].update(predictive)
    teacher = load_teacher(payload, torch.device("cpu"))
    if name != "temperature":
        teacher.calibration_temperature = T_CAL
    return teacher


def _inputs(tiny_data, n: int = 40) -> torch.Tensor:
    return tiny_data.heldout.inputs[:n]


def _outputs(deployed, x: torch.Tensor):
    """Runs the module; checks the contract every deployable keeps; its outputs."""
    with torch.no_grad():
        outputs = deployed.module(x)
    logits, probs = outputs[:2]
    assert len(outputs) == (3 if deployed.epistemic else 2) and not deployed.module.training
    assert logits.shape == probs.shape == (len(x), probs.shape[1])
    torch.testing.assert_close(torch.softmax(logits, dim=1), probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(x)))
    if deployed.epistemic:
        assert outputs[2].shape == (len(x),) and bool((outputs[2] >= 0).all())
    return outputs


@pytest.mark.parametrize("name", EXACT)
def test_exact_kinds_are_the_teachers_own_predictive(paths, tiny_data, name):
    teacher = _teacher(paths, name)
    x = _inputs(tiny_data)
    deployed = teacher.deployable()
    assert deployed.exact and f"T_cal {teacher.calibration_temperature:.3f}" in deployed.predictive
    _, probs, *_ = _outputs(deployed, x)
    torch.testing.assert_close(probs, teacher.predict_probs(x, torch.arange(len(x))), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["mc-dropout", "laplace-kron-mc", "laplace-all-diag"])
def test_other_kinds_deploy_their_mean_network_and_say_so(paths, tiny_data, name):
    teacher = _teacher(paths, name)
    x = _inputs(tiny_data)
    deployed = teacher.deployable()
    assert not deployed.exact and deployed.epistemic is None
    assert deployed.predictive.startswith("MAP network" if name.startswith("laplace") else "mean network")
    _, probs = _outputs(deployed, x)
    with torch.no_grad():
        want = torch.softmax(teacher.model.eval()(x) / T_CAL, dim=1)  # dropout off
    torch.testing.assert_close(probs, want, atol=1e-6, rtol=0)
    assert (probs - teacher.predict_probs(x, torch.arange(len(x)))).abs().max() > 1e-4


def test_vi_mean_network_has_the_posterior_means_as_weights(paths, tiny_data):
    teacher = _teacher(paths, "vi")
    x = _inputs(tiny_data)
    deployed = teacher.deployable()
    assert not deployed.exact and deployed.predictive.startswith("mean network (posterior means")
    mu = {name: p for name, p in teacher.model.named_parameters() if ".mu_" in name}
    with torch.no_grad():
        hidden = torch.relu(teacher.model.features[0](x) @ mu["features.1.mu_weight"].T + mu["features.1.mu_bias"])
        logits = hidden @ mu["head.mu_weight"].T + mu["head.mu_bias"]
    torch.testing.assert_close(_outputs(deployed, x)[1], torch.softmax(logits / T_CAL, dim=1), atol=1e-6, rtol=0)


def test_vi_with_its_own_sample_count_is_exact(paths, tiny_data):
    teacher = _teacher(paths, "vi")
    x = _inputs(tiny_data)
    deployed = teacher.deployable(draws=teacher.samples)
    assert deployed.exact and "the teacher's own predictive" in deployed.predictive
    torch.testing.assert_close(_outputs(deployed, x)[1], teacher.predict_probs(x, torch.arange(len(x))),
                               atol=1e-5, rtol=0)
    assert not teacher.deployable(draws=teacher.samples + 1).exact


@pytest.mark.parametrize("name", ["mc-dropout", "vi"])
def test_fixed_draws_are_deterministic_and_approach_the_predictive(paths, tiny_data, name):
    teacher = _teacher(paths, name)
    x = _inputs(tiny_data)
    three = teacher.deployable(draws=3)
    assert three.epistemic == "mutual_information" and three.predictive.startswith("3 fixed seeded")
    assert not three.exact
    probs = _outputs(three, x)[1]
    torch.testing.assert_close(_outputs(teacher.deployable(draws=3), x)[1], probs, atol=0, rtol=0)
    assert (probs - _outputs(teacher.deployable(), x)[1]).abs().max() > 1e-4
    many = _teacher(paths, name, samples=400)  # the predictive nearly without Monte Carlo noise
    want = many.predict_probs(x, torch.arange(len(x)))

    def distance(draws: int) -> float:
        return float((_outputs(many.deployable(draws), x)[1] - want).abs().sum(1).mean())

    assert distance(200) < 0.5 * distance(2)


def test_mc_dropout_fixed_mask_s_is_row_0_of_the_pool_of_draw_s():
    masks = fixed_masks(7, 1, 5, 12, 0.25)
    assert masks.shape == (5, 1, 12)
    for s in range(5):
        assert torch.equal(masks[s, 0], mask_pool(7, mask_stream(1, s), 12, 0.25)[0])
    assert torch.equal(fixed_masks(7, 1, 3, 12, 0.25), masks[:3])  # the first draws do not depend on K


def test_mutual_information_of_an_ensemble_by_hand(paths, tiny_data):
    teacher = _teacher(paths, "ensemble")
    x = _inputs(tiny_data)
    members = teacher.draws_at(x, torch.arange(len(x)))(1.0)  # [M, B, C]
    mean = members.mean(0)

    def entropy(p):
        return -(p * p.log()).sum(-1)

    want = entropy(mean) - entropy(members).mean(0)
    torch.testing.assert_close(_outputs(teacher.deployable(), x)[2], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["laplace-kron", "laplace-diag", "laplace-full"])
def test_laplace_epistemic_output_is_the_predicted_class_logit_variance(paths, tiny_data, name):
    teacher = _teacher(paths, name)
    x = _inputs(tiny_data)
    _, probs, variance = _outputs(teacher.deployable(), x)
    _, f_var = teacher.logit_moments(x)  # [B, C] at T = 1
    want = f_var.gather(1, probs.argmax(1, keepdim=True)).squeeze(1) / T_CAL**2
    torch.testing.assert_close(variance, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", [*SINGLE, "ensemble", *LAPLACE])
def test_draws_are_refused_by_kinds_without_them(paths, name):
    with pytest.raises(BcpkdError, match="--draws 4: only vi and mc-dropout teachers deploy as fixed draws"):
        _teacher(paths, name).deployable(draws=4)


def test_negative_draws_are_refused(paths):
    with pytest.raises(BcpkdError, match="--draws -1"):
        _teacher(paths, "vi").deployable(draws=-1)


def _exported_matches(module, x: torch.Tensor, other: torch.Tensor) -> None:
    """torch.export with a dynamic batch at x's batch size; the program equals the module at another batch size."""
    program = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    with torch.no_grad():
        want = module(other)
    for got, expected in zip(program.module()(other), want, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("name", "draws"), [*[(name, 0) for name in ALL], ("mc-dropout", 3), ("vi", 3)])
def test_torch_export_traces_every_kind_with_a_dynamic_batch(paths, tiny_data, name, draws):
    _exported_matches(_teacher(paths, name).deployable(draws).module, _inputs(tiny_data, 8), _inputs(tiny_data, 5))


def test_laplace_probit_exports_to_onnx(paths, tiny_data, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    module = _teacher(paths, "laplace-kron").deployable().module
    x = _inputs(tiny_data, 8)
    torch.onnx.export(module, (x,), tmp_path / "t.onnx", dynamo=True, opset_version=18,
                      dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    session = onnxruntime.InferenceSession(str(tmp_path / "t.onnx"))
    other = _inputs(tiny_data, 5)
    got = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    with torch.no_grad():
        want = module(other)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(torch.from_numpy(g), w, atol=1e-5, rtol=1e-5)


def test_image_teacher_last_layer_kron_laplace(single_thread, image_folder, tmp_path):
    """resnet20 (BatchNorm, uint8 images normalised inside): the probit graph is the teacher's predictive."""
    tree = {"device": "cpu", "out": str(tmp_path / "t"),
            "data": {"name": "imagefolder", "root": str(image_folder), "n_heldout": 15},
            "teacher": {"bayes": "laplace", "arch": "resnet20", "epochs": 1, "batch_size": 25}}
    teacher = _teacher({"image": train_teacher.run(build_recipe(tree))}, "image")
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    deployed = teacher.deployable()
    assert deployed.exact and deployed.epistemic == "logit_variance"
    torch.testing.assert_close(_outputs(deployed, images)[1], teacher.predict_probs(images, torch.arange(6)),
                               atol=1e-5, rtol=0)
    _exported_matches(deployed.module, images, images[:3])
    _exported_matches(deployed.module, images.float() / 255, images[:4].float() / 255)
