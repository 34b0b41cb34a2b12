"""How inputs are scaled (`teacher.normalize`, `distill.normalize`): data, imagenet, none or a {mean, std}
mapping; exact values inside the built model, validation, the run's first line and checkpoints that keep it."""

from __future__ import annotations

import json

import pytest
import torch

from bcpkd_cli import artifacts
from bcpkd_cli.choices import Normalize
from bcpkd_cli.config import build_recipe, parse_set, read_recipe
from bcpkd_cli.models import CIFAR10_STATS, IMAGENET_STATS, ImageInput, build_model, model_spec, scaling_name
from bcpkd_cli.teachers import load_teacher
from cli_helpers import STAGE_HEADER, files_under, here, refused_here

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one thread, here and in the CLI

DATA_STATS = {"mean": [0.25, 0.5, 0.75], "std": [0.125, 0.25, 0.5]}  # exact in binary: exact expected values
MINE = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
PIXELS = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3).contiguous()
IMAGES = ["--set", "data.n_heldout=15", "--device", "cpu", "--arch", "resnet8x4", "--epochs", "0"]


def _images(folder) -> list[str]:
    return ["--data", "imagefolder", "--data-root", str(folder), *IMAGES]


def _scaled(pixels: torch.Tensor, stats: dict) -> torch.Tensor:
    """The normalised images, computed in float64 by hand."""
    x = pixels.double() / 255
    return (x - torch.tensor(stats["mean"], dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(stats["std"], dtype=torch.float64).view(1, 3, 1, 1)


@pytest.mark.parametrize("choice, name, stats", [
    ("data", "data", DATA_STATS), ("imagenet", "imagenet", IMAGENET_STATS), ("none", "none", None),
    (MINE, "custom", MINE), (True, "data", DATA_STATS), (False, "none", None), (Normalize.imagenet, "imagenet",
                                                                                 IMAGENET_STATS)])
def test_each_choice_gives_its_exact_mean_std_and_output(choice, name, stats):
    spec = model_spec("resnet8x4", (3, 1, 3), 3, (), stats=DATA_STATS, normalize=choice)
    assert spec["normalize"] == name and spec["stats"] == stats and scaling_name(spec) == name
    first = build_model(spec).features[0]
    assert isinstance(first, ImageInput)
    out = first(PIXELS)
    if stats is None:
        assert not hasattr(first, "mean")
        assert torch.equal(out, PIXELS.float() / 255)
        return
    assert torch.equal(first.mean.flatten(), torch.tensor(stats["mean"]))
    assert torch.equal(first.std.flatten(), torch.tensor(stats["std"]))
    torch.testing.assert_close(out.double(), _scaled(PIXELS, stats), atol=1e-6, rtol=0)


def test_known_values():
    imagenet = ImageInput(IMAGENET_STATS)(PIXELS)
    torch.testing.assert_close(imagenet[0, :, 0, 2], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                                                                   (1 - 0.406) / 0.225]))
    mine = ImageInput(MINE)(PIXELS)
    assert mine[0, 0, 0].tolist() == [-2.0, pytest.approx(-1.2, abs=1e-6), 2.0]  # (0, 0.2, 1) - 0.5) / 0.25


def test_vectors_keep_their_standardisation():
    feature_stats = {"mean": [1.0, 2.0], "std": [2.0, 4.0]}
    assert model_spec("mlp", (2,), 3, (4,), stats=feature_stats)["stats"] == feature_stats
    assert model_spec("mlp", (2,), 3, (4,), stats=feature_stats, normalize=False)["stats"] is None
    assert model_spec("mlp", (2,), 3, (4,), stats=None)["normalize"] == "none"  # data.standardize off


def test_the_old_booleans_mean_data_and_none(image_folder, tmp_path):
    images = ["data.name=imagefolder", f"data.root={image_folder}"]
    for old, new in (("true", "data"), ("false", "none"), ("yes", "data")):
        a = build_recipe(parse_set([*images, f"teacher.normalize={old}", f"distill.normalize={old}"]))
        b = build_recipe(parse_set([*images, f"teacher.normalize={new}", f"distill.normalize={new}"]))
        assert a == b and a.teacher.normalize == Normalize(new) == a.distill.normalize
    (tmp_path / "old.yaml").write_text("teacher:\n  normalize: false\ndistill:\n  normalize: true\n")
    recipe = build_recipe(read_recipe(tmp_path / "old.yaml"))
    assert (recipe.teacher.normalize, recipe.distill.normalize) == (Normalize.none, Normalize.data)
    assert model_spec("resnet8x4", (3, 8, 8), 3, (), stats=DATA_STATS, normalize=True) == \
        model_spec("resnet8x4", (3, 8, 8), 3, (), stats=DATA_STATS, normalize="data")


def test_a_mapping_through_set_and_a_recipe(image_folder, tmp_path):
    images = ["data.name=imagefolder", f"data.root={image_folder}"]
    recipe = build_recipe(parse_set([*images, "teacher.normalize={mean: [0.5,0.5,0.5], std: [0.25,0.25,0.25]}"]))
    assert recipe.teacher.normalize == MINE
    (tmp_path / "mine.yaml").write_text("distill:\n  normalize: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}\n")
    assert build_recipe({**read_recipe(tmp_path / "mine.yaml"), **parse_set(images)}).distill.normalize == MINE


@pytest.mark.parametrize("value, says", [
    ("{mean: [0.5, 0.5], std: [0.25, 0.25, 0.25]}", "teacher.normalize.mean: expected 3 numbers"),
    ("{mean: [0.5, 0.5, 0.5], std: [0.25, 0, 0.25]}", "teacher.normalize.std: every value must be > 0"),
    ("{mean: [124, 116, 104], std: [58, 57, 57]}", "teacher.normalize.mean: values are in [0, 1] units"),
    ("{mean: [0.5, 0.5, 0.5]}", "teacher.normalize: a mapping takes the keys mean and std"),
    ("imagenett", "teacher.normalize: 'imagenett' is not one of: data, imagenet, none"),
])
def test_a_bad_value_is_one_error_naming_the_key(image_folder, tmp_path, value, says):
    message = refused_here("train-teacher", "--set", f"teacher.normalize={value}", "--out", "t",
                           *_images(image_folder), cwd=tmp_path)
    assert message.startswith("error:") and says in message
    assert files_under(tmp_path) == set()


def test_channel_statistics_are_refused_for_vectors(tmp_path):
    message = refused_here("train-teacher", "--normalize", "imagenet", "--device", "cpu", "--out", "t", cwd=tmp_path)
    assert "teacher.normalize: imagenet normalises image channels" in message


def _first_lines(capsys) -> list[str]:
    """What a run said on stderr before its training began (or said it had nothing to train)."""
    said = capsys.readouterr().err.splitlines()
    return said[:next(i for i, s in enumerate(said) if " epochs" in s and not STAGE_HEADER.match(s))]


def test_the_first_line_names_the_choice(single_thread, image_folder, tmp_path, capsys):
    here("train-teacher", "--normalize", "imagenet", "--out", "a", *_images(image_folder), cwd=tmp_path)
    assert "inputs: images scaled to [0, 1], normalised with ImageNet's mean/std, as torchvision's pretrained " \
           "weights expect (teacher.normalize=imagenet; mean 0.485,0.456,0.406 std 0.229,0.224,0.225)" \
        in _first_lines(capsys)
    here("train-teacher", "--out", "b", *_images(image_folder), cwd=tmp_path)
    line = next(s for s in _first_lines(capsys) if s.startswith("inputs:"))
    assert line.startswith("inputs: images scaled to [0, 1], normalised with the training data's channel mean/std "
                           "(teacher.normalize=data; mean ")
    here("distill", "--targets", "onehot", "--normalize", "false", "--out", "s", *_images(image_folder), cwd=tmp_path)
    assert "inputs: images scaled to [0, 1], not normalised (the network normalises itself; distill.normalize=none)" \
        in _first_lines(capsys)


def test_a_checkpoint_records_the_choice_and_its_reload_applies_it(single_thread, image_folder, tmp_path):
    teacher = here("train-teacher", "--set", "teacher.normalize={mean: [0.5,0.5,0.5], std: [0.25,0.25,0.25]}",
                   "--out", "t", *_images(image_folder), cwd=tmp_path).strip()
    payload = artifacts.load_checkpoint(tmp_path / teacher, artifacts.TEACHER_FORMAT)
    assert payload["model"]["normalize"] == "custom" and payload["model"]["stats"] == MINE
    assert payload["config"]["teacher"]["normalize"] == MINE
    network = load_teacher(payload, torch.device("cpu")).model
    assert torch.equal(network.features[0].mean.flatten(), torch.tensor(MINE["mean"]))
    # the same weights without the normalisation, fed the images normalised by hand: the same logits
    bare = build_model({**payload["model"], "stats": None}, payload["state_dict"]).eval()
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(network.eval()(pixels), bare(_scaled(pixels, MINE).float()), atol=1e-5, rtol=0)
    report = json.loads(here("evaluate", teacher, "--json", "--device", "cpu", cwd=tmp_path))[0]
    assert report["normalize"] == "custom"


def test_a_checkpoint_that_says_true_still_loads(single_thread, image_folder, tmp_path):
    """Checkpoints from before the choices had names: config `normalize: true` and no `model.normalize`."""
    teacher = here("train-teacher", "--out", "t", *_images(image_folder), cwd=tmp_path).strip()
    payload = artifacts.load_checkpoint(tmp_path / teacher, artifacts.TEACHER_FORMAT)
    assert payload["model"]["normalize"] == "data" and payload["config"]["teacher"]["normalize"] == "data"
    payload["config"]["teacher"]["normalize"] = True
    del payload["model"]["normalize"]
    artifacts.save_checkpoint(tmp_path / "old.pt", payload)
    old = artifacts.load_checkpoint(tmp_path / "old.pt", artifacts.TEACHER_FORMAT)
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    probs = [load_teacher(p, torch.device("cpu")).predict_probs(pixels, torch.arange(4)) for p in (payload, old)]
    assert torch.equal(*probs) and scaling_name(old["model"]) == "data"
    report = json.loads(here("evaluate", "old.pt", "--json", "--device", "cpu", cwd=tmp_path))[0]
    assert report["normalize"] == "data"
    here("distill", "--teacher", "old.pt", "--epochs", "0", "--out", "s", *IMAGES, cwd=tmp_path)


def test_specs_from_before_the_choice_was_recorded():
    assert scaling_name({"input_shape": [3, 8, 8], "stats": None}) == "none"
    assert scaling_name({"input_shape": [3, 8, 8]}) == "data"  # CIFAR-10's statistics, as build_model uses
    assert build_model({"arch": "resnet8x4", "input_shape": [3, 8, 8], "n_classes": 3, "hidden": []}) \
        .features[0].mean.flatten().tolist() == pytest.approx(CIFAR10_STATS["mean"])


def test_the_flags_carry_the_config_fields_help_and_list_the_choices():
    import typer.main

    from bcpkd_cli.cli import app
    from bcpkd_cli.commands.options import field_help

    commands = typer.main.get_command(app).commands
    for command, section in (("train-teacher", "teacher"), ("distill", "distill")):
        option = next(p for p in commands[command].params if p.name == "normalize")
        assert option.help == field_help(f"{section}.normalize") and option.help.endswith("[default: data]")
        assert all(choice in option.help for choice in ("data", "imagenet", "none", "{mean: [3], std: [3]}"))


def test_resume_compares_old_booleans_as_the_names_they_mean():
    from bcpkd_cli.resumption import settings_of

    stored = {"teacher": {"normalize": True}, "distill": {"normalize": False}}
    assert settings_of(stored, ("teacher", "distill"), ()) == {"teacher": {"normalize": "data"},
                                                                "distill": {"normalize": "none"}}
