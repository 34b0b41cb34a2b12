"""The files `bcpkd export` writes, one function per format, each checked against the module it came from.

- model.onnx: opset 18, dynamic batch axis, input `input` (float32), outputs `logits`, `probs` (and `epistemic`
  where the predictive has one); bcpkd-export.json is kept in its metadata (`bcpkd`), so the file alone
  describes itself. Checked with onnxruntime.
- model.pt2: `torch.export` program (`torch.export.load(...).module()`), with bcpkd-export.json as an extra file.
- model.safetensors: the network's weights in the key names of the library that builds it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch import nn

from bcpkd_cli.errors import BcpkdError, BcpkdFailure

ONNX_OPSET = 18
TOLERANCE = 1e-4  # the largest |probability difference| between an exported file and the module
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def require_onnx() -> None:
    """The export extra's packages, or one line naming the extra."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise BcpkdError(f"--format onnx needs the export extra ({', '.join(missing)} missing): pip install -e "
                         f"'.[export]', or choose --format pt2,safetensors")


def output_names(n_outputs: int) -> list[str]:
    return ["logits", "probs", "epistemic"][:n_outputs]


def _batch_dim() -> dict:
    return {"x": {0: torch.export.Dim("batch", min=1, max=1 << 20)}}


def _largest_difference(expected: tuple[torch.Tensor, ...], got: list) -> float:
    """max |probs difference| between the module's outputs and an exported file's."""
    return float((expected[1] - torch.as_tensor(got[1])).abs().max())


def _checked(path: Path, difference: float) -> float:
    if not difference <= TOLERANCE:
        raise BcpkdFailure(f"{path}: its probabilities differ from the checkpoint's by {difference:.2e} (more than "
                           f"{TOLERANCE:g}); this network does not export faithfully to this format, leave it out "
                           f"with --format")
    return difference


def write_pt2(module: nn.Module, example: torch.Tensor, check: torch.Tensor, path: Path, manifest: dict) -> float:
    """torch.export program at `path`; the largest |probs| difference to the module on `check`."""
    try:
        program = torch.export.export(module, (example,), dynamic_shapes=_batch_dim())
    except Exception as err:  # torch.export's many error types: the network is not traceable
        raise BcpkdFailure(f"{path}: torch.export cannot trace this network ({str(err).splitlines()[0][:120]}); "
                           f"leave pt2 out with --format") from None
    torch.export.save(program, str(path), extra_files={"bcpkd-export.json": json.dumps(manifest)})
    with torch.no_grad():
        expected = module(check)
    got = torch.export.load(str(path)).module()(check)
    return _checked(path, _largest_difference(expected, [g.detach() for g in got]))


def write_onnx(module: nn.Module, example: torch.Tensor, check: torch.Tensor, path: Path, manifest: dict) -> float:
    """ONNX file at `path` (its progress lines go to stderr: stdout carries paths); the largest |probs| difference
    to the module on `check`, run by onnxruntime."""
    import onnx
    import onnxruntime

    with torch.no_grad():
        expected = module(check)
    names = output_names(len(expected))
    with contextlib.redirect_stdout(sys.stderr):
        try:
            torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=["input"], output_names=names,
                              dynamic_shapes=_batch_dim(), opset_version=ONNX_OPSET, verbose=False,
                              external_data=False)
        except Exception as err:  # the exporter's many error types: an operation ONNX does not have
            raise BcpkdFailure(f"{path}: the ONNX exporter failed ({str(err).splitlines()[0][:120]}); leave onnx "
                               f"out with --format") from None
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = "bcpkd", json.dumps(manifest)
    onnx.save(model, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(names, {"input": check.numpy()})
    return _checked(path, _largest_difference(expected, got))


def write_safetensors(weights: dict[str, torch.Tensor], path: Path, manifest: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(path),
              metadata={"classes": json.dumps(manifest["classes"]), "arch": manifest["model"]["arch"],
                        "names": manifest["weights"]["names"]})
