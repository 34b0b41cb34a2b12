"""The model card (README.md) of an export: what the model is, how to feed it, how well it does, where it came
from, and a snippet per file that loads it and classifies one input (tests run them as written)."""

from __future__ import annotations

import json
from pathlib import Path

from bcpkd_cli import artifacts


def teacher_record(payload: dict) -> dict:
    """What a card says of the teacher: a student's (kind, file, SHA-256, calibration, temperatures, alpha, targets)
    or, for an exported teacher, its own kind and calibration."""
    if payload["format"] == artifacts.TEACHER_FORMAT:
        return {"kind": payload["bayes"], "calibrated": "calibration" in payload["history"],
                "calibration": payload["history"].get("calibration"), "predictive": payload["predictive"]}
    targets = {("targets" if k == "kind" else k): v for k, v in payload["targets"].items() if k != "few_shot_rows"}
    distill = payload["config"]["distill"]  # `targets`: what it learned from (teacher, online, onehot, true, noisy)
    return {**targets, "alpha": distill["alpha"], "t_teacher": distill["t_teacher"],
            "t_student": distill["t_student"]}


def _preprocessing_lines(record: dict) -> list[str]:
    if record["kind"] == "text":
        column = f"columns `{record['text_column']}` and `{record['text_pair_column']}` (sentence pairs: the " \
                 f"tokenizer takes both)" if record["text_pair_column"] else f"column `{record['text_column']}`"
        return [f"- input: text, as in the training data's {column}",
                f"- tokenizer: `{record['tokenizer']}/` (`AutoTokenizer.from_pretrained`), truncating at "
                f"{record['max_length']} tokens (its model_max_length), padding to the longest text of a batch",
                f"- model.onnx and model.pt2 take its int64 `[B, L]` "
                f"{', '.join('`' + name + '`' for name in record['inputs'])}"]
    if record["kind"] == "features":
        return [f"- input `input`: float32 `[B, {record['shape'][0]}]` feature rows in the training file's column "
                f"order; the per-feature standardisation is inside the model."]
    norm = record["normalize"]
    stats = f" (mean {norm['mean']}, std {norm['std']})" if norm["mean"] else ""
    return [f"- input `input`: float32 RGB `[B, 3, {record['shape'][1]}, {record['shape'][2]}]` in [0, 1]",
            f"- resize: {record['resize']}",
            f"- normalisation `{norm['choice']}`{stats}: inside the model, do not apply it again"]


def _image_lines(record: dict, library: str) -> list[str]:
    """Python lines that read `image.jpg` into `x`, float32 [1, 3, S, S] in [0, 1] ("numpy" or "torch")."""
    size = record["image_size"]
    if library == "numpy":
        lines = ["image = Image.open(\"image.jpg\").convert(\"RGB\")"]
        if size:
            lines += [f"scale = {size} / min(image.size)  # shorter side to {size}, then the centre crop",
                      "image = image.resize([max(" + str(size) + ", round(side * scale)) for side in image.size], "
                      "Image.BILINEAR)",
                      f"left, top = (image.width - {size}) // 2, (image.height - {size}) // 2",
                      f"image = image.crop((left, top, left + {size}, top + {size}))"]
        return lines + ["x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None] / 255"]
    lines = ["image = decode_image(\"image.jpg\", mode=ImageReadMode.RGB, apply_exif_orientation=True)"]
    if size:
        lines += [f"image = F.center_crop(F.resize(image, [{size}], antialias=True), [{size}, {size}])"]
    return lines + ["x = image[None].float() / 255"]


def _rows_line(manifest: dict) -> str:
    return "x = np.asarray([" + json.dumps(manifest["example_row"]) + "], dtype=np.float32)  # one feature row"


def _text_snippets(manifest: dict) -> dict[str, str]:
    """Per file of a text classifier, a snippet that loads it with its tokenizer and classifies one text."""
    record, example = manifest["input"], manifest["example_text"]
    texts = f"[{example[0]!r}], [{example[1]!r}]" if record["text_pair_column"] else f"[{example!r}]"
    tokens = f"tokenizer({texts}, truncation=True, max_length={record['max_length']}, padding=True, return_tensors="
    tokenizer = f"tokenizer = AutoTokenizer.from_pretrained(\"{record['tokenizer']}\")"
    found = ["best = int(probs[0].argmax())", "print(classes[best], float(probs[0][best]))"]
    info = ["info = json.load(open(\"bcpkd-export.json\"))",
            "classes, names = info[\"classes\"], info[\"input\"][\"inputs\"]"]
    code: dict[str, str] = {}
    if "hf" in manifest["files"]:
        code["hf"] = "\n".join([
            "import torch", "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "model = AutoModelForSequenceClassification.from_pretrained(\"hf\").eval()", tokenizer,
            f"inputs = {tokens}\"pt\")", "with torch.no_grad():",
            "    probs = torch.softmax(model(**inputs).logits, dim=1)", "best = int(probs[0].argmax())",
            "print(model.config.id2label[best], float(probs[0][best]))"])
    if "onnx" in manifest["files"]:
        code["onnx"] = "\n".join([
            "import json", "import onnxruntime", "from transformers import AutoTokenizer",
            "session = onnxruntime.InferenceSession(\"model.onnx\")", *info, tokenizer,
            f"inputs = {tokens}\"np\")",
            "logits, probs = session.run([\"logits\", \"probs\"], {n: inputs[n].astype(\"int64\") for n in names})",
            *found])
    if "pt2" in manifest["files"]:
        code["pt2"] = "\n".join([
            "import json", "import torch", "from transformers import AutoTokenizer",
            "model = torch.export.load(\"model.pt2\").module()", *info, tokenizer, f"inputs = {tokens}\"pt\")",
            "with torch.no_grad():", "    logits, probs = model(*(inputs[n] for n in names))[:2]", *found])
    return code


def snippets(manifest: dict) -> dict[str, str]:
    """Per file, a Python snippet that loads it and classifies `image.jpg` (or one feature row, or one text), run
    in the export folder."""
    record = manifest["input"]
    if record["kind"] == "text":
        return _text_snippets(manifest)
    image = record["kind"] == "image"
    found = ["best = int(probs[0].argmax())", "print(classes[best], float(probs[0][best]))"]
    code: dict[str, str] = {}
    if "onnx" in manifest["files"]:
        head = ["import json", "import numpy as np", "import onnxruntime"] + (["from PIL import Image"] if image else [])
        body = ["session = onnxruntime.InferenceSession(\"model.onnx\")",
                "classes = json.load(open(\"bcpkd-export.json\"))[\"classes\"]"]
        body += _image_lines(record, "numpy") if image else [_rows_line(manifest)]
        code["onnx"] = "\n".join(head + body + ["logits, probs = session.run([\"logits\", \"probs\"], {\"input\": x})"]
                                 + found)
    if "pt2" in manifest["files"]:
        head = ["import json", "import torch"] + (
            ["from torchvision.io import ImageReadMode, decode_image",
             "from torchvision.transforms.v2 import functional as F"] if image else ["import numpy as np"])
        body = ["model = torch.export.load(\"model.pt2\").module()",
                "classes = json.load(open(\"bcpkd-export.json\"))[\"classes\"]"]
        body += _image_lines(record, "torch") if image else [_rows_line(manifest), "x = torch.from_numpy(x)"]
        code["pt2"] = "\n".join(head + body + ["with torch.no_grad():", "    logits, probs = model(x)[:2]"] + found)
    if "safetensors" in manifest["files"]:
        code["safetensors"] = _weights_snippet(manifest, image)
    return code


def _weights_snippet(manifest: dict, image: bool) -> str:
    """Load model.safetensors into the bare network (the library's, the user's factory's, or network.py's);
    normalisation is then the user's to apply."""
    names, model = manifest["weights"]["names"], manifest["model"]
    n_classes = model["n_classes"]
    if names == "torchvision":
        build = ["import torchvision", f"net = torchvision.models.get_model(\"{model['arch'].split(':', 1)[1]}\", "
                                        f"num_classes={n_classes}, **{model['arch_kwargs']!r})"]
    elif names == "timm":
        build = ["import timm", f"net = timm.create_model(\"{model['arch'].split(':', 1)[1]}\", "
                                f"num_classes={n_classes}, **{model['arch_kwargs']!r})"]
    elif names == "factory":  # the user's own MODULE:CALLABLE or FILE.py:CALLABLE
        source, _, name = model["arch"].partition(":")
        load = f"runpy.run_path(\"{Path(source).resolve()}\")" if source.endswith(".py") else \
            f"vars(importlib.import_module(\"{source}\"))"
        build = ["import importlib, runpy", f"net = {load}[\"{name}\"](num_classes={n_classes}, "
                                            f"**{model['arch_kwargs']!r})"]
    else:  # a built-in network: network.py beside it, plain PyTorch
        build = ["import network", f"net = {manifest['weights']['build']}"]
    lines = ["import json", "import torch", "from safetensors.torch import load_file"] + \
        (["from torchvision.io import ImageReadMode, decode_image",
          "from torchvision.transforms.v2 import functional as F"] if image else ["import numpy as np"]) + build
    lines += ["net.load_state_dict(load_file(\"model.safetensors\"))", "net.eval()",
              "info = json.load(open(\"bcpkd-export.json\"))", "classes = info[\"classes\"]"]
    if image:
        lines += _image_lines(manifest["input"], "torch")
        norm = manifest["input"]["normalize"]
        if norm["mean"]:  # the bare network does not normalise itself
            lines += ["mean, std = (torch.tensor(info[\"input\"][\"normalize\"][k]).view(1, 3, 1, 1) for k in "
                      "(\"mean\", \"std\"))", "x = (x - mean) / std"]
    else:
        lines += [_rows_line(manifest), "x = torch.from_numpy(x)"]
        scale = manifest["input"]["standardize"]
        if scale:  # the bare network does not standardise the rows itself
            lines += ["mean, std = (torch.tensor(info[\"input\"][\"standardize\"][k]) for k in (\"mean\", \"std\"))",
                      "x = (x - mean) / std"]
    lines += ["probs = torch.softmax(net(x), dim=1).detach()"]
    return "\n".join(lines + ["best = int(probs[0].argmax())", "print(classes[best], float(probs[0][best]))"])


def _folded(manifest: dict) -> str:
    t = manifest.get("hf", {}).get("t_cal_in_head", 1.0)
    return f"; T_cal {t:.4g} is folded into its head (weight and bias divided by it): its logits are calibrated" \
        if t != 1.0 else ""


def _repeat(manifest: dict) -> str:
    """The command that trains the exported network again from its settings file."""
    config = manifest["source"]["config"]
    if manifest["kind"] != "student":
        return f"bcpkd train-teacher --recipe {config}"
    teacher = manifest["teacher"].get("teacher")
    return f"bcpkd distill --recipe {config}" + (f" --teacher {teacher}" if teacher else "")


def render(manifest: dict) -> str:
    """The README.md of an export folder."""
    model, test, teacher = manifest["model"], manifest["test"], manifest["teacher"]
    classes = manifest["classes"]
    lines = [f"# {manifest['kind']} {model['arch']} ({len(classes)} classes)", "",
             f"Exported by bcpkd from `{manifest['source']['checkpoint']}` (SHA-256 `{manifest['source']['sha256']}`).",
             "", f"- computes: {manifest['predictive']}" + ("" if manifest["exact"] else
                                                          " (not the checkpoint's exact predictive)"),
             f"- outputs: {', '.join('`' + o + '`' for o in manifest['outputs'])}"
             + (f" (`epistemic`: {manifest['epistemic']})" if manifest["epistemic"] else ""),
             f"- parameters {model['parameters']:,}, forward FLOPs per example {model['flops']:,}"
             + (f" (a text of {manifest['input']['flops_tokens']} tokens)" if "flops_tokens" in manifest["input"]
                else ""),
             f"- classes, in output order: {', '.join(classes[:50])}{' ...' if len(classes) > 50 else ''}", "",
             "## Inputs", "", *_preprocessing_lines(manifest["input"]), "",
             "## Test split", "",
             f"{test['n_examples']} examples: accuracy {test['accuracy']:.4f}, NLL {test['nll']:.4f}, "
             f"ECE {test['ece']:.4f}, Brier {test['brier']:.4f}.", "",
             "## What it learned from" if manifest["kind"] == "student" else "## Teacher", "",
             *[f"- {k}: {json.dumps(v)}" for k, v in teacher.items()], "",
             "## Where it came from", "",
             f"- made with the settings in `{manifest['source']['config']}` (`{_repeat(manifest)}` repeats the "
             f"run)", f"- exported with `{manifest['command']}`",
             f"- data fingerprint `{manifest['data']['fingerprint']}`", ""]
    parity = manifest["parity"]["max_abs_prob_difference"]
    lines += ["## Files", ""]
    for fmt, name in manifest["files"].items():
        check = f"; max |Δprob| {parity[fmt]:.1e} against the checkpoint on {manifest['parity']['examples']} test " \
                f"examples" if fmt in parity else f"; the bare network's weights, key names of {manifest['weights']['names']}"
        if fmt == "hf":
            lines.append(f"- `{name}/`: the network (config.json's id2label: the class names) and its tokenizer, as "
                         f"transformers saves them{check}{_folded(manifest)}")
        else:
            lines.append(f"- `{name}`{check}")
    if manifest["input"].get("tokenizer") == "tokenizer":
        lines.append("- `tokenizer/`: the tokenizer, as transformers saves it")
    if manifest["weights"]["network"]:
        lines.append("- `network.py`: the bare network as plain PyTorch (needs only torch; inputs normalised by you)")
    if manifest["weights"]["note"]:
        lines.append(f"- no model.safetensors: {manifest['weights']['note']}")
    image = manifest["input"]["kind"] == "image"
    lines += ["", "## Use it", "", "Each snippet runs in this folder" + (", with the image as `image.jpg`." if image
                                                                        else ".")
              + (" They need `transformers`; its pipeline runs the folder too: `pipeline(\"text-classification\", "
                 "model=\"hf\")(text, truncation=True)`." if "hf" in manifest["files"] else "")]
    for fmt, code in snippets(manifest).items():
        lines += ["", f"### {fmt}", "", "```python", code, "```"]
    return "\n".join(lines) + "\n"
