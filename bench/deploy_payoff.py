"""What distillation buys at deployment: teacher against student, side by side, on this machine.

    python bench/deploy_payoff.py EXPORT_OR_CHECKPOINT [EXPORT_OR_CHECKPOINT ...] [--work DIR] [--repeats 30]

Each argument is a folder written by `bcpkd export` (with bcpkd-export.json) or a checkpoint (teacher.pt,
student.pt, or its run folder), which is exported first into --work with `bcpkd export`. Give a teacher as the
calibrated teacher.pt (<teacher folder>/bcp/<key>/teacher.pt, which distill/calibrate write): its export is the
calibrated predictive, the one the student learned from.

Parameters, forward FLOPs per example and the test split's accuracy, NLL and ECE are read from each
bcpkd-export.json (what `bcpkd export` measured), not recomputed. Latency is measured here, on the CPU, for
every model and both of its files:

- ONNX Runtime: model.onnx in an InferenceSession on CPUExecutionProvider, intra-op threads = --threads (default:
  the CPUs this process may use), inter-op 1, sequential execution, full graph optimisation; the thread pool's
  spin-waiting is switched off (session.intra_op.allow_spinning=0) so that it does not take cores from the
  model timed next;
- PyTorch: torch.export.load(model.pt2).module() called under torch.inference_mode(), torch.set_num_threads(the
  same number).

At batch 1 and 64 (--batches) on random float32 inputs in [0, 1] of the export's input shape; --warmup calls per
cell first, then --repeats rounds in which every (model, runtime, batch) cell runs once, the cells in an order
rotated each round, so that the machine's load changes hit every model alike; the figures are medians of the
rounds, in milliseconds per call (the whole batch). The load average is printed before and after the timed part.

Each student is set against its teacher: the exported teacher whose checkpoint the student's targets name (the
uncalibrated teacher.pt by SHA-256, the calibrated one by the cache's folder), else the nearest teacher before it
among the arguments. A student whose teacher is not among the arguments gets the calibrated teacher.pt beside its
cache added (exported into --work) unless --given-only: the students alone are enough. Prints a markdown table
with one row per model and a "student / teacher" row under each student.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bcpkd_cli.artifacts import sha256_file

MANIFEST = "bcpkd-export.json"


@dataclass
class Model:
    folder: Path
    manifest: dict
    label: str = ""
    times: dict = field(default_factory=dict)  # (runtime, batch) -> [seconds per call]

    @property
    def is_teacher(self) -> bool:
        return self.manifest["kind"] == "teacher"


def checkpoint_of(path: Path) -> Path:
    """A run folder's teacher.pt or student.pt, or the file itself."""
    if path.is_file():
        return path
    for name in ("student.pt", "teacher.pt"):
        if (path / name).is_file():
            return path / name
    raise SystemExit(f"{path}: neither an export folder ({MANIFEST}) nor a checkpoint or run folder")


def export_folder(path: Path, work: Path) -> Path:
    """`path` if it is an export folder; otherwise the checkpoint exported into `work` (reused when an export of the
    same checkpoint file is there already)."""
    if (path / MANIFEST).is_file():
        return path
    checkpoint = checkpoint_of(path)
    where = hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest()[:8]
    out = work / f"{checkpoint.parent.name}-{checkpoint.stem}-{where}"
    if (out / MANIFEST).is_file():
        done = json.loads((out / MANIFEST).read_text())
        if done["source"]["sha256"] == sha256_file(checkpoint):
            print(f"reusing {out} (an export of {checkpoint})", file=sys.stderr)
            return out
    command = [sys.executable, "-m", "bcpkd_cli", "export", str(checkpoint), "--out", str(out), "--force",
               "--format", "onnx,pt2"]
    print("running: " + " ".join(command), file=sys.stderr)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return out


def load(folder: Path) -> Model:
    manifest = json.loads((folder / MANIFEST).read_text())
    for name in ("onnx", "pt2"):
        if name not in manifest["files"]:
            raise SystemExit(f"{folder}: has no model.{name}; export it with --format onnx,pt2")
    model = Model(folder, manifest)
    arch = manifest["model"]["arch"]
    if model.is_teacher:
        teacher = manifest.get("teacher") or {}
        kind = teacher.get("kind", "")
        calibrated = "calibrated" if teacher.get("calibrated") else "uncalibrated"
        model.label = f"teacher {arch} ({kind}, {calibrated})" if kind else f"teacher {arch}"
    else:
        model.label = f"student {arch}"
    return model


def teacher_keys(m: Model) -> set[str]:
    """What a student's record may name a teacher export by: its checkpoint's SHA-256 and its folder (a calibrated
    teacher's folder is the folder of the cache it wrote)."""
    source = m.manifest["source"]
    return {source["sha256"], str(Path(source["checkpoint"]).resolve().parent)}


def student_keys(m: Model) -> list[str]:
    targets = m.manifest.get("teacher") or {}
    keys = [targets.get(k) for k in ("calibrated_teacher_sha256", "teacher_sha256")]
    if targets.get("cache"):
        keys.append(str(Path(targets["cache"]).resolve().parent))
    return [k for k in keys if k]


def calibrated_teacher(m: Model) -> Path | None:
    """The calibrated teacher.pt written beside the cache a student learned from, if it is still there."""
    cache = (m.manifest.get("teacher") or {}).get("cache")
    path = Path(cache).parent / "teacher.pt" if cache else None
    return path if path is not None and path.is_file() else None


def pair(models: list[Model]) -> dict[int, int]:
    """Student index -> its teacher's index: the teacher its targets name, else the nearest teacher before it."""
    pairs = {}
    for i, m in enumerate(models):
        if m.is_teacher:
            continue
        named = set(student_keys(m))
        match = next((j for j, t in enumerate(models) if t.is_teacher and teacher_keys(t) & named), None)
        if match is None:
            before = [j for j in range(i) if models[j].is_teacher]
            match = before[-1] if before else None
        if match is not None:
            pairs[i] = match
    return pairs


def with_teachers(models: list[Model], work: Path) -> list[Model]:
    """`models` with, before each student whose teacher is not among them, the calibrated teacher it learned from
    (exported into `work`)."""
    out: list[Model] = []
    for m in models:
        if not m.is_teacher and not any(t.is_teacher and teacher_keys(t) & set(student_keys(m))
                                        for t in models + out):
            path = calibrated_teacher(m)
            if path is not None:
                print(f"{m.label}: adding its calibrated teacher {path}", file=sys.stderr)
                out.append(load(export_folder(path, work)))
        out.append(m)
    return out


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def runners(model: Model, threads: int, batches: list[int]) -> dict:
    """(runtime, batch) -> a callable running one batch."""
    shape = tuple(model.manifest["input"]["shape"])
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.rand((b, *shape), generator=gen) for b in batches}
    session = ort_session(model.folder / model.manifest["files"]["onnx"], threads)
    name = session.get_inputs()[0].name
    program = torch.export.load(str(model.folder / model.manifest["files"]["pt2"])).module()

    def ort_call(x: np.ndarray):
        return lambda: session.run(None, {name: x})

    def torch_call(x: torch.Tensor):
        def call():
            with torch.inference_mode():
                return program(x)
        return call

    calls = {}
    for b in batches:
        calls[("ort", b)] = ort_call(inputs[b].numpy())
        calls[("torch", b)] = torch_call(inputs[b])
    return calls


def measure(models: list[Model], threads: int, batches: list[int], warmup: int, repeats: int) -> None:
    cells = []
    for m in models:
        for key, call in runners(m, threads, batches).items():
            cells.append((m, key, call))
    for m, key, call in cells:
        m.times[key] = []
        for _ in range(warmup):
            call()
    for r in range(repeats):
        shift = r % len(cells)
        for m, key, call in cells[shift:] + cells[:shift]:
            start = time.perf_counter()
            call()
            m.times[key].append(time.perf_counter() - start)


def median_ms(m: Model, key) -> float:
    return 1000 * statistics.median(m.times[key])


def fmt_int(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} G"
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} k"
    return f"{n:.0f}"


def fmt_ms(ms: float) -> str:
    return f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def table(models: list[Model], pairs: dict[int, int], batches: list[int]) -> str:
    keys = [("ort", b) for b in batches] + [("torch", b) for b in batches]
    names = {"ort": "ORT", "torch": "torch"}
    head = ["model", "parameters", "FLOPs/example"] + [f"{names[r]} ms b{b}" for r, b in keys] + \
        ["test accuracy", "ECE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, m in enumerate(models):
        spec, test = m.manifest["model"], m.manifest["test"]
        row = [m.label, fmt_int(spec["parameters"]), fmt_int(spec["flops"])]
        row += [fmt_ms(median_ms(m, k)) for k in keys]
        row += [f"{test['accuracy']:.4f}", f"{test['ece']:.4f}"]
        lines.append("| " + " | ".join(row) + " |")
        if i in pairs:
            t = models[pairs[i]]
            ratio = ["student / teacher", f"{spec['parameters'] / t.manifest['model']['parameters']:.3f}",
                     f"{spec['flops'] / t.manifest['model']['flops']:.3f}"]
            ratio += [f"{median_ms(m, k) / median_ms(t, k):.3f}" for k in keys]
            ratio += [f"{test['accuracy'] / t.manifest['test']['accuracy']:.3f}",
                      f"{test['ece'] / t.manifest['test']['ece']:.3f}" if t.manifest["test"]["ece"] else "-"]
            lines.append("| " + " | ".join(f"*{c}*" for c in ratio) + " |")
    return "\n".join(lines)


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_name() -> str:
    try:
        for entry in Path("/proc/cpuinfo").read_text().splitlines():
            if entry.startswith("model name"):
                return entry.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="export folders or checkpoints (teacher before student)")
    parser.add_argument("--work", type=Path, default=Path("runs/deploy-payoff"),
                        help="where checkpoints are exported (default: runs/deploy-payoff)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (default: the usable CPUs)")
    parser.add_argument("--given-only", action="store_true",
                        help="do not add the calibrated teacher of a student whose teacher is not given")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    import onnxruntime

    threads = args.threads or usable_cpus()
    torch.set_num_threads(threads)
    batches = [int(b) for b in args.batches.split(",")]
    models = [load(export_folder(p, args.work)) for p in args.paths]
    if not args.given_only:
        models = with_teachers(models, args.work)
    pairs = pair(models)
    print(f"machine: {cpu_name()}, {usable_cpus()} usable CPUs ({platform.machine()}); torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}; {threads} intra-op threads in both runtimes; "
          f"medians of {args.repeats} interleaved rounds after {args.warmup} warm-up calls per cell")
    before = os.getloadavg()
    started = time.perf_counter()
    measure(models, threads, batches, args.warmup, args.repeats)
    seconds = time.perf_counter() - started
    after = os.getloadavg()
    print(f"load average (1, 5, 15 min): before {before[0]:.2f}, {before[1]:.2f}, {before[2]:.2f}; "
          f"after {after[0]:.2f}, {after[1]:.2f}, {after[2]:.2f} ({seconds:.0f} s timed)")
    print()
    print(table(models, pairs, batches))
    print()
    for m in models:
        test = m.manifest["test"]
        print(f"- {m.label}: {m.folder}; predictive: {m.manifest['predictive']}; test NLL {test['nll']:.4f} on "
              f"{test['n_examples']} examples")


if __name__ == "__main__":
    main()
