"""Any model bcpkd hands out, opened to classify: a checkpoint (student.pt, teacher.pt or their folder), an
exported `model.onnx` (onnxruntime), `model.pt2` (torch.export) or `hf/` folder (transformers), or an export
folder. Each gives inputs [B, ...] (float32 images or rows, or a dict of token tensors) -> (logits [B, C],
probs [B, C], epistemic [B] or None), with its class names and preprocessing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bcpkd_cli.data.text import need_text_extra
from bcpkd_cli.deployable import Preprocess, TextPreprocess, deployable
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.models.huggingface import tokenizer_of

MANIFEST = "bcpkd-export.json"
Outputs = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


@dataclass(frozen=True)
class Runner:
    run: Callable[[torch.Tensor], Outputs]
    classes: list[str]
    preprocess: Preprocess | TextPreprocess
    epistemic: str | None  # what the third output is (None: there is none)
    description: str  # what was opened, for reports
    manifest: dict | None  # an export's bcpkd-export.json


def preprocess_from(manifest: dict) -> Preprocess | TextPreprocess:
    """An export's preprocessing, from its bcpkd-export.json (`input`; text: the tokenizer its model spec holds)."""
    record = manifest["input"]
    if record["kind"] == "text":
        return TextPreprocess(tokenizer_of(manifest["model"]["spec"]["hf"]), record["max_length"],
                              tuple(record["inputs"]), record["text_column"], record["text_pair_column"] or "")
    if record["kind"] == "features":
        scale = record.get("standardize") or {}
        return Preprocess("features", tuple(record["shape"]), 0, "standardize" if scale else "none",
                          tuple(scale["mean"]) if scale else None, tuple(scale["std"]) if scale else None)
    norm = record["normalize"]
    return Preprocess("image", tuple(record["shape"]), record["image_size"], norm["choice"],
                      tuple(norm["mean"]) if norm["mean"] else None, tuple(norm["std"]) if norm["std"] else None)


def _args(x) -> tuple[torch.Tensor, ...]:
    """A batch as an exported graph's positional inputs (a text model's token tensors in their recorded order)."""
    return tuple(x.values()) if isinstance(x, dict) else (x,)


def _outputs(values) -> Outputs:
    logits, probs = torch.as_tensor(values[0]), torch.as_tensor(values[1])
    return logits, probs, torch.as_tensor(values[2]) if len(values) > 2 else None


def _onnx(path: Path) -> Runner:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise BcpkdError(f"{path}: ONNX models need the export extra: pip install -e '.[export]'") from None
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    manifest = json.loads(props["bcpkd"]) if "bcpkd" in props else _beside(path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    inputs = [i.name for i in session.get_inputs()]

    def run(x) -> Outputs:
        return _outputs(session.run(names, {name: value.numpy() for name, value in zip(inputs, _args(x))}))

    return Runner(run, manifest["classes"], preprocess_from(manifest), manifest.get("epistemic"),
                  f"{path} (onnxruntime)", manifest)


def _pt2(path: Path) -> Runner:
    extra = {MANIFEST: ""}
    try:
        module = torch.export.load(str(path), extra_files=extra).module()
    except (RuntimeError, ValueError, KeyError) as err:
        raise BcpkdError(f"{path}: not a torch.export program ({str(err)[:80]}); give a model.pt2 from bcpkd "
                         f"export") from None
    manifest = json.loads(extra[MANIFEST]) if extra[MANIFEST] else _beside(path)

    def run(x) -> Outputs:
        with torch.no_grad():
            return _outputs([t.detach() for t in module(*_args(x))])

    return Runner(run, manifest["classes"], preprocess_from(manifest), manifest.get("epistemic"),
                  f"{path} (torch.export)", manifest)


def _hf(folder: Path, manifest: dict) -> Runner:
    """An export's hf/ folder, run by transformers (softmax of its logits, whose T_cal is in the head)."""
    try:
        from transformers import AutoModelForSequenceClassification
        from transformers.utils.logging import disable_progress_bar
    except ImportError:
        raise need_text_extra(f"{folder}: a Hugging Face folder") from None
    disable_progress_bar()
    network = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()

    def run(x: dict) -> Outputs:
        with torch.no_grad():
            logits = network(**x).logits
        return logits, torch.softmax(logits, dim=1), None

    return Runner(run, manifest["classes"], preprocess_from(manifest), None, f"{folder} (transformers)", manifest)


def _beside(path: Path) -> dict:
    """The bcpkd-export.json next to an exported file that does not carry it."""
    beside = path.parent / MANIFEST
    if not beside.is_file():
        raise BcpkdError(f"{path}: carries no class names or preprocessing and there is no {MANIFEST} beside it; "
                         f"give a file or folder written by bcpkd export")
    return json.loads(beside.read_text())


def _checkpoint(path: Path, draws: int) -> Runner:
    deployed = deployable(path, draws)

    def run(x: torch.Tensor) -> Outputs:
        with torch.no_grad():
            values = deployed.module(x)
        return values[0], values[1], values[2] if len(values) > 2 else None

    return Runner(run, deployed.classes, deployed.preprocess, deployed.epistemic,
                  f"{path} ({deployed.kind}: {deployed.predictive})", None)


def open_model(path: str | Path, draws: int = 0) -> Runner:
    """A checkpoint, .onnx, .pt2, export folder or its hf/ folder as a Runner (`draws`: checkpoints of sampling
    teachers only)."""
    path = Path(path)
    if not path.exists():
        raise BcpkdError(f"MODEL {path}: no such file or folder; give a student.pt, teacher.pt, model.onnx, model.pt2 "
                         f"or an export folder")
    exported = path.suffix in (".onnx", ".pt2") or path.is_dir() and any(
        (folder / MANIFEST).is_file() for folder in (path, path.parent))
    if draws and exported:
        raise BcpkdError("--draws: applies to checkpoints; an export has its draws fixed already")
    if path.is_dir() and (path / "config.json").is_file() and (path.parent / MANIFEST).is_file():
        return _hf(path, json.loads((path.parent / MANIFEST).read_text()))  # an export's hf/ folder itself
    if path.is_dir() and (path / MANIFEST).is_file():
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if "hf" in files:  # a text classifier: as transformers runs it
            return _hf(path / files["hf"], manifest)
        if "pt2" in files:
            path = path / files["pt2"]
        elif "onnx" in files:
            path = path / files["onnx"]
        else:
            raise BcpkdError(f"MODEL {path}: this export holds only weights (model.safetensors); give its checkpoint, "
                             f"{manifest['source']['checkpoint']}")
    if path.suffix == ".onnx":
        return _onnx(path)
    if path.suffix == ".pt2":
        return _pt2(path)
    return _checkpoint(path, draws)
