"""export: a student (or a teacher's calibrated predictive) as files the user's code loads, checked on the test split.

The folder gets model.onnx, model.pt2 and model.safetensors, or for `hf:` text classifiers hf/ (a Hugging Face
folder), model.onnx and model.pt2 over token ids (those asked for that apply), bcpkd-export.json (class names,
preprocessing, what the model computes, its test metrics, where it came from) and README.md, a model card with a
snippet per format. It is written beside the destination and moved into place whole.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from rich.table import Table

from bcpkd_cli import artifacts, metrics, modelcard
from bcpkd_cli.choices import Bayes, ExportFormat
from bcpkd_cli.config import recipe_for_checkpoint
from bcpkd_cli.console import console, show_table
from bcpkd_cli.data import announce, load_dataset
from bcpkd_cli.deployable import Deployable, deployable, model_input
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.export_formats import graph, output_names, require_onnx, write_onnx, write_pt2, write_safetensors
from bcpkd_cli.export_hf import one_network, save_tokenizer, unfit_reason, write_hf
from bcpkd_cli.models import LibraryWeights, library_state_dict
from bcpkd_cli.threads import apply_threads

MANIFEST = "bcpkd-export.json"
EXPORT_FORMAT, EXPORT_VERSION = "bcpkd.export", 1
CHECK_ROWS = 512  # test examples every exported file is compared on
TEXT_CHECK_BATCH = 64  # test texts per checked batch (each padded to its longest, so sequence lengths vary)
FILES = {ExportFormat.onnx: "model.onnx", ExportFormat.pt2: "model.pt2", ExportFormat.safetensors: "model.safetensors",
         ExportFormat.hf: "hf"}
TOKENIZER = "tokenizer"  # a text model's tokenizer folder where there is no hf folder to hold it


def _claim(out: Path, force: bool) -> None:
    """Refuse to replace a finished export without `force`, or to write into a folder of other files."""
    if (out / MANIFEST).is_file() and not force:
        raise BcpkdError(f"--out {out}: holds an export already ({MANIFEST}); give another --out, or add --force to "
                         f"replace it")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise BcpkdError(f"--out {out}: is a folder of other files; give a new or empty folder")


def _weights(deployed: Deployable) -> tuple[LibraryWeights | None, str]:
    """The network's weights in the bare network's names, or why there are none (a teacher of several or sampled
    networks)."""
    payload = deployed.payload
    bayes = payload.get("bayes")
    if deployed.preprocess.kind == "text":
        return None, ""
    if bayes == Bayes.ensemble.value:
        return None, "an ensemble is several networks; model.onnx and model.pt2 hold their averaged predictive"
    if bayes == Bayes.vi.value:
        return None, "a VI teacher's weights are distributions (bayesian-torch layers), not one network's"
    return library_state_dict(payload["model"], payload["state_dict"]), ""


def _formats(deployed: Deployable, formats: list[ExportFormat] | None, weights_note: str) -> list[ExportFormat]:
    """The formats asked for (refused, with the reason, where one does not apply), or every one that applies."""
    text = deployed.preprocess.kind == "text"
    reasons = {ExportFormat.hf: unfit_reason(deployed),
               ExportFormat.safetensors: "the weights of an hf: model are the hf folder's model.safetensors, in "
                                         "transformers' key names" if text else weights_note}
    fitting = [f for f in ExportFormat if not reasons.get(f)]
    for f in formats or []:
        if reasons.get(f):
            raise BcpkdError(f"--format {f.value}: {reasons[f]}; choose --format {','.join(g.value for g in fitting)}")
    return formats or fitting


def _checks(split_inputs, deployed: Deployable) -> list:
    """The batches every exported file is compared on, as the module takes them: the test split's first CHECK_ROWS
    examples, in one batch (texts: in batches of TEXT_CHECK_BATCH, each padded to its longest)."""
    rows = min(CHECK_ROWS, len(split_inputs))
    step = TEXT_CHECK_BATCH if deployed.preprocess.kind == "text" else rows
    return [model_input(split_inputs[start:min(start + step, rows)], deployed.preprocess)
            for start in range(0, rows, step)]


def _test_metrics(deployed: Deployable, test, n_bins: int, batch: int = 512) -> dict:
    """The exported module's classification report on the whole test split."""
    with torch.no_grad():
        probs = torch.cat([deployed.module(model_input(test.inputs[start:start + batch], deployed.preprocess))[1]
                           for start in range(0, len(test), batch)])
    return {"split": "test", "n_examples": len(test), **metrics.classification_report(probs, test.labels, None, n_bins)}


def _flops(module: torch.nn.Module, example) -> int:
    """Floating-point operations of one example's forward pass (torch's FLOP counter: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(example)
    return int(counter.get_total_flops())


def _manifest(deployed: Deployable, checkpoint: Path, test: dict, example, weights: LibraryWeights | None,
              weights_note: str, formats: list[ExportFormat], command: str) -> dict:
    payload = deployed.payload
    spec = payload["model"]
    source = {"checkpoint": str(checkpoint.resolve()), "sha256": artifacts.sha256_file(checkpoint),
              "config": str(checkpoint.resolve().parent / "config.yaml")}
    record = deployed.preprocess.record()
    if record["kind"] == "text":  # where the tokenizer's files are, and how many tokens the FLOPs are of
        record["tokenizer"] = FILES[ExportFormat.hf] if ExportFormat.hf in formats else TOKENIZER
        record["flops_tokens"] = int(example["attention_mask"].sum())
    return {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "kind": deployed.kind, "classes": deployed.classes,
        "input": record, "outputs": output_names(3 if deployed.epistemic else 2),
        "predictive": deployed.predictive, "exact": deployed.exact, "epistemic": deployed.epistemic,
        "model": {"arch": spec["arch"], "arch_kwargs": spec.get("arch_kwargs", {}), "n_classes": spec["n_classes"],
                  "spec": spec, "parameters": sum(p.numel() for p in deployed.module.parameters()),
                  "flops": _flops(deployed.module, example)},
        "weights": {"names": weights.names if weights else None, "note": weights_note,
                    "network": "network.py" if weights and weights.source and ExportFormat.safetensors in formats
                    else None, "build": weights.call if weights else None},
        "teacher": modelcard.teacher_record(payload), "test": test, "data": payload["data"],
        "source": source, "files": {f.value: FILES[f] for f in formats}, "command": command,
    }


def run(checkpoint: Path, out: str, formats: list[ExportFormat] | None, draws: int, force: bool, command: str,
        n_bins: int = 15) -> Path:
    """Export `checkpoint` into `out` (default: <its folder>/export); every file checked against the module on the
    test split's first CHECK_ROWS examples. Returns the folder."""
    apply_threads()
    deployed = deployable(checkpoint, draws)
    folder = Path(out) if out else Path(checkpoint).parent / "export"  # as the checkpoint was named (relative stays)
    _claim(folder, force)
    weights, note = _weights(deployed)
    asked = _formats(deployed, formats, note)
    if ExportFormat.onnx in asked:
        require_onnx()
    recipe = recipe_for_checkpoint({}, deployed.payload, f"{checkpoint}")
    data = load_dataset(recipe.data)
    announce(data)
    pre, test_inputs = deployed.preprocess, data.test.inputs
    checks, example = _checks(test_inputs, deployed), model_input(test_inputs[:2], pre)
    test = _test_metrics(deployed, data.test, n_bins)
    manifest = _manifest(deployed, Path(checkpoint), test, model_input(test_inputs[:1], pre), weights, note, asked,
                         command)
    if pre.kind == "features":  # the card's snippets classify this row
        manifest["example_row"] = [round(v, 6) for v in checks[0][0].tolist()]
    if pre.kind == "text":  # ... or this text (a pair: both texts)
        corpus, row = test_inputs.corpus, int(test_inputs.rows[0])
        manifest["example_text"] = [corpus.texts[row], corpus.pairs[row]] if pre.pair_column else corpus.texts[row]
    if ExportFormat.hf in asked:  # a teacher's T_cal is in the folder's head
        manifest["hf"] = {"t_cal_in_head": one_network(deployed)[1]}
    exported = graph(deployed.module, pre.inputs if pre.kind == "text" else ())
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        parity = {}
        if ExportFormat.hf in asked:
            parity["hf"] = write_hf(deployed, test_inputs[:CHECK_ROWS], staging / FILES[ExportFormat.hf],
                                    TEXT_CHECK_BATCH)
        elif pre.kind == "text":
            save_tokenizer(deployed, staging / TOKENIZER)
        if ExportFormat.pt2 in asked:
            parity["pt2"] = write_pt2(exported, example, checks, staging / FILES[ExportFormat.pt2], manifest)
        if ExportFormat.onnx in asked:
            parity["onnx"] = write_onnx(exported, example, checks, staging / FILES[ExportFormat.onnx], manifest)
        if ExportFormat.safetensors in asked:
            write_safetensors(weights.weights, staging / FILES[ExportFormat.safetensors], manifest)
            if weights.source:
                artifacts.write_text(staging / "network.py", weights.source)
        manifest["parity"] = {"examples": min(CHECK_ROWS, len(test_inputs)), "max_abs_prob_difference": parity}
        artifacts.write_json(staging / MANIFEST, manifest)
        artifacts.write_text(staging / "README.md", modelcard.render(manifest))
        artifacts.share_like_umask(staging)
        _replace(folder, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _report(folder, manifest, checkpoint)
    return folder


def _replace(folder: Path, staging: Path) -> None:
    """Move the finished staging folder to `folder`; an old export there is moved aside first and then removed."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    staging.rename(folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _report(folder: Path, manifest: dict, checkpoint: Path) -> None:
    table = Table(title=f"export of {checkpoint}")  # as given, as the table's files are
    for column in ("file", "checked on", "max |Δprob|"):
        table.add_column(column)
    for fmt, name in manifest["files"].items():
        difference = manifest["parity"]["max_abs_prob_difference"].get(fmt)
        table.add_row(str(folder / name), f"{manifest['parity']['examples']} test examples" if difference is not None
                      else "-", f"{difference:.2e}" if difference is not None else "(weights)")
    show_table(table)
    test = manifest["test"]
    console.print(f"{manifest['kind']} {manifest['model']['arch']}: {manifest['predictive']}; test accuracy "
                  f"{test['accuracy']:.4f}, NLL {test['nll']:.4f}, ECE {test['ece']:.4f} ({test['n_examples']} examples)")
