"""Offline stand-ins for what recipes/glue-sst2.yaml downloads: a pretrained BERT checkpoint as the Hub holds
bert-base-uncased (BertForPreTraining's weights: `bert.*` and the pre-training heads `cls.*`) and GLUE SST-2 as
`datasets` stores it (parquet per split, a ClassLabel feature, test labels hidden as -1)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def make_text():
    """recipes/examples/make_text.py as a module."""
    spec = importlib.util.spec_from_file_location("make_text", ROOT / "recipes/examples/make_text.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pretrained_bert(folder: Path, texts: list[str], layers: int, hidden: int = 16, seed: int = 0) -> None:
    """make_text's tokenizer and config, with BertForPreTraining's seeded weights saved beside them."""
    from transformers import BertConfig, BertForPreTraining

    make_text().write_model(folder, texts, vocab_size=120, hidden=hidden, layers=layers)
    torch.manual_seed(seed)
    BertForPreTraining(BertConfig.from_pretrained(folder)).save_pretrained(folder)


def glue_like(folder: Path, per_topic: int = 30) -> list[str]:
    """folder/glue/sst2/{train,validation,test}-00000-of-00001.parquet: make_text's sentences labelled
    negative/positive by topic (sports and music positive), the test split's labels -1; the training texts."""
    import datasets

    rows_file = folder / "sentences.csv"
    texts = make_text().write_split(rows_file, per_topic, np.random.default_rng(0))
    with rows_file.open() as f:
        rows = list(csv.DictReader(f))
    rows_file.unlink()
    features = datasets.Features({"sentence": datasets.Value("string"), "idx": datasets.Value("int32"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    target = folder / "glue/sst2"
    target.mkdir(parents=True)
    cut = len(rows) * 3 // 4
    for split, part, hidden in (("train", rows[:cut], False), ("validation", rows[cut:], False),
                                ("test", rows[cut:], True)):
        labels = [-1 if hidden else int(r["label"] in ("sports", "music")) for r in part]
        datasets.Dataset.from_dict({"sentence": [r["text"] for r in part], "idx": list(range(len(part))),
                                    "label": labels}, features=features
                                   ).to_parquet(str(target / f"{split}-00000-of-00001.parquet"))
    return texts
