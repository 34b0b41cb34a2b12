"""The text recipe through the real CLI (in this process, argument by argument as a shell script gives them): tiny
BERTs with their own tokenizers, one BCP cache per teacher read by students that tokenise differently, and token ids
kept once per tokenizer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import here, here_run, refused_here

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding data/text-example as make_text.py writes it (smaller: 30 sentences per topic, BERTs of
    width 16 and 8), where recipes/text-example.yaml runs as written."""
    spec = importlib.util.spec_from_file_location("make_text", ROOT / "recipes/examples/make_text.py")
    make_text = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_text)
    folder = tmp_path_factory.mktemp("textcli")
    data = folder / "data/text-example"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    texts = make_text.write_split(data / "train.csv", 30, rng)
    make_text.write_split(data / "test.csv", 8, rng)
    make_text.write_model(data / "teacher-bert", texts, vocab_size=120, hidden=16, layers=1)
    make_text.write_model(data / "student-bert", texts, vocab_size=90, hidden=8, layers=1)
    return folder


def test_text_recipe_runs_end_to_end_and_students_share_the_teachers_cache(workdir, no_figures):
    result = here_run("run", str(ROOT / "recipes/text-example.yaml"), "--out", "runs", "--set", "teacher.epochs=2",
                      "--set", "distill.epochs=2", "--set", "data.n_heldout=20", "--set", "experiment.seeds=[0]",
                      cwd=workdir)  # in this process, whose imports are paid (laplace's alone: 8 s of CPU)
    log = result.stderr  # as a batch job leaves it
    assert "laplace teacher hf:data/text-example/teacher-bert around " in log
    assert ": last_layer kron posterior, prior marglik (nothing trained)" in log
    assert " run finished in " in log and "runs/summary.md" in log
    assert "one seed: no standard error" in (workdir / "runs/summary.md").read_text()
    summary = json.loads((workdir / "runs/summary.json").read_text())
    students = {row["name"]: row for row in summary["students"]}
    assert set(students) == {"onehot", "from_bert", "from_laplace"}
    for row in students.values():
        assert 0.0 <= row["accuracy"][0] <= 1.0 and row["grad_noise"][0] > 0  # [mean, std] over seeds
    student = torch.load(workdir / "runs/students/from_laplace-seed0/student.pt", weights_only=True, mmap=True)
    teacher = torch.load(workdir / "runs/teachers/bert_laplace/teacher.pt", weights_only=True, mmap=True)
    assert student["model"]["hf"]["tokenizer"] != teacher["model"]["hf"]["tokenizer"]  # another vocabulary
    cache = Path(student["targets"]["cache"])
    assert cache.parent.parent == (workdir / "runs/teachers/bert_laplace/bcp").resolve()
    assert student["data"]["classes"] == ["food", "music", "sports", "weather"]
    assert student["data"]["fingerprint"] == teacher["data"]["fingerprint"]
    assert not {"normalize", "augment", "hidden"} & set(teacher["config"]["teacher"])  # keys text does not read
    assert teacher["config"]["teacher"]["optimizer"] == "adamw" and teacher["config"]["data"]["max_length"] == 64
    # five networks trained and evaluated, two tokenizers at max_length 64: each tokenised the corpus once
    kept = sorted((workdir / "data/text-example/.bcpkd-store").glob("tokens-*.safetensors"))
    assert len(kept) == 2


def test_a_student_with_another_tokenizer_learns_the_cached_rows(workdir):
    """distill --teacher reads the teacher's cache (built by calibrate) without building another, and the
    student's targets are exactly its rows."""
    from safetensors.torch import load_file

    data = ["--data-root", "data/text-example", "--set", "data.n_heldout=20", "--set", "data.max_length=64"]
    here("train-teacher", "--bayes", "laplace", "--arch", "hf:data/text-example/teacher-bert", *data,
         "--set", "teacher.arch_kwargs.pretrained=false", "--epochs", "1", "--out", "t", cwd=workdir)
    assert "no pretrained weights in data/text-example/student-bert" in refused_here(  # before any cache is built
        "distill", "--teacher", "t/teacher.pt", "--arch", "hf:data/text-example/student-bert", "--out", "s",
        cwd=workdir)
    assert not (workdir / "t/bcp").exists() and not (workdir / "s").exists()
    calibrated = here("calibrate", "--teacher", "t/teacher.pt", cwd=workdir)
    caches = list((workdir / "t/bcp").glob("*/bcp.safetensors"))
    assert len(caches) == 1 and caches[0].parent.name in calibrated
    here("distill", "--teacher", "t/teacher.pt", "--arch", "hf:data/text-example/student-bert",
         "--set", "distill.arch_kwargs.pretrained=false", "--epochs", "1", "--out", "s", cwd=workdir)
    assert list((workdir / "t/bcp").glob("*/bcp.safetensors")) == caches  # no other cache was built
    student = torch.load(workdir / "s/student.pt", weights_only=True, mmap=True)
    assert Path(student["targets"]["cache"]).resolve() == caches[0].resolve()
    assert Path(student["targets"]["calibrated_teacher"]) == (caches[0].parent / "teacher.pt").resolve()
    rows = load_file(str(caches[0]))["probs"]  # [N, V=1, C]
    assert rows.shape == (120 - 20, 1, 4) and torch.allclose(rows.sum(-1), torch.ones(100, 1))


@pytest.mark.parametrize(("args", "says"), [
    ([], "teacher.arch: text data take a Hugging Face classifier; name one with --arch hf:NAME_OR_DIR"),
    (["--arch", "resnet20"], "text data take a Hugging Face classifier"),
    (["--bayes", "vi", "--arch", "hf:data/text-example/teacher-bert"],
     "--bayes vi: hf:data/text-example/teacher-bert is a transformer"),
    (["--arch", "hf:data/nothing-here"], "hf:data/nothing-here: no folder data/nothing-here here; give a folder "
                                         "with config.json"),
    (["--arch", "hf:nobody/no-such-model"], "hf:nobody/no-such-model: transformers could not load it"),
    (["--arch", "hf:data/text-example/teacher-bert", "--set", "data.text_column=sentence"],
     "no column 'sentence' (found: text, label); name it with --set data.text_column=NAME"),
    (["--arch", "hf:data/text-example/teacher-bert", "--set", "data.max_length=100"],
     "data.max_length 100: hf:data/text-example/teacher-bert reads at most 64 tokens per example (its position "
     "embeddings); set --set data.max_length=64 (or less)"),
    (["--arch", "hf:data/text-example/teacher-bert", "--set", "data.max_length=64"],  # a config, no weights
     "hf:data/text-example/teacher-bert: no pretrained weights in data/text-example/teacher-bert (no "
     "model.safetensors or pytorch_model.bin); give a folder with them, or for a fresh network --set "
     "teacher.arch_kwargs.pretrained=false"),
], ids=["no-arch", "image-arch", "vi", "no-such-folder", "no-such-model", "no-such-column", "too-long", "no-weights"])
def test_text_mistakes_are_one_line_before_any_work(workdir, args, says):
    error = refused_here("train-teacher", "--data-root", "data/text-example", *args, "--out", "x", cwd=workdir)
    assert says in error
    assert not (workdir / "x").exists()


def test_bf16_autocast_trains_a_text_teacher_and_says_so(workdir):
    """precision bf16 on a CPU (the arithmetic `auto` gives on CUDA): from the same seed's start, the bf16 teacher's
    weights differ from the float32 teacher's (autocast ran) by far less than training moved them (it trained the
    same way), and the first line names the arithmetic."""
    data = ["--data-root", "data/text-example", "--set", "data.n_heldout=20", "--set", "data.max_length=64",
            "--arch", "hf:data/text-example/teacher-bert", "--set", "teacher.arch_kwargs.pretrained=false",
            "--set", "teacher.batch_size=16", "--set", "teacher.optimizer=adamw", "--set", "teacher.lr=0.002"]
    runs = {}
    for name, epochs, precision in (("start", "0", "float32"), ("float32", "3", "float32"), ("bf16", "3", "bf16")):
        result = here_run("train-teacher", *data, "--epochs", epochs, "--set", f"precision={precision}", "--out",
                          f"p-{name}", cwd=workdir)
        first = next(text for text in result.stderr.splitlines() if " train-teacher: " in text)
        assert first.split(", device ")[1].startswith("cpu (bf16 autocast) ->" if precision == "bf16" else "cpu ->")
        runs[name] = torch.load(workdir / f"p-{name}/teacher.pt", weights_only=True)["state_dict"]

    def distance(a: str, b: str) -> float:
        return torch.sqrt(sum(((runs[a][k] - runs[b][k]).float() ** 2).sum() for k in runs[a])).item()

    assert 0 < distance("bf16", "float32") < 0.1 * distance("float32", "start")


def test_the_glue_recipe_runs_as_written_on_offline_stand_ins(tmp_path, no_figures):
    """recipes/glue-sst2.yaml as a GPU node runs it, with its downloads replaced by local stand-ins (a 6-layer
    pretrained BERT folder named bert-base-uncased, GLUE SST-2's parquet layout under glue/sst2) and only its sizes
    overridden (and the students' gradient noise off): the 4-layer student takes the checkpoint's first 4 layers,
    the hidden test labels give way to the validation split, and every student and teacher is evaluated."""
    from text_stand_ins import glue_like, pretrained_bert

    texts = glue_like(tmp_path)
    pretrained_bert(tmp_path / "bert-base-uncased", texts, layers=6)
    result = here_run("run", str(ROOT / "recipes/glue-sst2.yaml"), "--out", "runs", "--set", "data.max_length=64",
                      "--set", "data.n_heldout=16", "--set", "experiment.seeds=[0]", "--set", "teacher.epochs=1",
                      "--set", "distill.epochs=1", "--set", "distill.grad_noise_examples=0", cwd=tmp_path)
    log = result.stderr
    assert "data: hf glue/sst2: 2 classes (negative, positive); 74 train, 16 held-out, 30 test examples" in log
    assert "hf:bert-base-uncased: pretrained weights for 71 of its 73 tensors; new: classifier.bias, " \
           "classifier.weight; 39 of the checkpoint's not used (bert.encoder.layer.4." in log  # the 4-layer students
    assert "Generating" not in log and "Loading weights" not in log  # the libraries' progress bars stay off
    summary = json.loads((tmp_path / "runs/summary.json").read_text())
    assert {row["name"] for row in summary["students"]} == {"onehot", "from_bert_base", "from_laplace"}
    assert {row["name"] for row in summary["teachers"]} >= {"bert_base", "bert_base_laplace"}
    student = torch.load(tmp_path / "runs/students/from_laplace-seed0/student.pt", weights_only=True, mmap=True)
    assert student["data"]["classes"] == ["negative", "positive"]
    assert student["model"]["hf"]["config"]["num_hidden_layers"] == 4
    loaded = "hf:bert-base-uncased: pretrained weights for 71 of its 73 tensors"  # recorded, not only logged
    assert student["history"]["pretrained"].startswith(loaded)
    assert f"# {loaded}" in (tmp_path / "runs/students/from_laplace-seed0/config.yaml").read_text()
    teacher = torch.load(tmp_path / "runs/teachers/bert_base/teacher.pt", weights_only=True, mmap=True)
    assert teacher["history"]["pretrained"][0].startswith("hf:bert-base-uncased: pretrained weights for 103 of its")


def test_two_processes_distill_the_single_process_text_student(workdir, tmp_path):
    """torchrun on text (gloo on the CPU): without dropout, two processes train the single-process student up to
    float summation order; both tokenise a fresh copy of the corpus at once and keep one token file. (With the
    network's own dropout each process draws its own masks: the same training in distribution, not in bits.)"""
    import shutil

    from cli_helpers import torchrun

    shutil.copytree(workdir / "data/text-example", tmp_path / "data", ignore=shutil.ignore_patterns(".bcpkd-store"))
    student = ["--targets", "onehot", "--data-root", "data", "--set", "data.n_heldout=20", "--set",
               "data.max_length=64", "--device", "cpu", "--arch", "hf:data/student-bert", "--set",
               "distill.arch_kwargs={pretrained: false, hidden_dropout_prob: 0, attention_probs_dropout_prob: 0}",
               "--epochs", "1", "--set", "distill.batch_size=16", "--set", "distill.optimizer=adamw"]
    result = torchrun("distill", *student, "--out", "two", cwd=tmp_path)
    assert result.stdout.strip() == "two/student.pt"
    here("distill", *student, "--set", "threads=1", "--out", "one", cwd=tmp_path)
    one, two = (torch.load(tmp_path / f"{name}/student.pt", weights_only=True) for name in ("one", "two"))
    assert two["history"]["processes"] == 2
    for name, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][name], value, rtol=0, atol=1e-5)
    assert len(list((tmp_path / "data/.bcpkd-store").glob("tokens-*.safetensors"))) == 1
