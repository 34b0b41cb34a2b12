"""Ship the student: export (ONNX, torch.export, the library's own weights, a model card whose snippets run as
written), predict, evaluate of exported files, and bcpkd_cli.load."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil

from pathlib import Path

import numpy as np
import pytest
import torch

import bcpkd_cli
from bcpkd_cli import artifacts, export_formats
from bcpkd_cli.models import build_model
from bcpkd_cli.errors import BcpkdError
from cli_helpers import failed_here, here, refused_here, run_fresh

pytestmark = pytest.mark.usefixtures("single_thread")  # small networks: one thread, here and in the snippets' processes


def _snippets(folder) -> dict[str, str]:
    text = (folder / "README.md").read_text()
    return dict(re.findall(r"### (\w+)\n\n```python\n(.*?)```", text, re.S))


def _run_snippet(code: str, folder, without_bcpkd: bool = True) -> str:
    """A snippet in a fresh interpreter in `folder`; bcpkd_cli cannot be imported there (`without_bcpkd`)."""
    return run_fresh({"one": code}, folder, without_bcpkd)["one"]


@pytest.fixture(scope="module")
def table_student(tmp_path_factory):
    work = tmp_path_factory.mktemp("table-student")
    student = here("distill", "--targets", "onehot", "--epochs", "1", "--set", "data.n_train=600", "--set",
                   "data.n_test=300", "--out", "s", cwd=work).strip()
    folder = here("export", student, "--out", "exp", cwd=work).strip()
    return work, work / student, work / folder


def test_a_student_exports_every_format_checked_on_the_test_split(table_student):
    work, student, folder = table_student
    manifest = json.loads((folder / "bcpkd-export.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "bcpkd-export.json", "model.onnx", "model.pt2",
                                                       "model.safetensors", "network.py"]
    assert manifest["classes"] == ["0", "1", "2", "3", "4"] and manifest["outputs"] == ["logits", "probs"]
    assert manifest["input"]["kind"] == "features" and manifest["input"]["shape"] == [30]
    assert all(v <= export_formats.TOLERANCE for v in manifest["parity"]["max_abs_prob_difference"].values())
    assert manifest["parity"]["examples"] == 300 and manifest["test"]["n_examples"] == 300
    assert manifest["model"]["parameters"] == 30 * 128 + 128 + 128 * 128 + 128 + 128 * 5 + 5  # mlp 128, 128
    assert manifest["weights"]["names"] == "network.py" and manifest["source"]["checkpoint"] == str(student)
    import onnx

    props = {p.key: p.value for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    assert json.loads(props["bcpkd"])["classes"] == manifest["classes"]  # the file alone describes itself
    assert onnx.load(str(folder / "model.onnx")).opset_import[0].version >= 17


def test_the_card_snippets_run_as_written_and_agree_with_predict(table_student):
    work, student, folder = table_student
    printed = run_fresh(_snippets(folder), folder)
    assert sorted(printed) == ["onnx", "pt2", "safetensors"]
    names = {line.split()[0] for line in printed.values()}
    assert len(names) == 1  # every format classifies the example row alike
    row = json.loads((folder / "bcpkd-export.json").read_text())["example_row"]
    np.savez(work / "one.npz", x_test=np.asarray([row], dtype=np.float32))
    rows = list(csv.DictReader(io.StringIO(here("predict", str(folder), "one.npz", cwd=work))))
    assert rows[0]["class"] == names.pop()
    probability = float(printed["onnx"].split()[1])
    assert float(rows[0]["probability"]) == pytest.approx(probability, abs=1e-5)


def test_load_evaluate_and_refusals(table_student):
    work, student, folder = table_student
    model = bcpkd_cli.load(student)
    assert model.classes == ["0", "1", "2", "3", "4"] and not model.training
    x = torch.rand(7, 30) * 6
    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    assert torch.allclose(model(x), torch.from_numpy(session.run(["probs"], {"input": x.numpy()})[0]), atol=1e-5)
    reports = json.loads(here("evaluate", str(student), str(folder / "model.onnx"), str(folder / "model.pt2"),
                              "--json", cwd=work))
    for report in reports[1:]:
        for key, value in reports[0]["metrics"].items():
            if key in report["metrics"]:
                assert report["metrics"][key] == pytest.approx(value, abs=1e-5), key
    assert "holds an export already" in refused_here("export", str(student), "--out", str(folder), cwd=work)
    assert "choose from onnx, pt2, safetensors" in refused_here("export", str(student), "--format", "tflite",
                                                                 cwd=work)
    assert "this model classifies feature rows" in refused_here("predict", str(folder), "README.md", cwd=folder)


def test_a_missing_export_extra_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name))
    with pytest.raises(BcpkdError, match=r"needs the export extra \(onnxruntime missing\): pip install -e '.\[export\]'"):
        export_formats.require_onnx()


SMALL_CNN = str(Path(__file__).resolve().parents[1] / "recipes" / "examples" / "small_cnn.py") + ":small_cnn"


def _image_student(image_folder, work, *arch: str) -> tuple[str, Path]:
    """A one-epoch student of one-hot labels on the image folder, exported in every format (into work)."""
    student = here("distill", "--targets", "onehot", "--data-root", str(image_folder), *arch, "--epochs", "1",
                   "--out", "s", cwd=work).strip()
    return student, work / here("export", student, "--out", "exp", "--trust-code", cwd=work).strip()


@pytest.fixture(scope="module")
def birds_student(single_thread, image_folder, tmp_path_factory) -> tuple[Path, Path]:
    """The image folder's student without --arch (the data choose resnet20) and its export in every format, made
    once for the tests below that read them (each copies what it changes): the student and the export folder."""
    work = tmp_path_factory.mktemp("birds-student")
    student, folder = _image_student(image_folder, work)
    assert torch.load(work / student, weights_only=True)["model"]["arch"] == "resnet20"
    return work / student, folder


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet20", "torchvision:mobilenet_v3_small", "timm:test_resnet", SMALL_CNN])
def test_every_format_of_an_image_student_reloads_without_bcpkd(single_thread, image_folder, tmp_path, arch, request):
    """A built-in, a torchvision, a timm and a user-factory student: each exported file, loaded by its snippet in a
    fresh interpreter where bcpkd cannot be imported, classifies an image as the checkpoint does; the student then
    starts the next teacher through --init (its checkpoint, or the export's safetensors)."""
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    if arch == "resnet20":  # the shared student (resnet20 by default on images), its export copied to change it
        made, made_folder = request.getfixturevalue("birds_student")
        student, folder = str(made), tmp_path / "exp"
        shutil.copytree(made_folder, folder)
    else:
        student, folder = _image_student(image_folder, tmp_path, "--arch", arch)
    manifest = json.loads((folder / "bcpkd-export.json").read_text())
    assert manifest["classes"] == ["bird", "cat", "ship"] and sorted(manifest["files"]) == ["onnx", "pt2", "safetensors"]
    assert manifest["weights"]["names"] == {"resnet20": "network.py", "torchvision:mobilenet_v3_small": "torchvision",
                                            "timm:test_resnet": "timm"}.get(arch, "factory")
    image = image_folder / "test" / "cat" / "000.png"
    shutil.copy(image, folder / "image.jpg")  # a PNG named .jpg: the content decides
    model = bcpkd_cli.load(tmp_path / student, device="cpu")
    expected = model(model.preprocess(image)[None])[0]
    for fmt, line in run_fresh(_snippets(folder), folder).items():
        name, probability = line.split()
        assert name == model.classes[int(expected.argmax())], fmt
        assert float(probability) == pytest.approx(float(expected.max()), abs=1e-4), fmt
    spec = torch.load(tmp_path / student, weights_only=True)["model"]
    for weights in (tmp_path / student, folder / "model.safetensors"):  # round trips: --init of the next network
        network = build_model(spec, init=artifacts.read_weights(weights, "teacher.init")).eval()
        assert torch.allclose(torch.softmax(network(model.preprocess(image)[None]), 1)[0], expected, atol=1e-5)
    if arch == "resnet20":  # and through the CLI: the student becomes a teacher
        teacher = here("train-teacher", "--data-root", str(image_folder), "--init", student, "--epochs", "0", "--out",
                       "t", cwd=tmp_path).strip()
        again = bcpkd_cli.load(tmp_path / teacher)
        assert torch.allclose(again(again.preprocess(image)[None])[0], expected, atol=1e-5)


@pytest.mark.slow
def test_predict_reads_folders_and_lists_unreadable_files_after_the_rows(birds_student, image_folder, tmp_path):
    student, folder = str(birds_student[0]), birds_student[1]  # (read only here)
    (tmp_path / "new" / "deep").mkdir(parents=True)
    for i, name in enumerate(("a.png", "deep/b.png")):
        shutil.copy(image_folder / "test" / "ship" / f"00{i}.png", tmp_path / "new" / name)
    (tmp_path / "new" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    (tmp_path / "new" / "notes.txt").write_text("ignored")
    message = failed_here("predict", str(folder / "model.onnx"), "new", "--out", "rows.csv", cwd=tmp_path)
    assert "1 unreadable input: new/broken.jpg (truncated); the rows of the other 2 were written" in message
    rows = list(csv.DictReader(open(tmp_path / "rows.csv")))
    assert [r["input"] for r in rows] == ["new/a.png", "new/deep/b.png"]
    assert all(abs(sum(float(p.split(":")[1]) for p in r["top_k"].split(";")) - 1) < 1e-4 for r in rows)
    from_checkpoint = list(csv.DictReader(io.StringIO(here("predict", student, "new", "--skip-unreadable",
                                                           cwd=tmp_path))))
    assert [r["class"] for r in from_checkpoint] == [r["class"] for r in rows]
    here("predict", str(folder), "new", "--skip-unreadable", "--out", "rows.jsonl", cwd=tmp_path)
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 2
    assert "exists already" in refused_here("predict", str(folder), "new", "--out", "rows.jsonl", cwd=tmp_path)
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 2  # not replaced without --force


@pytest.mark.parametrize("kind", ["laplace", "ensemble"])
def test_a_calibrated_bayesian_teacher_exports_its_cached_predictive(single_thread, tmp_path, kind):
    """The calibrated teacher (the one whose BCPs the cache holds) as one ONNX graph: its probabilities on the
    training inputs equal the cached rows; predict adds the epistemic column."""
    extra = ["--members", "2"] if kind == "ensemble" else []
    teacher = here("train-teacher", "--bayes", kind, "--epochs", "2", *extra, "--set", "data.n_train=400", "--set",
                   "data.n_heldout=200", "--set", "data.n_test=200", "--out", "t", cwd=tmp_path).strip()
    cache = tmp_path / here("calibrate", "--teacher", teacher, "--temperature", "fit", cwd=tmp_path).strip()
    calibrated = cache.parent / "teacher.pt"
    folder = tmp_path / here("export", str(calibrated), "--out", "exp", "--format", "onnx", cwd=tmp_path).strip()
    manifest = json.loads((folder / "bcpkd-export.json").read_text())
    assert manifest["exact"] and manifest["kind"] == "teacher"
    assert manifest["epistemic"] == ("logit_variance" if kind == "laplace" else "mutual_information")
    assert manifest["outputs"] == ["logits", "probs", "epistemic"]
    from safetensors.torch import load_file

    cached = load_file(str(cache))["probs"][:, 0, :].float()  # [N, C], view 0, T_t = 1
    from bcpkd_cli.config import DataConfig
    from bcpkd_cli.data import load_dataset

    train = load_dataset(DataConfig(n_train=400, n_heldout=200, n_test=200)).train.inputs
    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    probs = torch.from_numpy(session.run(["probs"], {"input": train.numpy()})[0])
    assert (probs - cached).abs().max() < 1e-5
    np.savez(tmp_path / "rows.npz", x_test=train[:4].numpy())
    rows = list(csv.DictReader(io.StringIO(here("predict", str(folder), "rows.npz", cwd=tmp_path))))
    assert len(rows) == 4 and all(float(r[manifest["epistemic"]]) >= 0 for r in rows)


@pytest.mark.slow
def test_the_python_page_runs_as_written(birds_student, image_folder, tmp_path):
    code = re.search(r"```python\n(.*?)```", (Path(__file__).resolve().parents[1] / "docs" / "python.md").read_text(), re.S).group(1)
    shutil.copytree(birds_student[0].parent, tmp_path / "runs" / "birds-student")  # distill ... --out runs/birds-student
    shutil.copy(image_folder / "test" / "cat" / "001.png", tmp_path / "a.jpg")
    shutil.copy(image_folder / "test" / "ship" / "001.png", tmp_path / "b.jpg")
    printed = _run_snippet(code, tmp_path, without_bcpkd=False).splitlines()
    assert len(printed) == 3 and printed[-1] == "True"
    assert all(line.split()[0] in ("bird", "cat", "ship") for line in printed[:2])


def test_predict_reads_a_headerless_csv_whole_and_refuses_missing_inputs(table_student, tmp_path):
    """A .csv whose first row is numbers has no header: every line is a row (line numbers from 1), the same
    probabilities as with a header; a missing input is one line, exit 2, before any row."""
    work, _, folder = table_student
    features = np.random.default_rng(0).normal(size=(3, 30)).round(4)
    plain, headed = tmp_path / "plain.csv", tmp_path / "headed.csv"
    plain.write_text("".join(",".join(map(str, row)) + "\n" for row in features))
    headed.write_text(",".join(f"x{i}" for i in range(30)) + "\n" + plain.read_text())
    rows = {name: list(csv.DictReader(io.StringIO(here("predict", str(folder), str(path), cwd=work))))
            for name, path in (("plain", plain), ("headed", headed))}
    assert [r["input"] for r in rows["plain"]] == [f"{plain}:{i}" for i in (1, 2, 3)]
    assert [r["input"] for r in rows["headed"]] == [f"{headed}:{i}" for i in (2, 3, 4)]
    assert [r["top_k"] for r in rows["plain"]] == [r["top_k"] for r in rows["headed"]]
    error = refused_here("predict", str(folder), "nothere.csv", str(plain), cwd=work)
    assert error.strip() == "error: nothere.csv: no such file or folder; give existing inputs (images or folders " \
                            "of them, .csv/.npz feature rows, texts)"
