"""Your own teacher, student and data: torchvision and user factories, --init, mixed image folders, feature
tables, normalisation from the data, and user code that never runs unless trusted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision.io import write_jpeg, write_png

from bcpkd_cli import artifacts
from bcpkd_cli.config import DataConfig
from bcpkd_cli.data import images as image_data
from bcpkd_cli.data import load_dataset
from bcpkd_cli.data.decode import decode_images
from bcpkd_cli.data.views import N_VIEWS, apply_views
from bcpkd_cli.models import build_model, model_spec
from bcpkd_cli.teachers import load_teacher
from cli_helpers import bcpkd, files_under, here, refused_here

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one thread, here and in the CLI

SMALL_CNN = str(Path(__file__).parents[1] / "recipes" / "examples" / "small_cnn.py")
IMAGES = ["--set", "data.n_heldout=15", "--device", "cpu", "--set", "teacher.batch_size=32",
          "--set", "distill.batch_size=32", "--set", "teacher.laplace.grid_size=3"]


def _images(image_folder) -> list[str]:
    return ["--data", "imagefolder", "--data-root", str(image_folder), *IMAGES]


def test_torchvision_teacher_and_user_factory_student(single_thread, image_folder, tmp_path):
    teacher = here("train-teacher", "--bayes", "laplace", "--arch", "torchvision:resnet18", "--epochs", "1",
                   "--out", "t", *_images(image_folder), cwd=tmp_path).strip()
    student = here("distill", "--teacher", teacher, "--arch", f"{SMALL_CNN}:small_cnn", "--set",
                   "distill.arch_kwargs={width: 4}", "--epochs", "1", "--out", "s", *IMAGES, cwd=tmp_path).strip()
    payload = torch.load(tmp_path / student, weights_only=True)
    assert payload["model"]["arch"] == f"{SMALL_CNN}:small_cnn" and payload["model"]["arch_kwargs"] == {"width": 4}
    assert payload["config"]["distill"]["arch"] == f"{SMALL_CNN}:small_cnn"
    reports = json.loads(here("evaluate", student, teacher, "--json", "--trust-code", "--device", "cpu",
                              cwd=tmp_path))
    assert [r["arch"] for r in reports] == [f"{SMALL_CNN}:small_cnn", "torchvision:resnet18"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["none", "temperature", "mse", "mcmi", "laplace", "mc-dropout", "vi", "ensemble"])
def test_every_kind_trains_and_caches_on_a_user_factory_with_batchnorm(single_thread, image_folder, tmp_path, kind):
    flags = ["--set", "teacher.arch_kwargs={width: 4}", "--set", "teacher.mcmi.epochs=1", "--set",
             "teacher.vi.ml_epochs=0", "--set", "teacher.vi.anneal_epochs=1", "--set", "teacher.vi.samples=2",
             "--set", "teacher.mc_dropout.samples=2", "--members", "2"]
    teacher = here("train-teacher", "--bayes", kind, "--arch", f"{SMALL_CNN}:small_cnn", "--epochs", "1", "--out", "t",
                   *flags, *_images(image_folder), cwd=tmp_path).strip()
    cache = here("calibrate", "--teacher", teacher, "--views", "2", "--trust-code", *IMAGES, cwd=tmp_path).strip()
    probs, meta = artifacts.load_cache(Path(cache), {})
    assert probs.shape == (75, 2, 3) and meta["bayes"] == kind


def _torchvision_weights(path: Path, num_classes: int, wrap: bool = False) -> torch.nn.Module:
    torch.manual_seed(1)
    net = torchvision.models.mobilenet_v3_small(num_classes=num_classes).eval()
    state = net.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}} if wrap else state, path)
    return net


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "ddp-nested"])
def test_init_imports_the_trained_network_exactly(single_thread, image_folder, tmp_path, wrap):
    source = _torchvision_weights(tmp_path / "weights.pth", 3, wrap)
    teacher = here("train-teacher", "--arch", "torchvision:mobilenet_v3_small", "--init", "weights.pth",
                   "--epochs", "0", "--out", "t", *_images(image_folder), cwd=tmp_path).strip()
    payload = torch.load(tmp_path / teacher, weights_only=True)
    assert payload["history"]["init_sha256"] == artifacts.sha256_file(tmp_path / "weights.pth")
    stats = payload["model"]["stats"]
    pixels = load_dataset(DataConfig(name="imagefolder", root=str(image_folder), n_heldout=15)).test.inputs
    mean, std = torch.tensor(stats["mean"]).view(1, 3, 1, 1), torch.tensor(stats["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = torch.softmax(source((pixels.float() / 255 - mean) / std), dim=1)
    got = load_teacher(payload, torch.device("cpu")).predict_probs(pixels, torch.arange(len(pixels)))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_a_state_dict_that_does_not_fit_is_refused_listing_the_keys(image_folder, tmp_path):
    _torchvision_weights(tmp_path / "weights.pt", 1000)  # other class count: the classifier's shapes differ
    message = refused_here("train-teacher", "--arch", "torchvision:mobilenet_v3_small", "--init", "weights.pt",
                           "--epochs", "0", "--out", "t", *_images(image_folder), cwd=tmp_path)
    assert "shape mismatch: classifier.3.weight (1000, 1024) vs (3, 1024)" in message
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "other.pt")
    message = refused_here("distill", "--targets", "onehot", "--arch", "torchvision:mobilenet_v3_small", "--init",
                           "other.pt", "--out", "s", *_images(image_folder), cwd=tmp_path)
    assert "missing: features.0.0.weight" in message and "unexpected: conv1.weight" in message
    assert files_under(tmp_path) == {tmp_path / "weights.pt", tmp_path / "other.pt"}


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """3 classes of images of mixed sizes and kinds: RGB JPEG, grayscale PNG, RGBA and palette PNG."""
    from PIL import Image

    root = tmp_path_factory.mktemp("mixed")
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("test", 4)):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                h, w = 20 + 7 * (i % 3), 30 - 5 * (i % 2)
                pixels = (torch.rand(3, h, w, generator=gen) * 100 + 60 * c).to(torch.uint8)
                path = root / split / f"c{c}" / f"{i}"
                if i % 4 == 0:
                    write_jpeg(pixels, f"{path}.jpg")
                elif i % 4 == 1:
                    write_png(pixels[:1], f"{path}.png")  # grayscale
                else:
                    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
                    (image.convert("RGBA") if i % 4 == 2 else image.convert("P")).save(f"{path}.png")
    return root


def test_a_mixed_folder_needs_image_size_and_then_works(single_thread, mixed_folder, tmp_path):
    message = refused_here("distill", "--targets", "onehot", "--data", "imagefolder", "--data-root",
                           str(mixed_folder), "--out", "s", cwd=tmp_path)
    assert "different sizes" in message and "data.image_size" in message
    data = load_dataset(DataConfig(name="imagefolder", root=str(mixed_folder), image_size=24, n_heldout=6))
    assert data.train.inputs.shape == (30, 3, 24, 24) and data.test.inputs.shape == (12, 3, 24, 24)
    here("distill", "--targets", "onehot", "--arch", "resnet8x4", "--epochs", "1", "--batch-size", "10",
         "--data", "imagefolder", "--data-root", str(mixed_folder), "--set", "data.image_size=24",
         "--set", "data.n_heldout=6", "--set", "calibrate.views=4", "--device", "cpu", "--out", "s", cwd=tmp_path)


def test_views_at_any_size_are_162_distinct_crops_and_flips():
    image = torch.arange(3 * 64 * 64).view(1, 3, 64, 64)
    views = apply_views(image.expand(N_VIEWS, -1, -1, -1), torch.arange(N_VIEWS))
    assert torch.equal(views[0], image[0])  # view 0 is the image itself
    assert len({v.numpy().tobytes() for v in views}) == N_VIEWS  # pad 8, offsets in steps of 2 pixels
    shifted = apply_views(image, torch.tensor([2]))[0]  # column offset one step right: 2 pixels
    assert torch.equal(shifted[:, :, :-2], image[0, :, :, 2:])


def test_normalisation_statistics_come_from_the_training_images(image_folder):
    data = load_dataset(DataConfig(name="imagefolder", root=str(image_folder), n_heldout=15))
    paths, _, _, _ = image_data.list_image_folder(image_folder / "train")
    every = decode_images(paths).double() / 255  # all training files (train + held-out)
    want_mean, want_std = every.mean(dim=(0, 2, 3)), every.std(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(torch.tensor(data.stats["mean"], dtype=torch.float64), want_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(data.stats["std"], dtype=torch.float64), want_std, atol=1e-6, rtol=0)
    model = build_model(model_spec("resnet8x4", (3, 16, 16), 3, (), stats=data.stats))
    torch.testing.assert_close(model.features[0].mean.flatten(), torch.tensor(data.stats["mean"]))


def _table(n: int = 240, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    return (rng.normal(size=(n, d)) + y[:, None]).astype(np.float32), y


def test_feature_tables_from_npz_and_csv(single_thread, tmp_path):
    x, y = _table()
    np.savez(tmp_path / "t.npz", x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    lines = ["f0,f1,label,f2,f3,f4,f5"] + [",".join([*map(str, r[:2]), str(lab), *map(str, r[2:])])
                                            for r, lab in zip(x, y)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    for name in ("t.npz", "t.csv"):
        flags = ["--data", "arrays", "--data-root", name, "--set", "data.n_heldout=20", "--device", "cpu"]
        teacher = here("train-teacher", "--bayes", "laplace", "--epochs", "2", "--out", f"t-{name}", *flags,
                       "--set", "teacher.hidden=[16]", "--set", "teacher.laplace.grid_size=3", cwd=tmp_path).strip()
        here("distill", "--teacher", teacher, "--epochs", "1", "--out", f"s-{name}", "--set", "distill.hidden=[8]",
             cwd=tmp_path)
        payload = torch.load(tmp_path / teacher, weights_only=True)
        sizes = {"train": 180, "heldout": 20, "test": 40} if name == "t.npz" else {"train": 172, "heldout": 20,
                                                                                  "test": 48}
        assert payload["data"]["n_classes"] == 3 and payload["data"]["sizes"] == sizes


@pytest.mark.parametrize(("arrays", "fragment"), [
    ({"x": "x", "y_train": "y"}, "no array 'x_train'"),
    ({"x_train": "x", "y_train": "yf"}, "y_train must be integer class labels"),
    ({"x_train": "x", "y_train": "yneg"}, "negative labels"),
    ({"x_train": "xnan", "y_train": "y"}, "NaN or infinite values (first at row 3)"),
    ({"x_train": "x", "y_train": "yshort"}, "x_train has 50 rows but y_train has 40"),
])
def test_bad_feature_tables_are_refused_with_the_key(tmp_path, arrays, fragment):
    x, y = _table(50)
    xnan = x.copy()
    xnan[3, 1] = np.nan
    values = {"x": x, "y": y, "yf": y + 0.5, "yneg": y - 1, "xnan": xnan, "yshort": y[:40]}
    np.savez(tmp_path / "bad.npz", **{key: values[name] for key, name in arrays.items()})
    message = refused_here("distill", "--targets", "onehot", "--data", "arrays", "--data-root", "bad.npz", cwd=tmp_path)
    assert "bad.npz" in message and fragment in message


FACTORY = '''
import pathlib
pathlib.Path(__file__).with_name("ran.marker").write_text("imported")

from torch import nn


def make(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(30, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, num_classes))
'''


def test_user_code_in_a_checkpoint_never_runs_unless_trusted(tmp_path):
    (tmp_path / "mine.py").write_text(FACTORY)
    tiny = ["--set", "data.n_train=200", "--set", "data.n_heldout=50", "--set", "data.n_test=50", "--device", "cpu"]
    bcpkd("train-teacher", "--arch", "mine.py:make", "--epochs", "1", "--out", "t", *tiny, cwd=tmp_path)
    (tmp_path / "ran.marker").unlink()
    result = bcpkd("evaluate", "t/teacher.pt", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "mine.py" in result.stderr and "--trust-code" in result.stderr
    assert not (tmp_path / "ran.marker").exists()  # refused before anything was imported
    report = json.loads(bcpkd("evaluate", "t/teacher.pt", "--json", "--trust-code", cwd=tmp_path).stdout)
    assert report[0]["arch"] == "mine.py:make" and (tmp_path / "ran.marker").exists()


def test_a_factory_that_cannot_be_imported_is_one_line(tmp_path):
    message = refused_here("train-teacher", "--arch", "no_such_module:make", cwd=tmp_path)
    assert "cannot import module 'no_such_module'" in message and "PYTHONPATH" in message
    message = refused_here("train-teacher", "--arch", "torchvision:resnet18", cwd=tmp_path)  # synthetic data
    assert "needs image data" in message
    assert files_under(tmp_path) == set()


@pytest.mark.slow
def test_the_own_model_recipe_runs(single_thread, mixed_folder, tmp_path, no_figures):
    recipe = Path(__file__).parents[1] / "recipes" / "own-model-example.yaml"
    summary = here("run", str(recipe), "--data-root", str(mixed_folder), "--out", str(tmp_path / "run"),
                   "--set", "teacher.epochs=1", "--set", "distill.epochs=1", "--set", "data.n_heldout=6",
                   "--set", f"distill.arch={SMALL_CNN}:small_cnn", "--set", "distill.arch_kwargs={width: 4}",
                   cwd=tmp_path).strip()
    report = json.loads(Path(summary).read_text())
    assert {row["name"] for row in report["students"]} == {"onehot", "from_resnet18", "from_laplace"}
    assert "n_classes" not in report["config"]["data"] and report["config"]["data"]["image_size"] == 32


@pytest.mark.slow
def test_a_store_larger_than_memory_allows_is_read_from_disk_with_equal_results(single_thread, image_folder,
                                                                                  tmp_path, monkeypatch):
    """A store over the in-memory limit is memory-mapped: splits read their rows from disk as indexed, and the
    teacher, its cache and the student are exactly those of the in-memory run."""
    from bcpkd_cli.data.rows import MappedRows

    run = ["--bayes", "laplace", "--arch", "resnet8x4", "--epochs", "1", *_images(image_folder)]
    in_memory = here("train-teacher", *run, "--out", "mem", cwd=tmp_path).strip()
    monkeypatch.setattr(image_data, "in_memory_limit", lambda: 0)
    data = load_dataset(DataConfig(name="imagefolder", root=str(image_folder), n_heldout=15))
    assert isinstance(data.train.inputs, MappedRows) and isinstance(data.test.inputs, MappedRows)
    on_disk = here("train-teacher", *run, "--out", "disk", cwd=tmp_path).strip()
    a, b = (torch.load(tmp_path / p, weights_only=True) for p in (in_memory, on_disk))
    assert a["data"]["fingerprint"] == b["data"]["fingerprint"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    students = [here("distill", "--teacher", t, "--arch", "wrn_16_1", "--epochs", "1", "--views", "2", "--out", f"s{i}",
                     *IMAGES, cwd=tmp_path).strip() for i, t in enumerate((in_memory, on_disk))]
    a, b = (torch.load(tmp_path / p, weights_only=True)["state_dict"] for p in students)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vector_data_is_standardised_inside_the_model_with_the_training_splits_statistics(tiny_config):
    from dataclasses import replace

    data = load_dataset(tiny_config)
    x = data.train.inputs.double()
    torch.testing.assert_close(torch.tensor(data.stats["mean"], dtype=torch.float64), x.mean(0))
    torch.testing.assert_close(torch.tensor(data.stats["std"], dtype=torch.float64), x.std(0, unbiased=False))
    model = build_model(model_spec("mlp", (30,), 5, (8,), stats=data.stats))
    z = model.features[0](data.heldout.inputs)
    torch.testing.assert_close(z, ((data.heldout.inputs.double() - x.mean(0)) / x.std(0, unbiased=False)).float())
    assert load_dataset(replace(tiny_config, standardize=False)).stats is None
    assert build_model(model_spec("mlp", (30,), 5, (8,), stats=data.stats, normalize=False)).features[0].__class__ \
        is torch.nn.Linear
