"""Inputs checked before any work: the architecture follows the data unless chosen, --data-root names its
dataset by what it is, and every model/data mismatch is one line and exit 2 before anything is trained or cached."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml

from bcpkd_cli.commands.options import field_help
from cli_helpers import files_under, here, refused_here

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one thread, here and in the CLI

TINY_IMAGES = ["--epochs", "1", "--batch-size", "32", "--set", "data.n_heldout=15", "--device", "cpu"]


def _config(folder) -> dict:
    return yaml.safe_load((folder / "config.yaml").read_text())


@pytest.fixture(scope="module")
def image_teacher(single_thread, image_folder, tmp_path_factory):
    """A teacher trained on the image folder with neither --data nor --arch: both follow the folder."""
    work = tmp_path_factory.mktemp("image-teacher")
    here("train-teacher", "--data-root", str(image_folder), "--out", "t", *TINY_IMAGES, cwd=work)
    return work / "t"


def test_an_image_folder_without_data_or_arch_trains_a_resnet20_teacher(image_teacher, image_folder):
    saved = _config(image_teacher)
    assert saved["data"]["name"] == "imagefolder" and saved["data"]["root"] == str(image_folder)
    assert saved["teacher"]["arch"] == "resnet20" and "hidden" not in saved["teacher"]  # only the mlp reads it
    payload = torch.load(image_teacher / "teacher.pt", weights_only=True)
    assert payload["model"]["arch"] == "resnet20" and payload["config"] == saved


def test_the_student_of_an_image_teacher_is_a_resnet20(image_teacher, tmp_path):
    teacher = tmp_path / "t"
    shutil.copytree(image_teacher, teacher)
    student = here("distill", "--teacher", str(teacher), "--out", "s", *TINY_IMAGES, cwd=tmp_path).strip()
    assert torch.load(tmp_path / student, weights_only=True)["model"]["arch"] == "resnet20"
    saved = _config(tmp_path / "s")
    assert saved["distill"]["arch"] == "resnet20" and "hidden" not in saved["distill"]
    assert saved["data"]["name"] == "imagefolder"


def test_the_mlp_on_an_image_teachers_data_is_refused_before_the_cache(image_teacher, tmp_path):
    teacher = tmp_path / "t"
    shutil.copytree(image_teacher, teacher)
    before = files_under(tmp_path)
    message = refused_here("distill", "--teacher", str(teacher), "--arch", "mlp", "--out", "s", *TINY_IMAGES,
                           cwd=tmp_path)
    assert "distill.arch: mlp takes feature vectors, but imagefolder data are images" in message
    assert "--arch resnet20" in message
    assert not (teacher / "bcp").exists() and files_under(tmp_path) == before  # no cache, no student


def test_vector_data_for_an_image_teacher_are_refused_before_the_cache(image_teacher, tmp_path):
    teacher = tmp_path / "t"
    shutil.copytree(image_teacher, teacher)
    _write_csv(tmp_path / "table.csv")
    for data in ([], ["--data", "arrays"]):
        message = refused_here("distill", "--teacher", str(teacher), *data, "--data-root", "table.csv", "--out", "s",
                               cwd=tmp_path)
        assert "arrays data (table.csv) are feature vectors, but the checkpoint's network takes images" in message
    message = refused_here("evaluate", str(teacher), "--data-root", "table.csv", cwd=tmp_path)
    assert "the checkpoint's network takes images" in message
    assert not (teacher / "bcp").exists() and not (tmp_path / "s").exists()


def _write_csv(path, rows: int = 60) -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(rows) % 3
    features = rng.normal(size=(rows, 4)) + labels[:, None]
    lines = ["a,b,c,d,label"] + [",".join(f"{v:.4f}" for v in x) + f",{y}" for x, y in zip(features, labels)]
    path.write_text("\n".join(lines) + "\n")


def test_a_csv_file_without_data_trains_an_mlp_on_arrays(single_thread, tmp_path):
    _write_csv(tmp_path / "table.csv")
    here("train-teacher", "--data-root", "table.csv", "--epochs", "1", "--set", "data.n_heldout=12",
         "--set", "teacher.hidden=[8]", "--device", "cpu", "--out", "t", cwd=tmp_path)
    saved = _config(tmp_path / "t")
    assert saved["data"]["name"] == "arrays" and saved["teacher"]["arch"] == "mlp"
    assert saved["teacher"]["hidden"] == [8]


def test_cifar_folders_are_named_by_their_batches_folder(tmp_path):
    for folder, name in (("cifar-10-batches-py", "cifar10"), ("cifar-100-python", "cifar100")):
        (tmp_path / name / folder).mkdir(parents=True)
        printed = yaml.safe_load(here("train-teacher", "--data-root", name, "--print-config", cwd=tmp_path))
        assert printed["data"]["name"] == name and printed["teacher"]["arch"] == "resnet20"
        assert "hidden" not in printed["teacher"]


def test_a_recipe_that_names_the_data_keeps_it(image_folder, tmp_path):
    (tmp_path / "r.yaml").write_text("data: {name: arrays}\n")
    message = refused_here("train-teacher", "--recipe", "r.yaml", "--data-root", str(image_folder), cwd=tmp_path)
    assert f"data.root: {image_folder} holds imagefolder data (a folder with train/), but data.name is arrays; " \
           f"give --data imagefolder" in message


@pytest.mark.parametrize("root", ["empty", "missing", "notes.txt"])
def test_a_data_root_that_is_no_dataset_is_refused_naming_it(tmp_path, root):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "r.yaml").write_text("teacher: {epochs: 1}\n")
    for command in (["train-teacher"], ["distill", "--targets", "onehot"], ["run", "r.yaml"]):
        message = refused_here(*command, "--data-root", root, "--out", "o", cwd=tmp_path)
        there = "does not exist" if root == "missing" else "is no dataset bcpkd reads"
        assert f"data.root: {root} {there}; expected a folder with train/ (imagefolder), cifar-10-batches-py/ " \
               f"(cifar10) or cifar-100-python/ (cifar100), a .csv, .npz or .safetensors file (arrays), or a " \
               f".csv/.tsv/.jsonl/.parquet file or a folder with train.csv (or .tsv/.jsonl/.parquet) of text (text)" \
               in message
    assert files_under(tmp_path) == {tmp_path / "notes.txt", tmp_path / "r.yaml"}


def test_a_data_root_that_is_no_dataset_is_refused_for_a_teacher(image_teacher, tmp_path):
    (tmp_path / "empty").mkdir()
    for command in (["calibrate", "--teacher"], ["distill", "--teacher"], ["evaluate"]):
        message = refused_here(*command, str(image_teacher), "--data-root", "empty", cwd=tmp_path)
        assert "data.root: empty is no dataset bcpkd reads; expected a folder with train/" in message
    assert not (image_teacher / "bcp").exists()  # (the tests that cache do so in copies of it)


def test_a_data_name_that_contradicts_the_root_is_refused(image_folder, tmp_path):
    _write_csv(tmp_path / "table.csv")
    (tmp_path / "empty").mkdir()
    message = refused_here("train-teacher", "--data", "arrays", "--data-root", str(image_folder), cwd=tmp_path)
    assert "holds imagefolder data (a folder with train/), but data.name is arrays" in message
    message = refused_here("train-teacher", "--data", "imagefolder", "--data-root", "table.csv", cwd=tmp_path)
    assert "data.root: table.csv holds arrays data (a .csv, .npz or .safetensors file), but data.name is " \
           "imagefolder; give --data arrays" in message
    message = refused_here("train-teacher", "--data", "imagefolder", "--data-root", "empty", cwd=tmp_path)
    assert "data.root: empty is not imagefolder data; data.name imagefolder expects a folder with train/" in message
    message = refused_here("train-teacher", "--data", "synthetic", "--data-root", "table.csv", cwd=tmp_path)
    assert "data.root is set but data.name is synthetic, which reads no files; leave out --data-root, or give " \
           "--data arrays" in message
    printed = here("train-teacher", "--data", "cifar10", "--data-root", "empty", "--set", "data.download=true",
                   "--print-config", cwd=tmp_path)  # a folder to download into
    assert yaml.safe_load(printed)["data"]["name"] == "cifar10"
    assert files_under(tmp_path) == {tmp_path / "table.csv"}


@pytest.mark.parametrize("arch", ["resnet20", "wrn_16_1", "timm:resnet18", "torchvision:resnet18"])
def test_an_image_network_on_vector_data_is_refused_before_training(tmp_path, arch):
    message = refused_here("train-teacher", "--arch", arch, "--out", "t", cwd=tmp_path)
    assert f"teacher.arch: {arch} needs image data, but synthetic data are feature vectors; choose --arch mlp" \
           in message
    message = refused_here("distill", "--targets", "onehot", "--arch", arch, "--out", "s", cwd=tmp_path)
    assert f"distill.arch: {arch} needs image data" in message
    assert files_under(tmp_path) == set()


def test_the_mlp_on_images_is_refused(image_folder, tmp_path):
    message = refused_here("train-teacher", "--data-root", str(image_folder), "--arch", "mlp", cwd=tmp_path)
    assert "teacher.arch: mlp takes feature vectors, but imagefolder data are images; choose --arch resnet20 " \
           "(or another image network)" in message
    assert files_under(tmp_path) == set()


def test_the_help_says_the_default_follows_the_data():
    for key in ("teacher.arch", "distill.arch"):
        assert field_help(key).endswith("[default: resnet20 for images, mlp for vectors]")
