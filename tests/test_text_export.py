"""Ship a text classifier: export's hf/ folder (reloaded by plain transformers in a fresh interpreter), model.onnx
and model.pt2 over token ids, predict on text files and table columns, bcpkd_cli.load on texts, and the formats a
model or teacher cannot take refused in one line. No network: make_text.py's corpus and tiny BERTs."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import bcpkd_cli  # noqa: E402
from bcpkd_cli.export_formats import TOLERANCE  # noqa: E402
from cli_helpers import here, refused_here, run_fresh  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["food", "music", "sports", "weather"]  # make_text.py's topics: the sorted label strings


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, single_thread):
    """make_text.py's corpus (20 sentences per topic; 6 per topic to test), a tiny BERT student trained on its
    labels and exported as hf/ only: (work folder, student.pt, export folder)."""
    spec = importlib.util.spec_from_file_location("make_text", ROOT / "recipes/examples/make_text.py")
    make_text = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_text)
    work = tmp_path_factory.mktemp("text-export")
    rng = np.random.default_rng(0)
    texts = make_text.write_split(work / "train.csv", 20, rng)
    make_text.write_split(work / "test.csv", 6, rng)
    make_text.write_model(work / "student-bert", texts, vocab_size=90, hidden=16, layers=1)
    make_text.write_model(work / "teacher-bert", texts, vocab_size=120, hidden=16, layers=1)
    student = here("distill", "--targets", "onehot", "--data-root", str(work), "--set", "data.max_length=64",
                   "--arch", f"hf:{work}/student-bert", "--set", "distill.arch_kwargs.pretrained=false",
                   "--set", "distill.optimizer=adamw", "--lr", "0.003",
                   "--epochs", "15", "--batch-size", "16", "--out", "s", cwd=work).strip()
    folder = here("export", student, "--format", "hf", "--out", "exp", cwd=work).strip()
    return work, work / student, work / folder


def _test_texts(work: Path) -> list[str]:
    with open(work / "test.csv", newline="") as f:
        return [row["text"] for row in csv.DictReader(f)]


def _snippets(folder: Path) -> dict[str, str]:
    """The model card's snippets, by format."""
    return dict(re.findall(r"### (\w+)\n\n```python\n(.*?)```", (folder / "README.md").read_text(), re.S))


def test_the_hf_folder_loads_in_plain_transformers_with_the_checkpoints_classes_and_probabilities(text_run):
    work, student, folder = text_run
    texts = _test_texts(work)
    printed = run_fresh({"mine": "import json, torch\n"
                              "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
                              "model = AutoModelForSequenceClassification.from_pretrained('hf').eval()\n"
                              "tokenizer = AutoTokenizer.from_pretrained('hf')\n"
                              f"inputs = tokenizer({texts!r}, truncation=True, padding=True, return_tensors='pt')\n"
                              "with torch.no_grad():\n"
                              "    probs = torch.softmax(model(**inputs).logits, dim=1)\n"
                              "labels = [model.config.id2label[i] for i in range(model.config.num_labels)]\n"
                              "print(json.dumps({'labels': labels, 'probs': probs.tolist()}))\n",
                      "card": _snippets(folder)["hf"]}, folder)  # the card's snippet, as written
    reloaded = json.loads(printed["mine"])
    assert reloaded["labels"] == CLASSES
    assert "`bcpkd distill --recipe " in (folder / "README.md").read_text()  # the command that repeats the run
    want = bcpkd_cli.load(student)(texts)  # the checkpoint's own softmax, batch by batch as trained
    assert torch.allclose(torch.tensor(reloaded["probs"]), want, atol=1e-5, rtol=0)
    assert want.argmax(dim=1).unique().numel() > 1  # a trained student, not a constant one

    manifest = json.loads((folder / "bcpkd-export.json").read_text())
    assert manifest["files"] == {"hf": "hf"} and manifest["classes"] == CLASSES and manifest["exact"]
    assert manifest["input"] == {"kind": "text", "inputs": ["input_ids", "attention_mask", "token_type_ids"],
                                 "dtype": "int64", "max_length": 64, "truncation": "at 64 tokens",
                                 "padding": "to the longest text of the batch", "text_column": "text",
                                 "text_pair_column": None, "tokenizer": "hf",
                                 "flops_tokens": manifest["input"]["flops_tokens"]}
    assert manifest["parity"]["examples"] == len(texts) and manifest["parity"]["max_abs_prob_difference"]["hf"] <= 1e-5
    assert json.loads((folder / "hf" / "tokenizer_config.json").read_text())["model_max_length"] == 64
    card = (folder / "README.md").read_text()
    assert "truncating at 64 tokens" in card and "classes, in output order: food, music, sports, weather" in card
    reports = json.loads(here("evaluate", str(student), str(folder), "--json", cwd=work))
    assert reports[1]["kind"] == f"export ({folder / 'hf'} (transformers))"
    assert reports[1]["metrics"]["nll"] == pytest.approx(reports[0]["metrics"]["nll"], abs=1e-5)
    name, probability = printed["card"].split()
    probs = bcpkd_cli.load(student)([manifest["example_text"]])[0]
    assert name == CLASSES[int(probs.argmax())] and float(probability) == pytest.approx(float(probs.max()), abs=1e-5)


def test_predict_classifies_text_files_and_table_columns_as_the_checkpoint_does(text_run):
    work, student, folder = text_run
    texts = _test_texts(work)[:5]
    (work / "new.txt").write_text(f"{texts[0]}\n\n{texts[1]}\n   \n{texts[2]}\n")
    with open(work / "new.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "sentence"]] + [[i, t] for i, t in enumerate(texts)])
    want = [CLASSES[int(i)] for i in bcpkd_cli.load(student)(texts).argmax(dim=1)]
    for model in (str(student), str(folder), str(folder / "hf")):
        rows = list(csv.DictReader(io.StringIO(here("predict", model, "new.txt", cwd=work))))
        assert [r["input"] for r in rows] == ["new.txt:1", "new.txt:3", "new.txt:5"]  # blank lines skipped
        assert [r["class"] for r in rows] == want[:3]
        rows = list(csv.DictReader(io.StringIO(here("predict", model, "new.csv", "--text-column", "sentence",
                                                    cwd=work))))
        assert [r["input"] for r in rows] == [f"new.csv:{i}" for i in range(2, 7)]
        assert [r["class"] for r in rows] == want
        assert all(len(r["top_k"].split(";")) == 3 and 0 <= float(r["entropy"]) <= np.log(4) + 1e-6 for r in rows)
    (work / "gaps.jsonl").write_text(json.dumps({"text": texts[0]}) + "\n" + json.dumps({"text": ""}) + "\n")
    assert "1 unreadable input: gaps.jsonl:2 (empty text); the rows of the other 1 were written" in refused_here(
        "predict", str(student), "gaps.jsonl", cwd=work)
    assert "new.csv: no column 'text' (found: id, sentence); name it with --text-column NAME" in refused_here(
        "predict", str(folder), "new.csv", cwd=work)
    assert "this model classifies text; give .txt files" in refused_here("predict", str(student), "README.md",
                                                                         cwd=folder)


def test_sentence_pairs_are_tokenised_together_and_a_missing_half_is_unreadable(text_run):
    from transformers import AutoTokenizer

    from bcpkd_cli.deployable import TextPreprocess
    from bcpkd_cli.errors import BcpkdError

    tokenizer = AutoTokenizer.from_pretrained(str(text_run[0] / "student-bert"))
    pre = TextPreprocess(tokenizer, 6, ("input_ids", "attention_mask", "token_type_ids"), "a", "b")
    batch = pre.collate([pre("goal match\train"), pre(("song", "bread soup spicy recipe oven cheese"))])
    want = tokenizer(["goal match", "song"], ["rain", "bread soup spicy recipe oven cheese"], truncation=True,
                     max_length=6, padding=True, return_tensors="pt")
    for key in pre.inputs:
        assert torch.equal(batch[key], want[key]), key
    assert want["token_type_ids"][0].tolist().count(1) > 0  # the second text is typed as such
    with pytest.raises(BcpkdError, match="no second text: this model classifies sentence pairs, a tab between"):
        pre("goal match")
    with pytest.raises(BcpkdError, match="empty text"):
        pre(("  ", "rain"))


@pytest.mark.slow
def test_onnx_and_pt2_of_a_text_student_take_token_ids_with_any_batch_and_length(text_run):
    work, student, _ = text_run
    folder = work / here("export", str(student), "--format", "onnx,pt2", "--out", "tokens", cwd=work).strip()
    manifest = json.loads((folder / "bcpkd-export.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "bcpkd-export.json", "model.onnx", "model.pt2",
                                                       "tokenizer"]
    assert all(v <= TOLERANCE for v in manifest["parity"]["max_abs_prob_difference"].values())
    printed = run_fresh(_snippets(folder), folder)  # the card's snippets, as written
    probs = bcpkd_cli.load(student)([manifest["example_text"]])[0]
    assert sorted(printed) == ["onnx", "pt2"]
    for line in printed.values():
        assert line.split()[0] == CLASSES[int(probs.argmax())]
        assert float(line.split()[1]) == pytest.approx(float(probs.max()), abs=1e-5)
    reports = json.loads(here("evaluate", str(student), str(folder / "model.onnx"), str(folder / "model.pt2"),
                              "--json", cwd=work))
    for report in reports[1:]:
        assert report["metrics"]["nll"] == pytest.approx(reports[0]["metrics"]["nll"], abs=1e-5)


def test_a_teachers_calibrated_predictive_is_in_its_export_or_hf_is_refused_in_one_line(text_run):
    """A temperature-calibrated teacher: its hf folder holds T_cal in the head, so plain transformers gives the
    calibrated probabilities. A Laplace teacher's probit predictive is no one network: hf refused (exit 2, one line,
    nothing written), pt2 holds it, its tokenizer beside it, and predict adds the logit variance."""
    work, student, _ = text_run
    texts = _test_texts(work)[:6]
    teacher = here("train-teacher", "--data-root", str(work), "--set", "data.max_length=64", "--arch",
                   f"hf:{work}/teacher-bert", "--set", "teacher.arch_kwargs.pretrained=false",
                   "--set", "teacher.optimizer=adamw", "--lr", "0.003",
                   "--epochs", "15", "--batch-size", "16", "--out", "t", cwd=work).strip()
    cache = work / here("calibrate", "--teacher", teacher, "--temperature", "fit", cwd=work).strip()
    calibrated = cache.parent / "teacher.pt"
    folder = work / here("export", str(calibrated), "--format", "hf", "--out", "teacher-export", cwd=work).strip()
    t_cal = json.loads((folder / "bcpkd-export.json").read_text())["hf"]["t_cal_in_head"]
    assert t_cal != pytest.approx(1.0, abs=1e-3) and f"T_cal {t_cal:.4g} is folded into its head" in \
        (folder / "README.md").read_text()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    network = AutoModelForSequenceClassification.from_pretrained(str(folder / "hf")).eval()
    with torch.no_grad():
        logits = network(**AutoTokenizer.from_pretrained(str(folder / "hf"))(texts, truncation=True, padding=True,
                                                                             return_tensors="pt")).logits
    assert torch.allclose(torch.softmax(logits, dim=1), bcpkd_cli.load(calibrated)(texts), atol=1e-5, rtol=0)
    assert torch.allclose(torch.softmax(logits * t_cal, dim=1), bcpkd_cli.load(work / teacher)(texts), atol=1e-5, rtol=0)

    laplace = here("train-teacher", "--bayes", "laplace", "--init", str(work / teacher), "--epochs", "0",
                   "--data-root", str(work), "--set", "data.max_length=64", "--arch", f"hf:{work}/teacher-bert",
                   "--set", "teacher.arch_kwargs.pretrained=false", "--out", "lt", cwd=work).strip()
    refusal = refused_here("export", laplace, "--format", "hf", "--out", "no", cwd=work)
    assert refusal.startswith("error: --format hf: this laplace teacher's predictive (probit of the last-layer kron")
    assert refusal.rstrip().endswith("is not one network's softmax, which is all a transformers folder holds; "
                                     "choose --format onnx,pt2")
    assert not (work / "no").exists()
    assert "--format safetensors: the weights of an hf: model are the hf folder's model.safetensors, in " \
           "transformers' key names; choose --format onnx,pt2,hf" in refused_here(
               "export", str(student), "--format", "safetensors", "--out", "no", cwd=work)
    folder = work / here("export", laplace, "--format", "pt2", "--out", "laplace-export", cwd=work).strip()
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "bcpkd-export.json", "model.pt2", "tokenizer"]
    (work / "few.txt").write_text("\n".join(texts) + "\n")
    rows = list(csv.DictReader(io.StringIO(here("predict", str(folder), "few.txt", cwd=work))))
    probs = bcpkd_cli.load(work / laplace)(texts)
    assert [r["class"] for r in rows] == [CLASSES[int(i)] for i in probs.argmax(dim=1)]
    assert [float(r["probability"]) for r in rows] == pytest.approx(probs.max(dim=1).values.tolist(), abs=1e-5)
    assert all(float(r["logit_variance"]) > 0 for r in rows)


def test_an_export_is_readable_by_others_as_the_umask_allows(text_run):
    """Written through a private staging folder (mkdtemp: 0700), the export takes the umask's modes like every
    other artifact, so colleagues on a shared disk can load it."""
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    folder = text_run[2]
    for path in [folder, *folder.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_init_takes_the_hf_folders_weights_back(text_run):
    """--init with the export's hf/model.safetensors (transformers' names) rebuilds the student's network: a teacher
    of 0 epochs from it gives the student's probabilities."""
    work, student, folder = text_run
    teacher = here("train-teacher", "--init", str(folder / "hf" / "model.safetensors"), "--epochs", "0",
                   "--data-root", str(work), "--set", "data.max_length=64", "--arch", f"hf:{work}/student-bert",
                   "--set", "teacher.arch_kwargs.pretrained=false", "--out", "from-hf", cwd=work).strip()
    texts = _test_texts(work)[:5]
    torch.testing.assert_close(bcpkd_cli.load(work / teacher)(texts), bcpkd_cli.load(student)(texts), atol=1e-6,
                               rtol=0)
