"""Hugging Face text classifiers (`hf:NAME_OR_DIR`): `AutoModelForSequenceClassification` with num_labels=C and the
tokenizer from the same place, split into `features` and `head` like every bcpkd model.

`describe` reads the config and the tokenizer once (from the Hub or a local folder) and returns them as plain values
that a checkpoint stores, so that `build` rebuilds the network from the checkpoint alone (no Hub, no folder).
`arch_kwargs`: `pretrained` (default true: the weights of NAME_OR_DIR; false: a fresh network from its config)
and config overrides (e.g. num_hidden_layers: 4). The head is the network's last nn.Linear (BERT's and
DistilBERT's `classifier`, RoBERTa's `classifier.out_proj`, GPT-2's `score`); `features` is the network with that
layer replaced by an identity, checked to give head(features(x)) == the network's logits. Code from the Hub
(`trust_remote_code`) runs only with --trust-code.
"""

from __future__ import annotations

import inspect
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from bcpkd_cli.data.text import TextRows, need_text_extra
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.models.base import FeaturesHead
from bcpkd_cli.models.foreign import trusted

PREFIX = "hf:"
FRESH = "--set teacher.arch_kwargs.pretrained=false (a student: distill.arch_kwargs.pretrained=false)"


def _remote_code() -> bool:
    """--trust-code: transformers may run the code a model's folder or Hub page ships (never otherwise)."""
    return trusted()[1]


def is_hf(arch: str) -> bool:
    return arch.startswith(PREFIX)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise need_text_extra("hf: architectures") from None
    transformers.logging.set_verbosity_error()  # its notes on freshly initialised heads: bcpkd says what it does
    transformers.utils.logging.disable_progress_bar()  # its bars ("Loading weights") would fill a batch job's log
    return transformers


def _missing_folder(source: str) -> bool:
    """A name that can only be a local folder (a path from / . or ~, more than ORG/NAME, or under a folder that is
    here) and is not here: said at once instead of after the Hub's retries."""
    path = Path(source).expanduser()
    if path.exists():
        return False
    return source.startswith(("/", ".", "~")) or len(path.parts) > 2 or \
        (len(path.parts) == 2 and Path(path.parts[0]).is_dir())


def describe(arch: str, n_classes: int, arch_kwargs: dict) -> dict:
    """{"config": the model config as a dict (num_labels=C, overrides applied), "tokenizer": {file name: text}}."""
    transformers = _transformers()
    source = arch[len(PREFIX):]
    if _missing_folder(source):
        raise BcpkdError(f"{arch}: no folder {source} here; give a folder with config.json and the tokenizer's "
                         f"files, or a Hub name (ORG/NAME) on a connected machine")
    overrides = {k: v for k, v in arch_kwargs.items() if k != "pretrained"}
    try:
        config = transformers.AutoConfig.from_pretrained(source, num_labels=n_classes,
                                                         trust_remote_code=_remote_code(), **overrides)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=_remote_code())
    except (OSError, ValueError) as err:
        raise BcpkdError(f"{arch}: transformers could not load it ({str(err).splitlines()[0][:200]}); give a Hub "
                         f"name (on a connected machine) or a folder with config.json and the tokenizer's files"
                         f"{'' if _remote_code() else ', or --trust-code for a model that ships its own code'}") \
            from None
    if not getattr(tokenizer, "is_fast", False) or tokenizer.pad_token_id is None:
        raise BcpkdError(f"{arch}: bcpkd needs a fast tokenizer with a padding token "
                         f"({type(tokenizer).__name__}, pad token {tokenizer.pad_token!r})")
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        files = {p.name: p.read_text(encoding="utf-8") for p in Path(folder).iterdir() if p.is_file()}
    return {"config": config.to_dict(), "tokenizer": files}


# Model types whose position ids start after the padding index: max_position_embeddings - (pad_token_id + 1) are
# usable (RoBERTa's 514 are 512 tokens).
OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text"}


def token_limit(description: dict) -> int | None:
    """The most tokens per example the network reads (its position embeddings), None where its config says none."""
    config = description["config"]
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    if not positions:
        return None
    if config.get("model_type") in OFFSET_POSITIONS:
        pad = config.get("pad_token_id")
        positions -= (1 if pad is None else pad) + 1
    return int(positions)


def require_length(arch: str, description: dict, max_length: int) -> None:
    """Refuse data.max_length beyond what the network reads (longer examples would index past its positions)."""
    limit = token_limit(description)
    if limit is not None and max_length > limit:
        raise BcpkdError(f"data.max_length {max_length}: {arch} reads at most {limit} tokens per example (its "
                         f"position embeddings); set --set data.max_length={limit} (or less)")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def require_weights(arch: str, arch_kwargs: dict) -> None:
    """Refuse, before any work, a local folder that pretrained weights are to come from and that holds none (a Hub
    name is tried when the network is built)."""
    folder = Path(arch[len(PREFIX):]).expanduser()
    if arch_kwargs.get("pretrained", True) and folder.is_dir() and \
            not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise BcpkdError(f"{arch}: no pretrained weights in {folder} (no model.safetensors or pytorch_model.bin); "
                         f"give a folder with them, or for a fresh network {FRESH}")


def tokenizer_of(description: dict):
    """The tokenizer a description holds."""
    transformers = _transformers()
    with tempfile.TemporaryDirectory() as folder:
        for name, text in description["tokenizer"].items():
            Path(folder, name).write_text(text, encoding="utf-8")
        return transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=_remote_code())


def config_of(description: dict):
    transformers = _transformers()
    values = dict(description["config"])
    return transformers.AutoConfig.for_model(values.pop("model_type"), **values)


@dataclass(frozen=True)
class Pretrained:
    """What pretrained weights gave a network: one line for the log, and the class names of the checkpoint's own
    head where that head was loaded (None: a new head)."""

    arch: str
    note: str
    head_labels: tuple[str, ...] | None


def network(arch: str, description: dict, pretrained: bool) -> tuple[nn.Module, Pretrained | None]:
    """The bare AutoModelForSequenceClassification: NAME_OR_DIR's weights (`pretrained`) or fresh from the config;
    with weights, what they gave (`loaded`)."""
    transformers = _transformers()
    config = config_of(description)
    auto = transformers.AutoModelForSequenceClassification
    if not pretrained:  # float32 whatever dtype the config names: `precision` decides the training arithmetic
        return auto.from_config(config, trust_remote_code=_remote_code(), dtype=torch.float32), None
    try:
        net, info = auto.from_pretrained(arch[len(PREFIX):], config=config, ignore_mismatched_sizes=True,
                                         trust_remote_code=_remote_code(), output_loading_info=True,
                                         dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise BcpkdError(f"{arch}: no pretrained weights could be loaded ({str(err).splitlines()[0][:200]}); give "
                         f"a folder with model.safetensors, or for a fresh network {FRESH}") from None
    return net, loaded(arch, net, info)


def _natural(name: str) -> list:
    """Sort key reading the numbers in a tensor name as numbers (layer.4 before layer.10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _names(names: list[str], shown: int = 3) -> str:
    ordered = sorted(names, key=_natural)
    return ", ".join(ordered[:shown]) + (f" and {len(ordered) - shown} more" if len(ordered) > shown else "")


def loaded(arch: str, net: nn.Module, info: dict) -> Pretrained:
    """What from_pretrained's loading info means for the user: how many of the network's tensors came from the
    checkpoint, which start fresh (a new head; shapes that did not fit) and how many of the checkpoint's went
    unused (layers beyond num_hidden_layers, pre-training heads). Refused where only the head would be loaded: the
    names do not match, and training would silently start from scratch."""
    own = list(net.state_dict())
    fresh = set(info["missing_keys"]) | {key[0] if isinstance(key, tuple) else key for key in info["mismatched_keys"]}
    head = head_name(net)
    read = [k for k in own if k not in fresh]  # the tensors the checkpoint gave
    if not [k for k in read if not k.startswith(head + ".")]:
        unused = list(info["unexpected_keys"])
        raise BcpkdError(f"{arch}: none of its checkpoint's tensors fit {type(net).__name__} beyond its head"
                         f"{f' (its own: {_names(unused, 2)})' if unused else ''}; give the folder of a model "
                         f"saved with save_pretrained, or for a fresh network {FRESH}")
    note = f"{arch}: pretrained weights for {len(read)} of its {len(own)} tensors"
    if fresh:
        note += f"; new: {_names(list(fresh))}"
    if info["unexpected_keys"]:
        unused = list(info["unexpected_keys"])
        note += f"; {len(unused)} of the checkpoint's not used ({_names(unused, 1)})"
    own_head = not any(k.startswith(head + ".") for k in fresh)
    labels = net.config.id2label
    return Pretrained(arch, note, tuple(str(labels[i]) for i in range(len(labels))) if own_head else None)


def align_head(model: "TextClassifier", classes: tuple[str, ...]) -> str | None:
    """A head loaded with the checkpoint classifies in the checkpoint's class order (config.json's id2label): put
    its rows in the data's order where the names are the data's classes in another order (case aside), and say
    so; refuse names that are not the data's classes (its logits would be read as the wrong classes). Unnamed
    classes (LABEL_0, ...), and integer labels (classes "0", "1", ...), are taken in the head's order, and said. None
    where nothing needs saying."""
    labels = model.pretrained.head_labels if model.pretrained is not None else None
    if labels is None:
        return None
    folded = [label.casefold() for label in labels]
    wanted = [name.casefold() for name in classes]
    if folded == wanted:
        return None
    if all(label == f"LABEL_{i}" for i, label in enumerate(labels)):
        return f"its head's classes are unnamed (LABEL_0 .. LABEL_{len(labels) - 1}): read in the data's order " \
               f"({', '.join(classes)})"
    if list(classes) == [str(i) for i in range(len(labels))]:  # integer labels: class k is the head's row k
        return f"the data's labels are numbers: read as its head's classes " \
               f"({', '.join(f'{i}: {label}' for i, label in enumerate(labels))})"
    if sorted(folded) != sorted(wanted):
        raise BcpkdError(f"{model.pretrained.arch}: its head classifies {', '.join(labels)} (config.json's id2label), "
                         f"the data's classes are {', '.join(classes)}; give id2label the data's class names in the "
                         f"head's order, or name the data's classes as the checkpoint does")
    order = [folded.index(name) for name in wanted]  # data class k is the checkpoint's row order[k]
    with torch.no_grad():
        model.head.weight.copy_(model.head.weight[order])
        if model.head.bias is not None:  # GPT-2's score has none
            model.head.bias.copy_(model.head.bias[order])
    config = model.features.net.config
    config.id2label = dict(enumerate(classes))
    config.label2id = {name: i for i, name in enumerate(classes)}
    model.pretrained = replace(model.pretrained, head_labels=None)  # in the data's order now: never permuted twice
    return f"its head's classes ({', '.join(labels)}) reordered to the data's ({', '.join(classes)})"


class TextFeatures(nn.Module):
    """Text rows -> the network's input to its head [B, F]: the rows' ids under the network's own tokenizer,
    padded per batch, through the network whose head is an identity. Rows already encoded (a dict of input_ids,
    attention_mask [, token_type_ids] [B, L], as exported models take them) go in as they are."""

    def __init__(self, net: nn.Module, tokenizer):
        super().__init__()
        self.net, self.tokenizer = net, tokenizer
        accepted = inspect.signature(net.forward).parameters
        self.takes_types = "token_type_ids" in accepted

    def forward(self, texts: TextRows | dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = dict(texts) if isinstance(texts, dict) else texts.encode(self.tokenizer)
        if not self.takes_types:
            inputs.pop("token_type_ids", None)
        return self.net(**inputs).logits


class TextClassifier(FeaturesHead):
    """A Hugging Face sequence classifier as features and a linear head."""

    def __init__(self, features: TextFeatures, head: nn.Linear, head_name: str):
        super().__init__()
        self.features, self.head = features, head
        self.head_name = head_name  # where the head sits in the bare network (classifier, classifier.out_proj)
        self.pretrained: Pretrained | None = None  # what pretrained weights gave it, for the stage to say


def head_name(net: nn.Module) -> str:
    """Where a classifier's head sits: its last nn.Linear."""
    return [name for name, module in net.named_modules() if isinstance(module, nn.Linear)][-1]


def split(net: nn.Module, tokenizer, arch: str) -> TextClassifier:
    """Take the network's last nn.Linear out as the head; checked on two short example texts."""
    name = head_name(net)
    head = net.get_submodule(name)
    parent_name, _, leaf = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    was_training = net.training
    net.eval()
    example = tokenizer(["a short example", "and another one, longer than that"], padding=True, return_tensors="pt")
    example = {k: v for k, v in example.items() if k in inspect.signature(net.forward).parameters}
    with torch.no_grad():
        logits = net(**example).logits
        setattr(parent, leaf, nn.Identity())
        features = net(**example).logits
    net.train(was_training)
    if not (features.ndim == 2 and features.shape[1] == head.in_features
            and torch.allclose(head(features), logits, rtol=1e-4, atol=1e-5)):
        setattr(parent, leaf, head)
        raise BcpkdError(f"{arch}: its last nn.Linear ({name}) is not the network's last operation; bcpkd needs "
                         f"features -> linear head -> logits")
    return TextClassifier(TextFeatures(net, tokenizer), head, name)


def bare(model: TextClassifier) -> nn.Module:
    """A copy of the bare network with its head put back: what save_pretrained writes."""
    import copy

    net = copy.deepcopy(model.features.net)
    parent_name, _, leaf = model.head_name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, leaf, copy.deepcopy(model.head))
    return net


def text_grad_sq_norms(model: TextClassifier, texts: TextRows, labels: torch.Tensor, target_probs: torch.Tensor | None,
                       loss_fn, chunk: int) -> torch.Tensor:
    """||grad_w loss_i(w)||^2 of every example [N] of a text classifier in eval mode: per chunk in one backward pass
    through torch's per-sample-gradient weights (Embedding, Linear and LayerNorm layers: what BERT-like networks
    are made of), checked on the chunk's first example against its gradient alone; one example at a time where
    the network has layers those weights do not cover."""
    model.eval()
    norms, batched = [], True
    for start in range(0, len(labels), chunk):
        stop = min(start + chunk, len(labels))
        part = (texts[start:stop], labels[start:stop], None if target_probs is None else target_probs[start:stop])
        alone = _one_at_a_time(model, *(x[:1] if x is not None else None for x in part), loss_fn)
        got = _in_one_pass(model, *part, loss_fn) if batched else None
        batched = got is not None and torch.allclose(got[:1], alone, rtol=1e-3, atol=1e-8)
        norms.append(got if batched else torch.cat([alone, _one_at_a_time(
            model, *(x[1:] if x is not None else None for x in part), loss_fn)]))
    return torch.cat(norms)


def _one_at_a_time(model: nn.Module, texts: TextRows, labels: torch.Tensor, targets: torch.Tensor | None,
                   loss_fn) -> torch.Tensor:
    from torch.func import functional_call, grad

    params = {k: v.detach() for k, v in model.named_parameters()}

    def example_loss(p, i):
        return loss_fn(functional_call(model, p, (texts[i:i + 1],)), labels[i:i + 1],
                       None if targets is None else targets[i:i + 1]).sum()

    return torch.stack([sum(g.square().sum() for g in grad(example_loss)(params, i).values())
                        for i in range(len(labels))]) if len(labels) else torch.zeros(0)


def _in_one_pass(model: TextClassifier, texts: TextRows, labels: torch.Tensor, targets: torch.Tensor | None,
                 loss_fn) -> torch.Tensor | None:
    """Per-example squared gradient norms from one backward pass, or None where the network does not allow it.
    Token type and position ids are given per example (BERT-like networks otherwise expand a buffer of one)."""
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    inputs = texts.encode(model.features.tokenizer)
    if not model.features.takes_types:
        inputs.pop("token_type_ids", None)
    elif "token_type_ids" not in inputs:
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    accepted = inspect.signature(model.features.net.forward).parameters
    positions = torch.arange(inputs["input_ids"].shape[1], device=inputs["input_ids"].device)
    attempts = [inputs] + ([{**inputs, "position_ids": positions.expand_as(inputs["input_ids"])}]
                           if "position_ids" in accepted else [])

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, **encoded):
            return self.model.head(self.model.features.net(**encoded).logits)

    wrapper = Logits()
    for encoded in attempts:
        try:
            logits = call_for_per_sample_grads(wrapper, batch_size=len(labels), loss_reduction="sum")(**encoded)
            loss_fn(logits, labels, targets).sum().backward()
        except (RuntimeError, NotImplementedError):
            model.zero_grad(set_to_none=True)
            continue
        samples = [getattr(p, "grad_sample", None) for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad_sample = None
        if any(s is None for s in samples):
            return None
        return sum(s.detach().flatten(1).square().sum(1) for s in samples)
    return None
