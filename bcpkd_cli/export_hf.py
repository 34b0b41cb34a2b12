"""The `hf` export format: an `hf:` classifier as the folder transformers loads, checked as transformers runs it.

`hf/` holds `save_pretrained` of the bare network (its head back in place; config.json with id2label and label2id
set to the class names) and of its tokenizer (model_max_length set to data.max_length, so `truncation=True` cuts
where training did). A teacher's T_cal is folded into the head (weight and bias divided by it), so the folder's
logits are already calibrated. Only a predictive that is one network's softmax fits: a student, a deterministic or
temperature teacher, a mean or MAP network; a mixture (ensemble, draws) or a probit predictive does not.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bcpkd_cli.data.text import TextRows, need_text_extra
from bcpkd_cli.deployable import Deployable, Softmaxed, model_input
from bcpkd_cli.export_formats import checked
from bcpkd_cli.models import huggingface
from bcpkd_cli.models.huggingface import TextClassifier, TextFeatures
from bcpkd_cli.teachers.deployed import Tempered


def one_network(deployed: Deployable) -> tuple[nn.Module, float] | None:
    """The network and T_cal of a deployed module that is softmax(network logits / T_cal); None for others."""
    if isinstance(deployed.module, Softmaxed):
        return deployed.module.network, 1.0
    if isinstance(deployed.module, Tempered):
        return deployed.module.network, deployed.module.temperature
    return None


def unfit_reason(deployed: Deployable) -> str:
    """Why the hf format cannot hold `deployed` ("" where it can)."""
    if deployed.preprocess.kind != "text":
        return "only hf: text classifiers export as a Hugging Face folder"
    if one_network(deployed) is None:
        return (f"this {deployed.payload.get('bayes', '')} teacher's predictive ({deployed.predictive}) is not one "
                f"network's softmax, which is all a transformers folder holds")
    return ""


def save_tokenizer(deployed: Deployable, folder: Path) -> None:
    """The model's tokenizer as transformers saves it, truncating at data.max_length by default."""
    tokenizer = huggingface.tokenizer_of(deployed.payload["model"]["hf"])  # fresh: no truncation state of a run
    tokenizer.model_max_length = deployed.preprocess.max_length
    tokenizer.save_pretrained(str(folder))


def _bare(network: nn.Module, temperature: float, classes: list[str]) -> nn.Module:
    """The transformers network of a bcpkd text classifier, T_cal folded into its head, labelled with `classes`."""
    features = next(m for m in network.modules() if isinstance(m, TextFeatures))  # (dropout after it: off in eval)
    net = huggingface.bare(TextClassifier(features, network.head, network.head_name))
    head = net.get_submodule(network.head_name)
    with torch.no_grad():
        head.weight.div_(temperature)
        if head.bias is not None:
            head.bias.div_(temperature)
    net.config.id2label = dict(enumerate(classes))
    net.config.label2id = {name: i for i, name in enumerate(classes)}
    net.config.problem_type = "single_label_classification"
    return net.eval()


def write_hf(deployed: Deployable, rows: TextRows, folder: Path, batch: int) -> float:
    """The hf folder at `folder`; the largest |probs| difference between the folder, loaded and run with plain
    transformers (its tokenizer, padding per batch of `batch` texts), and the deployed module on the texts of
    `rows`."""
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils.logging import disable_progress_bar
    except ImportError:
        raise need_text_extra("--format hf") from None
    disable_progress_bar()  # its bars on writing and loading: bcpkd reports the folder itself
    network, temperature = one_network(deployed)
    _bare(network, temperature, deployed.classes).save_pretrained(str(folder))
    save_tokenizer(deployed, folder)
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    corpus, largest = rows.corpus, 0.0
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        texts = [corpus.texts[r] for r in chunk.rows.tolist()]
        pairs = None if corpus.pairs is None else [corpus.pairs[r] for r in chunk.rows.tolist()]
        with torch.no_grad():
            got = torch.softmax(model(**tokenizer(texts, pairs, truncation=True, padding=True,
                                                  return_tensors="pt")).logits, dim=1)
            want = deployed.module(model_input(chunk, deployed.preprocess))[1]
        largest = max(largest, float((want - got).abs().max()))
    return checked(folder, largest)
