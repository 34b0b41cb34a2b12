"""Text data and Hugging Face classifiers: tables read alike in every format, token ids per tokenizer kept once and
padded per batch, the features/head split, and a last-layer Laplace teacher equal to laplace-torch's predictive.
No network: tiny BERT configs and tokenizers trained here (recipes/examples/make_text.py)."""

from __future__ import annotations

import csv
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from bcpkd_cli.config import build_recipe  # noqa: E402
from bcpkd_cli.data import load_dataset  # noqa: E402
from bcpkd_cli.data.text import Corpus, TextRows  # noqa: E402
from bcpkd_cli.errors import BcpkdError  # noqa: E402
from bcpkd_cli.models import build_model, model_spec  # noqa: E402
from bcpkd_cli.models.huggingface import tokenizer_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    """make_text.py's corpus (20 sentences per topic) and tiny teacher/student BERT folders."""
    spec = importlib.util.spec_from_file_location("make_text", ROOT / "recipes/examples/make_text.py")
    make_text = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_text)
    folder = tmp_path_factory.mktemp("text")
    rng = __import__("numpy").random.default_rng(0)
    texts = make_text.write_split(folder / "train.csv", 20, rng)
    make_text.write_split(folder / "test.csv", 6, rng)
    make_text.write_model(folder / "teacher-bert", texts, vocab_size=120, hidden=16, layers=1)
    make_text.write_model(folder / "student-bert", texts, vocab_size=90, hidden=8, layers=1)
    return folder


def _data(root: Path | str, **data) -> object:
    return load_dataset(build_recipe({"data": {"root": str(root), **data}}).data)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_table_format_reads_the_same_dataset(text_data, tmp_path):
    import pyarrow
    import pyarrow.parquet

    rows = _rows(text_data / "train.csv")
    (tmp_path / "t.tsv").write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "t.parquet")
    datasets = [_data(text_data / "train.csv")] + [_data(tmp_path / f"t.{s}") for s in ("tsv", "jsonl", "parquet")]
    first = datasets[0]
    assert first.config.name.value == "text" and first.classes == ("food", "music", "sports", "weather")
    assert len(first.test) == 80 // 5 and len(first.train) + len(first.heldout) == 80 - 16  # a seeded fifth is test
    for other in datasets[1:]:
        assert other.fingerprint == first.fingerprint and other.classes == first.classes
        assert torch.equal(other.train.labels, first.train.labels)
    names = [r["label"] for r in rows]
    assert [first.classes[int(y)] for y in first.train.labels] == [names[int(i)] for i in first.train.inputs.rows]


def test_a_folder_gives_its_test_file_labelled_by_name(text_data):
    data = _data(text_data, n_heldout=8)
    test_rows = _rows(text_data / "test.csv")
    assert len(data.test) == len(test_rows) and len(data.heldout) == 8 and len(data.train) == 80 - 8
    assert [data.classes[int(y)] for y in data.test.labels] == [r["label"] for r in test_rows]
    assert data.test.inputs.texts()[:2] == [r["text"] for r in test_rows[:2]]


def test_bad_text_tables_are_refused_with_the_key_to_set(tmp_path):
    (tmp_path / "a.tsv").write_text("sentence\tlabel\nhello there\tx\n")
    with pytest.raises(BcpkdError, match=r"no column 'text' \(found: sentence, label\); name it with --set "
                                         r"data.text_column=NAME"):
        _data(tmp_path / "a.tsv")
    (tmp_path / "b").mkdir()
    (tmp_path / "b/train.tsv").write_text("text\tlabel\nhello\tx\nbye\ty\nhi\tx\n")
    (tmp_path / "b/test.tsv").write_text("text\tlabel\nhello\tz\n")
    with pytest.raises(BcpkdError, match="label 'z' of the test examples is no training class"):
        _data(tmp_path / "b", n_heldout=1)
    with pytest.raises(BcpkdError, match="text data take a Hugging Face classifier; name one with --arch hf:"):
        build_recipe({"data": {"root": str(tmp_path / "b")}, "distill": {"arch": "mlp"}})


def test_integer_labels_name_classes_by_number_and_pairs_keep_both_texts(tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"a": f"q{i}", "b": f"r{i}", "y": i % 3}) + "\n"
                                              for i in range(30)))
    data = _data(tmp_path / "p.jsonl", text_column="a", text_pair_column="b", label_column="y", n_heldout=3)
    assert data.classes == ("0", "1", "2")
    first = int(data.train.inputs.rows[0])
    assert data.train.inputs[:1].texts() == [f"q{first}\tr{first}"] and int(data.train.labels[0]) == first % 3


def test_ids_are_the_tokenizers_padded_per_batch_and_kept_once_per_tokenizer(text_data, tmp_path):
    teacher = tokenizer_of(_description(text_data / "teacher-bert"))
    student = tokenizer_of(_description(text_data / "student-bert"))
    texts = ["sports goal match", "rain", "bread soup spicy recipe oven cheese", "song"]
    corpus = Corpus(texts, None, 6, tmp_path)
    rows = TextRows(corpus, torch.arange(4))
    batch = rows[torch.tensor([1, 3])].encode(teacher)  # padded to the longer of the two, not to max_length
    want = [teacher(t)["input_ids"] for t in ("rain", "song")]
    assert batch["input_ids"].shape[1] == max(map(len, want))
    for i, ids in enumerate(want):
        assert batch["input_ids"][i, :len(ids)].tolist() == ids
        assert batch["input_ids"][i, len(ids):].eq(teacher.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [1] * len(ids) + [0] * (batch["input_ids"].shape[1] - len(ids))
    truncated = rows[2:3].encode(teacher)["input_ids"][0].tolist()
    assert truncated == teacher(texts[2], truncation=True, max_length=6)["input_ids"] and len(truncated) == 6
    rows.encode(student)
    kept = sorted(p.name for p in tmp_path.glob("tokens-*.safetensors"))
    assert len(kept) == 2  # one file per tokenizer
    again = Corpus(texts, None, 6, tmp_path)  # a new process: the ids are read, not tokenised

    class NoTokenising:
        def __getattr__(self, name):
            return getattr(teacher, name)

        def __call__(self, *args, **kwargs):
            raise AssertionError("tokenised again")

    assert torch.equal(TextRows(again, torch.arange(4)).encode(NoTokenising())["input_ids"],
                       rows.encode(teacher)["input_ids"])


def _description(folder: Path) -> dict:
    from bcpkd_cli.models.huggingface import describe

    return describe(f"hf:{folder}", 4, {"pretrained": False})


def _bert(text_data: Path, n_classes: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(model_spec(f"hf:{text_data / 'teacher-bert'}", (), n_classes, (),
                                  arch_kwargs={"pretrained": False}))


def test_the_head_is_berts_classifier_and_features_feed_it(text_data):
    model = _bert(text_data).eval()
    data = _data(text_data, n_heldout=8)
    batch = data.test.inputs[:5]
    net = model.features.net
    assert model.head_name == "classifier" and model.head.out_features == 4
    encoded = batch.encode(model.features.tokenizer)
    with torch.no_grad():
        reference = __import__("copy").deepcopy(net)
        reference.classifier = model.head
        torch.testing.assert_close(model(batch), reference(**encoded).logits)


def test_laplace_over_a_bert_classifier_is_laplace_torchs_last_layer_predictive(text_data):
    """bcpkd's last-layer Kron Laplace (its closed-form probit) on text rows equals laplace-torch's own
    last-layer Laplace (its default backend and GLM probit predictive) on the same network and data."""
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    from bcpkd_cli.config import Hessian, LaplaceConfig, Link, Subset
    from bcpkd_cli.teachers.laplace import LaplaceTeacher

    data = _data(text_data, n_heldout=8)
    model = _bert(text_data, seed=1).eval()
    teacher = LaplaceTeacher(model, LaplaceConfig(subset=Subset.last_layer, hessian=Hessian.kron, link=Link.probit))
    teacher.fit(data.train.inputs, data.train.labels)
    teacher.la.prior_precision = torch.tensor([1e-3])
    got = teacher.predict_probs(data.test.inputs, torch.arange(len(data.test)))

    class ByRow(torch.nn.Module):  # laplace-torch takes tensors: example numbers in, the classifier's logits out
        def __init__(self, rows: TextRows):
            super().__init__()
            self.model, self.rows = model, rows

        def forward(self, index):
            return self.model(self.rows[index.long()])

    train = ByRow(data.train.inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(train, "classification", subset_of_weights="last_layer", hessian_structure="kron",
                     last_layer_name="model.head")
        la.fit(DataLoader(TensorDataset(torch.arange(len(data.train)).float(), data.train.labels), batch_size=16))
        la.prior_precision = torch.tensor([1e-3])
        train.rows = data.test.inputs
        want = la(torch.arange(len(data.test)).float(), pred_type="glm", link_approx="probit")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - torch.softmax(model(data.test.inputs), 1)).abs().max() > 1e-3  # the posterior changes the predictive


def test_a_datasets_folder_reads_through_load_dataset_and_hidden_test_labels_give_way(tmp_path, monkeypatch):
    """data.name hf: datasets.load_dataset on a local folder (no network); a test split whose labels are -1
    (GLUE hides them) gives way to the validation split."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for split, count, label in (("train", 40, None), ("validation", 12, None), ("test", 9, -1)):
        (tmp_path / f"{split}.jsonl").write_text("".join(
            json.dumps({"sentence": f"{split} {i}", "label": i % 2 if label is None else label}) + "\n"
            for i in range(count)))
    data = _data(tmp_path, name="hf", text_column="sentence", n_heldout=4)
    assert data.classes == ("0", "1") and len(data.test) == 12 and len(data.train) == 36
    assert data.test.inputs[:2].texts() == ["validation 0", "validation 1"]
    assert data.test.labels[:4].tolist() == [0, 1, 0, 1]


def test_the_example_tokenizers_are_the_same_for_the_same_texts(text_data, tmp_path):
    """make_text.py writes the same files for the same arguments: its WordPiece vocabulary is learned from word
    counts (every character, then the most frequent words, ties alphabetical), not in hash order."""
    spec = importlib.util.spec_from_file_location("make_text", ROOT / "recipes/examples/make_text.py")
    make_text = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_text)
    with open(text_data / "train.csv", newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    make_text.write_model(tmp_path / "again", texts, vocab_size=90, hidden=8, layers=1)
    assert (tmp_path / "again" / "tokenizer.json").read_text() == \
        (text_data / "student-bert" / "tokenizer.json").read_text()
    vocab = make_text.wordpiece_vocab(["b a b", "c b"], 11)
    assert list(vocab) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "##a", "##b", "##c"]
    assert list(make_text.wordpiece_vocab(["bb aa bb", "cc bb aa"], 14))[-3:] == ["bb", "aa", "cc"]


@pytest.mark.parametrize("model_type, config, head_name", [
    ("distilbert", {"dim": 16, "n_layers": 1, "n_heads": 2, "hidden_dim": 32, "max_position_embeddings": 64},
     "classifier"),
    ("roberta", {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                 "max_position_embeddings": 65, "pad_token_id": 0, "type_vocab_size": 1}, "classifier.out_proj"),
    ("gpt2", {"n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 64, "pad_token_id": 0}, "score"),
])
def test_other_families_split_into_features_and_their_own_head(text_data, tmp_path, model_type, config, head_name):
    """DistilBERT, RoBERTa and GPT-2 classifiers (tiny configs, make_text's tokenizer): the head is the family's own
    last layer, the model's logits are the bare network's, and max_length is checked against its positions."""
    from transformers import AutoConfig

    folder = tmp_path / model_type
    folder.mkdir()
    for file in (text_data / "teacher-bert").iterdir():
        if file.name != "config.json":
            (folder / file.name).write_text(file.read_text())
    vocab = json.loads((text_data / "teacher-bert" / "config.json").read_text())["vocab_size"]
    AutoConfig.for_model(model_type, vocab_size=vocab, **config).save_pretrained(folder)
    torch.manual_seed(0)
    model = build_model(model_spec(f"hf:{folder}", (), 4, (), arch_kwargs={"pretrained": False})).eval()
    assert model.head_name == head_name and model.head.out_features == 4
    batch = _data(text_data, n_heldout=8).test.inputs[:5]
    encoded = {k: v for k, v in batch.encode(model.features.tokenizer).items()
               if k != "token_type_ids" or model.features.takes_types}
    from bcpkd_cli.models.huggingface import bare, require_length, token_limit

    with torch.no_grad():
        torch.testing.assert_close(model(batch), bare(model)(**encoded).logits)
    description = _description(folder)
    assert token_limit(description) == 64  # RoBERTa's positions start after the padding index (0): 65 - 1 tokens
    with pytest.raises(BcpkdError, match="reads at most 64 tokens"):
        require_length(f"hf:{folder}", description, 65)


def test_pretrained_weights_fill_the_body_and_the_log_says_which(text_data, tmp_path):
    """A 3-layer pre-training checkpoint (bert-base-uncased's layout) read into a 2-layer classifier: the embeddings
    and the first 2 layers are the checkpoint's tensors, the classifier is new, the rest goes unused, and one line
    says so. A checkpoint whose names fit nothing is refused (training would silently start from scratch)."""
    from safetensors.torch import load_file, save_file

    from bcpkd_cli.models import settle_pretrained
    from text_stand_ins import pretrained_bert

    with open(text_data / "train.csv", newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    folder = tmp_path / "bert-like"
    pretrained_bert(folder, texts, layers=3)
    saved = load_file(str(folder / "model.safetensors"))
    model = build_model(model_spec(f"hf:{folder}", (), 4, (), arch_kwargs={"num_hidden_layers": 2}))
    own = model.features.net.state_dict()
    for key in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.output.dense.weight",
                "bert.pooler.dense.weight"):
        torch.testing.assert_close(own[key], saved[key], atol=0, rtol=0)
    assert not any(k.startswith("bert.encoder.layer.2.") for k in own)
    unused = len([k for k in saved if k.startswith(("cls.", "bert.encoder.layer.2."))])
    classes = ("food", "music", "sports", "weather")
    assert settle_pretrained(model, classes) == (
        f"hf:{folder}: pretrained weights for {len(own)} of its {len(own) + 2} tensors; new: classifier.bias, "
        f"classifier.weight; {unused} of the checkpoint's not used (bert.encoder.layer.2.attention.output.LayerNorm."
        f"bias and {unused - 1} more)")
    fresh = build_model(model_spec(f"hf:{folder}", (), 4, (), arch_kwargs={"pretrained": False}))
    assert settle_pretrained(fresh, classes) is None
    save_file({f"encoder.{k}": v for k, v in saved.items()}, str(folder / "model.safetensors"), {"format": "pt"})
    with pytest.raises(BcpkdError, match=r"none of its checkpoint's tensors fit BertForSequenceClassification "
                                         r"beyond its head \(its own: encoder\.bert\.embeddings"):
        build_model(model_spec(f"hf:{folder}", (), 4, (), arch_kwargs={}))
    classifier = {"classifier.weight": torch.zeros(4, 16), "classifier.bias": torch.zeros(4)}  # a head that fits
    save_file({**{f"encoder.{k}": v for k, v in saved.items()}, **classifier}, str(folder / "model.safetensors"),
              {"format": "pt"})
    with pytest.raises(BcpkdError, match="beyond its head"):
        build_model(model_spec(f"hf:{folder}", (), 4, (), arch_kwargs={}))


def test_a_fine_tuned_head_reads_its_classes_in_the_datas_order(text_data, tmp_path):
    """A checkpoint that already classifies (a user's fine-tuned teacher) keeps its head; its rows follow config.json's
    id2label, which need not be the data's (sorted) class order: they are put in the data's order, and names that
    are not the data's classes are refused rather than read as the wrong classes."""
    from transformers import BertConfig, BertForSequenceClassification

    from bcpkd_cli.models import settle_pretrained

    folder = tmp_path / "fine-tuned"
    folder.mkdir()
    for file in (text_data / "teacher-bert").iterdir():
        if file.name != "config.json":
            (folder / file.name).write_text(file.read_text())
    config = BertConfig.from_pretrained(text_data / "teacher-bert", num_labels=4,
                                        id2label={0: "Sports", 1: "food", 2: "weather", 3: "music"})
    torch.manual_seed(0)
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    batch = _data(text_data, n_heldout=8).test.inputs[:3]
    model = build_model(model_spec(f"hf:{folder}", (), 4, (), arch_kwargs={})).eval()
    with torch.no_grad():
        before = model(batch)  # [3, 4] in the checkpoint's order
        note = settle_pretrained(model, ("food", "music", "sports", "weather"))
        torch.testing.assert_close(model(batch), before[:, [1, 3, 0, 2]])
    assert note == (f"hf:{folder}: pretrained weights for 25 of its 25 tensors; its head's classes (Sports, food, "
                    f"weather, music) reordered to the data's (food, music, sports, weather)")
    assert settle_pretrained(model, ("food", "music", "sports", "weather")) == note.split("; its head")[0]  # once
    numbered = build_model(model_spec(f"hf:{folder}", (), 4, (), arch_kwargs={}))
    assert settle_pretrained(numbered, ("0", "1", "2", "3")).endswith(
        "; the data's labels are numbers: read as its head's classes (0: Sports, 1: food, 2: weather, 3: music)")
    with pytest.raises(BcpkdError, match=r"its head classifies Sports, food, weather, music \(config.json's "
                                         r"id2label\), the data's classes are a, b, c, d; give id2label"):
        settle_pretrained(build_model(model_spec(f"hf:{folder}", (), 4, (), arch_kwargs={})), ("a", "b", "c", "d"))
    config.id2label = {i: f"LABEL_{i}" for i in range(4)}  # as transformers names the classes of an unnamed head
    config.save_pretrained(folder)
    unnamed = build_model(model_spec(f"hf:{folder}", (), 4, (), arch_kwargs={}))
    assert settle_pretrained(unnamed, ("a", "b", "c", "d")).endswith(
        "; its head's classes are unnamed (LABEL_0 .. LABEL_3): read in the data's order (a, b, c, d)")
