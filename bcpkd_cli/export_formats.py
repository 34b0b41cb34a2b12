"""The files `bcpkd export` writes, one function per format, each checked against the module it came from.

- model.onnx: opset 18, input `input` (float32) with a dynamic batch axis, or for text models `input_ids`,
  `attention_mask` (and `token_type_ids`; int64) with dynamic batch and sequence axes; outputs `logits`, `probs`
  (and `epistemic` where the predictive has one); bcpkd-export.json is kept in its metadata (`bcpkd`), so the
  file alone describes itself. Checked with onnxruntime.
- model.pt2: `torch.export` program (`torch.export.load(...).module()`), with bcpkd-export.json as an extra file.
- model.safetensors: the network's weights in the key names of the library that builds it.
(hf/, the Hugging Face folder of a text model: export_hf.py.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import warnings
from dataclasses import dataclass
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


class TokenInputs(nn.Module):
    """A text classifier's deployed module (a dict of token tensors -> outputs) over the tensors one by one, so
    that the exported graph names them."""

    def __init__(self, module: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.module, self.names = module, names

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None):
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.module({name: given[name] for name in self.names})


@dataclass(frozen=True)
class Graph:
    """What an exported file takes: the module over positional inputs, their names and dynamic axes."""

    module: nn.Module
    names: tuple[str, ...]
    axes: tuple[dict, ...]  # per input, {axis: torch.export.Dim}
    onnx_axes: tuple[dict, ...]  # the same for the ONNX exporter (names there become the file's axis names)

    def args(self, x) -> tuple[torch.Tensor, ...]:
        """A batch (a tensor, or a dict of token tensors) as the module's positional inputs."""
        return tuple(x[name] for name in self.names) if isinstance(x, dict) else (x,)

    def feed(self, x) -> dict:
        """A batch as onnxruntime's inputs."""
        return {name: value.numpy() for name, value in zip(self.names, self.args(x))}


def graph(module: nn.Module, token_inputs: tuple[str, ...] = ()) -> Graph:
    """The deployed module as exported: one float32 `input` with a dynamic batch axis, or a text model's token
    tensors (`token_inputs`) with dynamic batch and sequence axes (the sequence's range as the network allows)."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    if not token_inputs:
        return Graph(module, ("input",), ({0: batch},), ({0: batch},))
    n = len(token_inputs)
    return Graph(TokenInputs(module, token_inputs).eval(), token_inputs, ({0: batch, 1: torch.export.Dim.DYNAMIC},) * n,
                 ({0: "batch", 1: "sequence"},) * n)


def _largest_difference(expected: tuple[torch.Tensor, ...], got: list) -> float:
    """max |probs difference| between the module's outputs and an exported file's."""
    return float((expected[1] - torch.as_tensor(got[1])).abs().max())


def checked(path: Path, difference: float) -> float:
    """`difference`, or a failure naming the file where it exceeds TOLERANCE."""
    if not difference <= TOLERANCE:
        raise BcpkdFailure(f"{path}: its probabilities differ from the checkpoint's by {difference:.2e} (more than "
                           f"{TOLERANCE:g}); this network does not export faithfully to this format, leave it out "
                           f"with --format")
    return difference


def write_pt2(graph: Graph, example, checks: list, path: Path, manifest: dict) -> float:
    """torch.export program at `path`; the largest |probs| difference to the module on the `checks` batches."""
    try:
        program = torch.export.export(graph.module, graph.args(example), dynamic_shapes=graph.axes)
    except Exception as err:  # torch.export's many error types: the network is not traceable
        raise BcpkdFailure(f"{path}: torch.export cannot trace this network ({str(err).splitlines()[0][:120]}); "
                           f"leave pt2 out with --format") from None
    torch.export.save(program, str(path), extra_files={"bcpkd-export.json": json.dumps(manifest)})
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        return checked(path, max(_largest_difference(graph.module(*graph.args(x)), loaded(*graph.args(x)))
                                 for x in checks))


def write_onnx(graph: Graph, example, checks: list, path: Path, manifest: dict) -> float:
    """ONNX file at `path` (its progress lines go to stderr: stdout carries paths); the largest |probs| difference
    to the module on the `checks` batches, run by onnxruntime."""
    import onnx
    import onnxruntime

    with torch.no_grad():
        expected = [graph.module(*graph.args(x)) for x in checks]
    names = output_names(len(expected[0]))
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="# The axis name")  # axes that share a name: as meant
        try:
            torch.onnx.export(graph.module, graph.args(example), str(path), dynamo=True, input_names=list(graph.names),
                              output_names=names, dynamic_shapes=graph.onnx_axes, opset_version=ONNX_OPSET,
                              verbose=False, external_data=False)
        except Exception as err:  # the exporter's many error types: an operation ONNX does not have
            raise BcpkdFailure(f"{path}: the ONNX exporter failed ({str(err).splitlines()[0][:120]}); leave onnx "
                               f"out with --format") from None
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = "bcpkd", json.dumps(manifest)
    onnx.save(model, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return checked(path, max(_largest_difference(want, session.run(names, graph.feed(x)))
                             for want, x in zip(expected, checks)))


def write_safetensors(weights: dict[str, torch.Tensor], path: Path, manifest: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(path),
              metadata={"classes": json.dumps(manifest["classes"]), "arch": manifest["model"]["arch"],
                        "names": manifest["weights"]["names"]})
