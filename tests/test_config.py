"""Recipes: defaults, validation that reports every problem at once, --set parsing, merging, files."""

from __future__ import annotations

from pathlib import Path

import pytest

from bcpkd_cli.config import (
    Bayes, CacheDtype, DataConfig, Hessian, Optimizer, PriorTuning, Recipe, Subset, Targets, build_recipe, merge,
    parse_set, read_recipe, to_plain,
)
from bcpkd_cli import pipeline
from bcpkd_cli.errors import BcpkdError

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").rglob("*.yaml"))


def test_build_recipe_defaults():
    recipe = build_recipe({})
    default = Recipe()  # its architectures unset: the built recipe's follow the (synthetic, vector) data
    assert recipe.teacher.arch == recipe.distill.arch == "mlp" and default.teacher.arch == default.distill.arch == ""
    assert recipe == build_recipe({"teacher": {"arch": "mlp"}, "distill": {"arch": "mlp"}})
    assert (recipe.data, recipe.calibrate, recipe.evaluate) == (default.data, default.calibrate, default.evaluate)
    assert recipe.device == "auto" and recipe.out == ""
    assert recipe.data.n_train == 0 and recipe.data.n_heldout == -1 and recipe.data.n_test == 0  # dataset defaults
    assert recipe.data.n_classes == 5 and recipe.data.dim == 30 and recipe.data.noise_var == 2.5
    assert recipe.data.mean_choices == (4.0, 5.0, 6.0)
    assert recipe.teacher.bayes is Bayes.none and recipe.teacher.hidden == (256, 256)
    assert recipe.teacher.laplace.subset is Subset.last_layer and recipe.teacher.laplace.hessian is Hessian.kron
    assert recipe.calibrate.prior is PriorTuning.gridsearch and recipe.calibrate.cache_dtype is CacheDtype.float32
    assert recipe.distill.targets is Targets.teacher and recipe.distill.alpha == 1.0
    assert recipe.distill.t_teacher == 1.0 and recipe.distill.t_student == 1.0
    assert recipe.distill.optimizer is Optimizer.sgd and recipe.distill.batch_size == 8
    assert recipe.evaluate.ece_bins == 15 and recipe.evaluate.grad_targets == ()


def test_build_recipe_converts_values_to_field_types():
    recipe = build_recipe({"device": "cuda:1", "data": {"n_train": 10.0, "mean_choices": [1, 2]},
                           "teacher": {"bayes": "laplace", "hidden": "32,16", "laplace": {"hessian": "diag"}},
                           "distill": {"lr": "1e-3", "alpha": 0.25},
                           "evaluate": {"grad_targets": ["onehot", "noisy:0.5"]}})
    assert recipe.device == "cuda:1"
    assert recipe.data.n_train == 10 and isinstance(recipe.data.n_train, int)
    assert recipe.data.mean_choices == (1.0, 2.0) and all(isinstance(v, float) for v in recipe.data.mean_choices)
    assert recipe.teacher.bayes is Bayes.laplace and recipe.teacher.hidden == (32, 16)
    assert recipe.teacher.laplace.hessian is Hessian.diag and recipe.teacher.laplace.subset is Subset.last_layer
    assert recipe.distill.lr == pytest.approx(1e-3) and recipe.distill.alpha == 0.25
    assert recipe.evaluate.grad_targets == ("onehot", "noisy:0.5")


def test_all_problems_are_reported_in_one_error():
    tree = {
        "bogus": 1,                                             # unknown top-level key
        "data": {"n_trian": 5, "n_test": "many", "noise_var": 0},  # unknown key, bad type, not positive
        "teacher": {"bayes": "gaussian", "laplace": {"hessian": "dense"}, "epochs": 2.5},  # bad enums, bad int
        "distill": {"targets": "soft", "alpha": 1.5},           # bad enum, out of range
        "device": "tpu",
    }
    with pytest.raises(BcpkdError) as info:
        build_recipe(tree, source="my.yaml")
    message = str(info.value)
    assert message.startswith("my.yaml: 10 problem(s): ")
    fragments = [
        "bogus: unknown key (valid: calibrate, compile, data, device, distill, evaluate, experiment, log, out, "
        "precision, teacher, threads)",
        "data.n_trian: unknown key (valid: crop, decode, dim, download, image_size, label_column, loader_workers, "
        "max_length, mean_choices, n_classes, n_heldout, n_test, n_train, name, noise_var, root, seed, skip_unreadable, "
        "standardize, text_column, text_pair_column, view_padding)",
        "data.n_test: expected int, got 'many'",
        "data.noise_var: must be positive, got 0.0",
        "teacher.bayes: 'gaussian' is not one of: none, laplace",
        "teacher.laplace.hessian: 'dense' is not one of: diag, kron, full",
        "teacher.epochs: expected int, got 2.5",
        "distill.targets: 'soft' is not one of: teacher, online, onehot, true, noisy",
        "distill.alpha: must be in [0, 1], got 1.5",
        "device: 'tpu' is not one of: auto, cpu, cuda, cuda:N",
    ]
    for fragment in fragments:
        assert fragment in message, fragment


def test_bad_types_of_sections_and_lists():
    with pytest.raises(BcpkdError) as info:
        build_recipe({"data": 3, "teacher": {"hidden": 8}, "experiment": {"teachers": [1]},
                      "evaluate": {"grad_targets": ["noisy:x"]}})
    message = str(info.value)
    assert "4 problem(s)" in message
    assert "data: expected a mapping, got 3" in message
    assert "teacher.hidden: expected a list, got 8" in message
    assert "experiment.teachers: expected a mapping, got [1]" in message
    assert "evaluate.grad_targets: 'noisy:x' is not one of: onehot, true, noisy:ALPHA" in message


def test_bad_list_items_are_named_by_index():
    with pytest.raises(BcpkdError, match=r"teacher\.hidden\[1\]: expected int, got 'x'"):
        build_recipe({"teacher": {"hidden": [8, "x"]}})


def test_parse_set_nested_keys_and_yaml_scalars():
    tree = parse_set(["distill.alpha=0.5", "teacher.hidden=[8, 4]", "teacher.laplace.hessian=diag",
                      "data.mean_choices=[1.5, 2]", "data.n_train=40", "device=cpu", "out="])
    assert tree == {"distill": {"alpha": 0.5}, "teacher": {"hidden": [8, 4], "laplace": {"hessian": "diag"}},
                    "data": {"mean_choices": [1.5, 2], "n_train": 40}, "device": "cpu", "out": ""}
    assert isinstance(tree["distill"]["alpha"], float) and isinstance(tree["data"]["n_train"], int)
    recipe = build_recipe(tree)
    assert recipe.teacher.hidden == (8, 4) and recipe.data.mean_choices == (1.5, 2.0)
    assert recipe.teacher.laplace.hessian is Hessian.diag and recipe.distill.alpha == 0.5


def test_parse_set_later_items_win_and_values_may_hold_equals_signs():
    assert parse_set(["distill.alpha=0.1", "distill.alpha=0.2"]) == {"distill": {"alpha": 0.2}}
    assert parse_set(["out=a=b"]) == {"out": "a=b"}


def test_parse_set_rejects_malformed_items():
    with pytest.raises(BcpkdError, match="expected section.key=value"):
        parse_set(["distill.alpha"])
    with pytest.raises(BcpkdError, match="n_train is not a section"):
        parse_set(["data.n_train=5", "data.n_train.x=3"])


def test_yaml_true_for_targets_is_the_true_bcp_choice():
    import yaml

    tree = yaml.safe_load("distill:\n  targets: true\n")
    assert tree["distill"]["targets"] is True  # what YAML makes of it
    assert build_recipe(tree).distill.targets is Targets.true
    assert build_recipe(parse_set(["distill.targets=true"])).distill.targets is Targets.true


def test_merge_is_deep_and_does_not_mutate():
    base = {"data": {"n_train": 10, "seed": 1}, "distill": {"alpha": 1.0, "lr": 0.1}, "device": "cpu"}
    override = {"data": {"seed": 2}, "distill": {"alpha": 0.5}, "out": "x"}
    merged = merge(base, override)
    assert merged == {"data": {"n_train": 10, "seed": 2}, "distill": {"alpha": 0.5, "lr": 0.1},
                      "device": "cpu", "out": "x"}
    assert base == {"data": {"n_train": 10, "seed": 1}, "distill": {"alpha": 1.0, "lr": 0.1}, "device": "cpu"}
    assert merge({"a": {"b": 1}}, {"a": 3}) == {"a": 3}  # a scalar replaces a section
    assert merge({"a": 3}, {"a": {"b": 1}}) == {"a": {"b": 1}}


def test_read_recipe_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(BcpkdError) as info:
        read_recipe(path)
    assert str(path) in str(info.value) and "no such file" in str(info.value)


def test_read_recipe_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  n_train: 5\n  seed: [1, 2\n")
    with pytest.raises(BcpkdError) as info:
        read_recipe(path)
    message = str(info.value)
    assert str(path) in message and "not valid YAML" in message


def test_read_recipe_non_mapping_and_empty(tmp_path):
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(BcpkdError, match="expected a mapping"):
        read_recipe(listing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert read_recipe(empty) == {}
    assert read_recipe(None) == {}


def test_to_plain_round_trips_through_build_recipe():
    recipe = build_recipe({"teacher": {"bayes": "laplace", "hidden": [4]}, "distill": {"targets": "noisy"}})
    plain = to_plain(recipe)
    assert plain["teacher"]["bayes"] == "laplace" and plain["teacher"]["hidden"] == [4]
    assert build_recipe(plain) == recipe
    assert to_plain(DataConfig())["mean_choices"] == [4.0, 5.0, 6.0]


def test_there_are_recipes():
    assert RECIPES, "recipes/*.yaml is empty"


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_builds(path, tmp_path):
    tree = read_recipe(path)
    recipe = build_recipe(tree, str(path))
    assert isinstance(recipe, Recipe)
    # `bcpkd run` also validates every teacher and student sub-recipe before training
    from bcpkd_cli import pipeline

    teachers, jobs = pipeline._plan(tree, str(path), tmp_path)
    assert set(teachers) == set(recipe.experiment.teachers)
    assert len(jobs) == len(recipe.experiment.students) * len(recipe.experiment.seeds)


@pytest.mark.parametrize("tree", [{"out": None}, {"teacher": {"base": None}}])
def test_null_for_a_string_field_is_not_the_string_none(tree):
    recipe = build_recipe(tree)
    assert recipe.out == "" and recipe.teacher.base == ""


def test_empty_mean_choices_is_reported_by_build_recipe():
    with pytest.raises(BcpkdError, match="mean_choices"):
        build_recipe({"data": {"mean_choices": []}})


def test_list_items_must_be_positive():
    with pytest.raises(BcpkdError, match=r"teacher\.hidden: must be positive"):
        build_recipe({"teacher": {"hidden": [32, -5]}})


def test_run_plan_refuses_a_teacher_student_without_teacher(tmp_path):
    tree = {"experiment": {"teachers": {"det": {}}, "students": {"lost": {"targets": "teacher"},
                                                                  "typo": {"teacher": "dte"}}}}
    with pytest.raises(BcpkdError) as err:
        pipeline._plan(tree, "r.yaml", tmp_path)
    assert "experiment.students.lost: targets teacher needs `teacher: NAME`" in str(err.value)
    assert "'dte' is not one of: det" in str(err.value)


def test_image_architectures_need_image_data():
    with pytest.raises(BcpkdError, match="teacher.arch: resnet18 needs image data"):
        build_recipe({"teacher": {"arch": "resnet18"}})
