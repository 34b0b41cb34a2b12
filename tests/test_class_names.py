"""Class names are data: one list per dataset, labels assigned by name in every split, stored in every artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from bcpkd_cli.config import DataConfig, DatasetName
from bcpkd_cli.data import images as image_data
from bcpkd_cli.data import load_dataset
from bcpkd_cli.errors import BcpkdError
from cli_helpers import here_run, refused_here

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one thread, here and in the CLI


def _png(path, colour: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = torch.full((3, size, size), colour, dtype=torch.uint8)
    image[0] = (colour * 7 + 11) % 256  # the class shows in the red channel too
    write_png(image, str(path))


def _folder(root, train_classes, test_classes, per_class=6, test_per_class=3):
    for c, name in enumerate(train_classes):
        for i in range(per_class):
            _png(root / "train" / name / f"{i}.png", 40 * c + i)
    for name in test_classes:
        c = train_classes.index(name) if name in train_classes else 5
        for i in range(test_per_class):
            _png(root / "test" / name / f"{i}.png", 40 * c + i)
    return root


def _data(root, **changes):
    return load_dataset(DataConfig(name=DatasetName.imagefolder, root=str(root), n_heldout=0, **changes))


def test_test_labels_follow_the_training_class_names_not_their_own_positions(tmp_path):
    data = _data(_folder(tmp_path, ["ant", "bee", "cat"], ["ant", "cat"]))  # test/ lacks the middle class
    assert data.classes == ("ant", "bee", "cat") and data.n_classes == 3
    assert data.test.labels.tolist() == [0, 0, 0, 2, 2, 2]  # cat is label 2 in both splits (was 1 in test/)
    assert any("no test images of class bee" in note for note in data.notes)
    assert data.info()["classes"] == ["ant", "bee", "cat"]


def test_a_test_class_that_training_lacks_is_refused_naming_it(tmp_path):
    _folder(tmp_path, ["ant", "bee"], ["ant", "wasp"])
    with pytest.raises(BcpkdError, match=r"class folder wasp is not among the training classes \(ant, bee\)"):
        _data(tmp_path)


def test_hidden_entries_and_non_images_are_ignored_and_counted(tmp_path):
    _folder(tmp_path, ["ant", "bee"], ["ant", "bee"])
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    _png(tmp_path / "train" / ".ipynb_checkpoints" / "x.png", 3)
    (tmp_path / "train" / "ant" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "train" / "ant" / "Thumbs.db").write_bytes(b"\0\1")
    (tmp_path / "train" / "bee" / "notes.txt").write_text("not an image")
    _png(tmp_path / "train" / "bee" / "nested" / "deep.png", 90)  # class folders are read recursively
    listing = image_data.list_image_folder(tmp_path / "train")
    assert listing.classes == ["ant", "bee"] and listing.ignored == 4
    assert len(listing.paths) == 13 and listing.labels.count(1) == 7
    data = _data(tmp_path)
    assert data.notes[0] == "train 13 files (4 hidden or non-image entries ignored), test 6 files"


def test_a_class_under_a_tenth_of_the_mean_is_named(tmp_path):
    for c, (name, n) in enumerate((("ant", 40), ("bee", 40), ("cat", 2))):
        for i in range(n):
            _png(tmp_path / "train" / name / f"{i}.png", 40 * c + i % 30)
        _png(tmp_path / "test" / name / "0.png", 40 * c)
    notes = _data(tmp_path).notes
    assert "training classes under a tenth of the mean count (27): cat 2" in notes


def test_string_labels_in_a_csv_become_sorted_class_names(tmp_path):
    rows = ["f1,f2,label"] + [f"{i % 3}.5,{i}.0,{['dog', 'cat', 'eel'][i % 3]}" for i in range(30)]
    (tmp_path / "pets.csv").write_text("\n".join(rows) + "\n")
    data = load_dataset(DataConfig(name=DatasetName.arrays, root=str(tmp_path / "pets.csv"), n_heldout=0))
    assert data.classes == ("cat", "dog", "eel") and data.n_classes == 3
    every = torch.cat([data.train.inputs, data.test.inputs]), torch.cat([data.train.labels, data.test.labels])
    for x, y in zip(*every):  # feature f1 = (i % 3) + 0.5 names the class dog, cat, eel
        assert data.classes[int(y)] == ["dog", "cat", "eel"][int(x[0])]


def test_integer_labels_stay_integers_and_a_classes_array_names_them(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    y = np.arange(40) % 4
    np.savez(tmp_path / "plain.npz", x_train=x, y_train=y)
    plain = load_dataset(DataConfig(name=DatasetName.arrays, root=str(tmp_path / "plain.npz")))
    assert plain.classes == ("0", "1", "2", "3")
    np.savez(tmp_path / "named.npz", x_train=x, y_train=y, classes=np.array(["n", "e", "s", "w"]))
    named = load_dataset(DataConfig(name=DatasetName.arrays, root=str(tmp_path / "named.npz")))
    assert named.classes == ("n", "e", "s", "w") and torch.equal(named.train.labels, plain.train.labels)
    from safetensors.numpy import save_file

    save_file({"x_train": x, "y_train": y}, str(tmp_path / "named.safetensors"),
              metadata={"classes": json.dumps(["n", "e", "s", "w"])})
    stored = load_dataset(DataConfig(name=DatasetName.arrays, root=str(tmp_path / "named.safetensors")))
    assert stored.classes == named.classes
    np.savez(tmp_path / "short.npz", x_train=x, y_train=y, classes=np.array(["n", "e"]))
    with pytest.raises(BcpkdError, match="'classes' holds 2 names but the labels go up to 3"):
        load_dataset(DataConfig(name=DatasetName.arrays, root=str(tmp_path / "short.npz")))


def test_string_test_labels_are_matched_by_name_and_unknown_ones_refused(tmp_path):
    x = np.zeros((6, 2), dtype=np.float32)
    np.savez(tmp_path / "t.npz", x_train=x, y_train=np.array(["b", "a", "b", "a", "c", "c"]),
             x_test=x[:2], y_test=np.array(["c", "a"]))
    data = load_dataset(DataConfig(name=DatasetName.arrays, root=str(tmp_path / "t.npz"), n_heldout=0))
    assert data.classes == ("a", "b", "c") and data.test.labels.tolist() == [2, 0]
    np.savez(tmp_path / "u.npz", x_train=x, y_train=np.array(["b", "a", "b", "a", "c", "c"]),
             x_test=x[:2], y_test=np.array(["d", "a"]))
    with pytest.raises(BcpkdError, match="y_test has label 'd', which no training example has"):
        load_dataset(DataConfig(name=DatasetName.arrays, root=str(tmp_path / "u.npz")))


def test_cifar_uses_the_published_names():
    assert image_data.CIFAR10_CLASSES[3] == "cat" and len(image_data.CIFAR100_CLASSES) == 100
    assert image_data.CIFAR100_CLASSES[:3] == ("apple", "aquarium_fish", "baby")
    assert image_data.CIFAR100_CLASSES[-1] == "worm"


@pytest.mark.slow
def test_class_names_travel_through_every_artifact_and_report(single_thread, tmp_path):
    """train-teacher -> distill -> evaluate --json --per-class on a folder whose test/ lacks a class."""
    root = _folder(tmp_path / "data", ["ant", "bee", "cat"], ["ant", "cat"], per_class=10)
    common = ["--data", "imagefolder", "--data-root", str(root), "--arch", "resnet20", "--epochs", "1",
              "--set", "data.n_heldout=6"]
    teacher = here_run("train-teacher", *common, "--out", "t", cwd=tmp_path).stdout.strip()
    payload = torch.load(tmp_path / teacher, weights_only=True)
    assert payload["data"]["classes"] == ["ant", "bee", "cat"]
    student = here_run("distill", "--teacher", teacher, "--arch", "resnet20", "--epochs", "1", "--out", "s",
                       cwd=tmp_path).stdout.strip()
    assert torch.load(tmp_path / student, weights_only=True)["data"]["classes"] == ["ant", "bee", "cat"]
    cache = next((tmp_path / "t" / "bcp").rglob("bcp.safetensors"))
    from safetensors import safe_open

    with safe_open(str(cache), framework="pt") as f:
        assert json.loads(f.metadata()["classes"]) == ["ant", "bee", "cat"]
    result = here_run("evaluate", student, teacher, "--json", "--per-class", cwd=tmp_path)
    reports = json.loads(result.stdout)
    for report in reports:
        assert report["data"]["classes"] == ["ant", "bee", "cat"]
        per_class = {entry["class"]: entry for entry in report["per_class"]}
        assert per_class["bee"] == {"class": "bee", "n": 0, "accuracy": None}
        assert per_class["ant"]["n"] == per_class["cat"]["n"] == 3
        hits = sum(e["accuracy"] * e["n"] for e in per_class.values() if e["n"])
        assert hits / 6 == pytest.approx(report["metrics"]["accuracy"])
    assert "test accuracy per class" in result.stderr and "no test images of class bee" in result.stderr
    (root / "test" / "dog").mkdir()
    _png(root / "test" / "dog" / "0.png", 7)
    message = refused_here("evaluate", student, cwd=tmp_path)
    assert "class folder dog is not among the training classes (ant, bee, cat)" in message
