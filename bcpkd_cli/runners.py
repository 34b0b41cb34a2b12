"""Any model bcpkd hands out, opened to classify: a checkpoint (student.pt, teacher.pt or their folder), an
exported `model.onnx` (onnxruntime) or `model.pt2` (torch.export), or an export folder. Each gives float32 inputs
[B, ...] -> (logits [B, C], probs [B, C], epistemic [B] or None), with its class names and preprocessing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bcpkd_cli.deployable import Preprocess, deployable
from bcpkd_cli.errors import BcpkdError

MANIFEST = "bcpkd-export.json"
Outputs = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


@dataclass(frozen=True)
class Runner:
    run: Callable[[torch.Tensor], Outputs]
    classes: list[str]
    preprocess: Preprocess
    epistemic: str | None  # what the third output is (None: there is none)
    description: str  # what was opened, for reports
    manifest: dict | None  # an export's bcpkd-export.json


def preprocess_from(record: dict) -> Preprocess:
    """An export's input record (bcpkd-export.json `input`) -> Preprocess."""
    if record["kind"] == "features":
        scale = record.get("standardize") or {}
        return Preprocess("features", tuple(record["shape"]), 0, "standardize" if scale else "none",
                          tuple(scale["mean"]) if scale else None, tuple(scale["std"]) if scale else None)
    norm = record["normalize"]
    return Preprocess("image", tuple(record["shape"]), record["image_size"], norm["choice"],
                      tuple(norm["mean"]) if norm["mean"] else None, tuple(norm["std"]) if norm["std"] else None)


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
    return Runner(lambda x: _outputs(session.run(names, {"input": x.numpy()})), manifest["classes"],
                  preprocess_from(manifest["input"]), manifest.get("epistemic"), f"{path} (onnxruntime)", manifest)


def _pt2(path: Path) -> Runner:
    extra = {MANIFEST: ""}
    try:
        module = torch.export.load(str(path), extra_files=extra).module()
    except (RuntimeError, ValueError, KeyError) as err:
        raise BcpkdError(f"{path}: not a torch.export program ({str(err)[:80]}); give a model.pt2 from bcpkd "
                         f"export") from None
    manifest = json.loads(extra[MANIFEST]) if extra[MANIFEST] else _beside(path)

    def run(x: torch.Tensor) -> Outputs:
        with torch.no_grad():
            return _outputs([t.detach() for t in module(x)])

    return Runner(run, manifest["classes"], preprocess_from(manifest["input"]), manifest.get("epistemic"),
                  f"{path} (torch.export)", manifest)


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
    """A checkpoint, .onnx, .pt2 or export folder as a Runner (`draws`: checkpoints of sampling teachers only)."""
    path = Path(path)
    if not path.exists():
        raise BcpkdError(f"MODEL {path}: no such file or folder; give a student.pt, teacher.pt, model.onnx, model.pt2 "
                         f"or an export folder")
    if path.is_dir() and (path / MANIFEST).is_file():
        files = json.loads((path / MANIFEST).read_text())["files"]
        if "pt2" in files:
            path = path / files["pt2"]
        elif "onnx" in files:
            path = path / files["onnx"]
        else:
            raise BcpkdError(f"MODEL {path}: this export holds only weights (model.safetensors); give its checkpoint, "
                             f"{json.loads((path / MANIFEST).read_text())['source']['checkpoint']}")
    if draws and path.suffix in (".onnx", ".pt2"):
        raise BcpkdError("--draws: applies to checkpoints; an export has its draws fixed already")
    if path.suffix == ".onnx":
        return _onnx(path)
    if path.suffix == ".pt2":
        return _pt2(path)
    return _checkpoint(path, draws)
