"""bcpkd beside torchdistill: the same teacher weights, student, images and batch, as whole processes.

    python bench/kd_side_by_side.py --root DIR [--torchdistill-python PY] [--teacher TEACHER.pt] [--n 5000]
        [--heldout 1000] [--views 8] [--epochs 2] [--rounds 3] [--threads 2] [--work DIR]

DIR is CIFAR-10 as ImageFolder JPEGs (DIR/{train,test}/<class>/*.jpg; nothing is downloaded). Without --teacher
a resnet56 teacher is trained for --teacher-epochs on the same data first (the point is speed, not accuracy).

1. Cache: `bcpkd calibrate --views V` builds the teacher's cache of V views of the N training images once, in its
   own process: the build's seconds (`build_cache_probs`, timed inside the process), its images/s (N x V / s) and
   the whole process's seconds.
2. Rounds (the order of the variants rotates from round to round), each variant a fresh process training a
   resnet20 student for --epochs at batch 128 on --threads intra-op threads:
   (a) `bcpkd distill` from the cached BCPs; (b) `bcpkd distill --targets online` (the teacher on every batch);
   (c) torchdistill's KD (`DistillationBox`, `KDLoss` at alpha 0 and T 1: pure distillation, as bcpkd's alpha 1)
   with the same teacher weights loaded into torchdistill's own resnet56 (its logits checked against bcpkd's
   teacher) and its resnet20 student, on the same training files through torchvision's ImageFolder-style
   loading (random pad-4 crop and flip, decoded in the training process), run under --torchdistill-python (a
   Python environment with torchdistill installed; the variant is left out without it). The loop is the one of
   torchdistill's examples/torchvision/image_classification.py: an epoch, then the student on the held-out
   images; no test-split evaluation at the end (bcpkd's `distill` runs none either).
   Timed inside each process: every epoch, the held-out evaluations inside it (bcpkd: its >= 20-point held-out
   curve and the epoch line; torchdistill: one pass per epoch) and, for bcpkd, the gradient noise after the last
   epoch (`distill.grad_noise_examples`); outside: the whole process.
Prints, per variant, medians over rounds: epoch 1, the last epoch (steady state) with and without its held-out
evaluations, the gradient noise, the whole process; the ratios to the cached run of the same round (medians of
the per-round ratios, each round's listed); and the break-even of the cache, build seconds / (other epoch - cached
epoch), on training time and on epochs as run (held-out evaluations included).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("cached", "online", "torchdistill")
BATCH, STUDENT, N_CLASSES = 128, "resnet20", 10
HERE = Path(__file__).resolve()


# ---- child processes: one run each, timing written to a JSON file ------------------------------------------------

def _timed(fn, spans: list):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spans.append((started, time.perf_counter()))
    return wrapper


def child_bcpkd(stamps: str, argv: list[str]) -> None:
    """`bcpkd ARGV` in this process, with the training report, held-out evaluations, gradient noise and cache build
    timed (wrapped, not changed)."""
    origin = time.perf_counter()
    import bcpkd_cli.calibration as calibration
    import bcpkd_cli.stages.distill as distill
    from bcpkd_cli.cli import main
    from bcpkd_cli.console import TrainingReport
    from bcpkd_cli.steps import HeldoutCurve

    marks: dict = {"epoch_ends": [], "evals": [], "grad_noise": [], "build": []}
    start, epoch_end = TrainingReport.start, TrainingReport.epoch_end

    def report_start(self, *args, **kwargs):
        marks["train_start"] = time.perf_counter()
        return start(self, *args, **kwargs)

    def report_epoch_end(self, *args, **kwargs):
        marks["epoch_ends"].append(time.perf_counter())
        return epoch_end(self, *args, **kwargs)

    TrainingReport.start, TrainingReport.epoch_end = report_start, report_epoch_end
    distill.grad_noise = _timed(distill.grad_noise, marks["grad_noise"])
    calibration.build_cache_probs = _timed(calibration.build_cache_probs, marks["build"])
    HeldoutCurve.__call__ = _timed(HeldoutCurve.__call__, marks["evals"])  # every held-out log entry and line
    atexit.register(lambda: Path(stamps).write_text(json.dumps(_relative(marks, origin))))
    sys.argv = ["bcpkd", *argv]
    main()


def _relative(marks: dict, origin: float):
    if isinstance(marks, dict):
        return {k: _relative(v, origin) for k, v in marks.items()}
    if isinstance(marks, (list, tuple)):
        return [_relative(v, origin) for v in marks]
    return marks - origin


def child_torchdistill(spec_file: str, stamps: str) -> None:
    """torchdistill KD of a resnet20 student from the given resnet56 weights (imports only torch, torchvision and
    torchdistill: it runs in torchdistill's environment)."""
    origin = time.perf_counter()
    import torch
    from PIL import Image
    from torch.utils.data import Dataset, RandomSampler, SequentialSampler
    from torchvision import transforms
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.models.classification.resnet import resnet20, resnet56

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    marks: dict = {"imported": time.perf_counter(), "epochs": [], "evals": []}
    normalize = transforms.Normalize(spec["mean"], spec["std"])

    class Files(Dataset):
        def __init__(self, files, transform):
            self.files, self.transform = files, transform

        def __len__(self):
            return len(self.files)

        def __getitem__(self, i):
            path, label = self.files[i]
            with open(path, "rb") as f:
                image = Image.open(f).convert("RGB")
            return self.transform(image), label

    train_set = Files(spec["train"], transforms.Compose([transforms.RandomCrop(32, padding=4),
                                                         transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                                         normalize]))
    val_set = Files(spec["heldout"], transforms.Compose([transforms.ToTensor(), normalize]))
    teacher = resnet56(num_classes=N_CLASSES)
    teacher.load_state_dict(torch.load(spec["teacher"], weights_only=True))
    reference = torch.load(spec["reference"], weights_only=True)
    teacher.eval()  # torchdistill 1.1.5 itself never calls eval() on the teacher (BatchNorm on batch statistics)
    with torch.no_grad():
        inputs = normalize(reference["images"].float() / 255.0)
        marks["teacher_logit_difference"] = (teacher(inputs) - reference["logits"]).abs().max().item()
    torch.manual_seed(spec["seed"])
    student = resnet20(num_classes=N_CLASSES)
    loader = {"batch_size": BATCH, "num_workers": 0}
    train_config = {
        "num_epochs": spec["epochs"],
        "train_data_loader": {"dataset_id": "train", "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
                              "kwargs": loader},
        "val_data_loader": {"dataset_id": "val", "sampler": {"class_or_func": SequentialSampler, "kwargs": {}},
                            "kwargs": loader},
        "teacher": {"sequential": [], "forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"sequential": [], "forward_proc": "forward_batch_only", "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"criterion": {
            "key": "KDLoss", "kwargs": {"student_module_path": ".", "student_module_io": "output",
                                        "teacher_module_path": ".", "teacher_module_io": "output",
                                        "temperature": 1.0, "alpha": 0.0, "reduction": "batchmean"}},
            "weight": 1.0}}}},
    }
    device = torch.device("cpu")
    box = get_distillation_box(teacher, student, {"train": train_set, "val": val_set}, train_config, device, None,
                               False, 1)
    marks["ready"] = time.perf_counter()
    best = -1.0
    for epoch in range(box.num_epochs):  # examples/torchvision/image_classification.py: train()
        started = time.perf_counter()
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:  # its train_one_epoch
            sample_batch, targets = sample_batch.to(device), targets.to(device)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            if not torch.isfinite(loss):
                raise ValueError(f"loss {loss.item()}")
            loss.item()
        trained = time.perf_counter()
        correct = 0
        student.eval()
        with torch.inference_mode():  # its evaluate(student, val_data_loader)
            for images, labels in box.val_data_loader:
                correct += (student(images).argmax(1) == labels).sum().item()
        accuracy = correct / len(val_set)
        evaluated = time.perf_counter()
        if accuracy > best:
            best = accuracy
            torch.save(student.state_dict(), Path(spec["out"]) / "student.pt")
        box.post_epoch_process()
        marks["epochs"].append((started, time.perf_counter()))
        marks["evals"].append((trained, evaluated))
    box.clean_modules()
    marks["heldout_accuracy"] = best
    Path(stamps).write_text(json.dumps(
        {k: (v if k in ("teacher_logit_difference", "heldout_accuracy") else _relative(v, origin))
         for k, v in marks.items()}))


# ---- the benchmark ---------------------------------------------------------------------------------------------

def run_child(command: list[str], log: Path, stamps: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{log.read_text()[-3000:]}")
    return seconds, json.loads(stamps.read_text())


def bcpkd(work: Path, name: str, argv: list[str]) -> tuple[float, dict]:
    stamps = work / f"{name}.json"
    return run_child([sys.executable, str(HERE), "--child", "bcpkd", str(stamps), "--", *argv],
                     work / f"{name}.log", stamps)


def within(span: tuple[float, float], spans: list) -> float:
    """Seconds of `spans` inside `span`."""
    return sum(max(0.0, min(b, span[1]) - max(a, span[0])) for a, b in spans)


def epochs_of(marks: dict, kind: str) -> list[dict]:
    """Per epoch: seconds as run, and the held-out evaluations' seconds inside it."""
    if kind == "torchdistill":
        spans = [tuple(s) for s in marks["epochs"]]
    else:
        ends = marks["epoch_ends"]
        spans = list(zip([marks["train_start"], *ends[:-1]], ends))
    return [{"seconds": b - a, "evals": within((a, b), marks["evals"])} for a, b in spans]


def torchdistill_inputs(teacher: Path, work: Path, threads: int, epochs: int) -> Path:
    """The teacher's weights under torchdistill's resnet56 names, reference logits, and the training and held-out
    files bcpkd's teacher was made from (bcpkd's own seeded split of the folder)."""
    import torch
    from bcpkd_cli import artifacts
    from bcpkd_cli.data import _generator, images
    from bcpkd_cli.models import build_model

    payload = artifacts.load_checkpoint(teacher, artifacts.TEACHER_FORMAT)
    spec, data = payload["model"], payload["config"]["data"]
    if spec["arch"] != "resnet56":
        sys.exit(f"--teacher: a resnet56 teacher is needed for torchdistill's resnet56, got {spec['arch']}")
    model = build_model(spec, payload["state_dict"]).eval()
    renamed = {}
    for key, value in model.state_dict().items():
        if key.startswith("features.1."):
            renamed[key[len("features.1."):]] = value
        elif key.startswith("head."):
            renamed["fc." + key[len("head."):]] = value
        elif key.startswith("features.0."):
            continue  # ImageInput: its statistics go into torchvision's Normalize
        else:
            sys.exit(f"unexpected key {key} in the teacher")
    torch.save(renamed, work / "teacher-torchdistill.pt")
    images_ = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"images": images_, "logits": model(images_)}, work / "teacher-reference.pt")
    listing = images.list_image_folder(Path(data["root"]) / "train")
    order = torch.randperm(len(listing.labels), generator=_generator(data["seed"], "heldout"))
    heldout = order[:data["n_heldout"]].sort().values
    train = order[data["n_heldout"]:][: data["n_train"] or None].sort().values
    files = [(str(p), int(label)) for p, label in zip(listing.paths, listing.labels)]
    out = work / "torchdistill-out"
    out.mkdir(exist_ok=True)
    spec_file = work / "torchdistill.json"
    spec_file.write_text(json.dumps({
        "teacher": str(work / "teacher-torchdistill.pt"), "reference": str(work / "teacher-reference.pt"),
        "train": [files[i] for i in train.tolist()], "heldout": [files[i] for i in heldout.tolist()],
        "mean": spec["stats"]["mean"], "std": spec["stats"]["std"], "threads": threads, "epochs": epochs,
        "seed": 0, "out": str(out)}))
    return spec_file


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="CIFAR-10 as ImageFolder JPEGs: DIR/{train,test}")
    parser.add_argument("--torchdistill-python", type=Path, help="a Python with torchdistill (variant c)")
    parser.add_argument("--teacher", type=Path, help="a resnet56 teacher.pt made from --root (default: train one)")
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--n", type=int, default=5000,
                        help="training images of the teacher trained here (with --teacher: its own)")
    parser.add_argument("--heldout", type=int, default=1000, help="held-out images (as --n)")
    parser.add_argument("--views", type=int, default=8, help="cached views per image (calibrate.views)")
    parser.add_argument("--epochs", type=int, default=2, help="student epochs of every run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every process")
    parser.add_argument("--work", type=Path, help="folder for the runs (default: a new temporary folder)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kd-side-by-side-"))
    work.mkdir(parents=True, exist_ok=True)
    common = ["--set", f"threads={args.threads}", "--device", "cpu"]
    load = os.getloadavg()[0]
    started = time.perf_counter()

    teacher = args.teacher
    if teacher is None:
        teacher = work / "teacher" / "teacher.pt"
        seconds, _ = bcpkd(work, "teacher", [
            "train-teacher", "--data-root", str(args.root), "--arch", "resnet56", "--epochs", str(args.teacher_epochs),
            "--batch-size", str(BATCH), "--set", f"data.n_train={args.n}", "--set", f"data.n_heldout={args.heldout}",
            "--set", "data.n_test=1000", "--out", str(teacher.parent), "--force", *common])
        print(f"teacher: resnet56 trained for {args.teacher_epochs} epoch(s) in {seconds:.0f} s -> {teacher}")

    from bcpkd_cli import artifacts
    data = artifacts.load_checkpoint(teacher, artifacts.TEACHER_FORMAT, mmap=True)["config"]["data"]
    args.n, args.heldout = data["n_train"], data["n_heldout"]  # what the teacher was made from, distill's data

    # 1. the cache, once
    cache_dir = work / "cache"
    process, marks = bcpkd(work, "calibrate", ["calibrate", "--teacher", str(teacher), "--views", str(args.views),
                                               "--out", str(cache_dir), "--force", *common])
    build = sum(b - a for a, b in marks["build"])
    cache = cache_dir / "bcp.safetensors"

    spec_file = None
    if args.torchdistill_python:
        spec_file = torchdistill_inputs(teacher, work, args.threads, args.epochs)
    variants = VARIANTS if spec_file else VARIANTS[:2]

    def distill(name: str, extra: list[str]) -> list[str]:
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        return ["distill", "--teacher", str(teacher), "--cache", str(cache), "--arch", STUDENT, "--epochs",
                str(args.epochs), "--batch-size", str(BATCH), "--views", str(args.views), "--out", str(out), *extra,
                *common]

    # 2. interleaved rounds
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for variant in variants[r % len(variants):] + variants[:r % len(variants)]:
            name = f"round{r + 1}-{variant}"
            if variant == "torchdistill":
                stamps = work / f"{name}.json"
                seconds, marks = run_child([str(args.torchdistill_python), str(HERE), "--child", "torchdistill",
                                            str(spec_file), str(stamps)], work / f"{name}.log", stamps)
                noise = 0.0
            else:
                online = ["--targets", "online"] if variant == "online" else []
                seconds, marks = bcpkd(work, name, distill(name, online))
                noise = sum(b - a for a, b in marks["grad_noise"])
            row = {"process": seconds, "epochs": epochs_of(marks, variant), "grad_noise": noise,
                   "logit_difference": marks.get("teacher_logit_difference")}
            results[variant].append(row)
            last = row["epochs"][-1]
            epochs = ", ".join(format(e["seconds"], ".1f") for e in row["epochs"])
            print(f"round {r + 1} {variant}: epochs {epochs} s "
                  f"(last: {last['seconds'] - last['evals']:.1f} s training, {last['evals']:.1f} s held-out), "
                  f"gradient noise {noise:.1f} s, process {seconds:.1f} s", flush=True)

    # 3. the tables
    def last_training(row):
        return row["epochs"][-1]["seconds"] - row["epochs"][-1]["evals"]

    print(f"\nteacher resnet56 -> student {STUDENT}, {args.n} CIFAR-10 JPEGs ({args.heldout} held out), batch {BATCH}, "
          f"{args.views} views, {args.epochs} epochs, {args.threads} intra-op thread(s), {args.rounds} interleaved "
          f"rounds; "
          f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
          f"{(time.perf_counter() - started) / 60:.1f} min")
    print(f"cache build (once): {build:.1f} s for {args.n} x {args.views} views = {args.n * args.views / build:.0f} "
          f"images/s; the calibrate process {process:.1f} s")
    if spec_file:
        print(f"torchdistill's resnet56 with the teacher's weights: largest logit difference from bcpkd's teacher "
              f"{results['torchdistill'][0]['logit_difference']:.1e}")
    print(f"\n| variant | epoch 1 (s) | epoch {args.epochs} (s) | of it held-out evaluation (s) | epoch {args.epochs} "
          f"training (s) | gradient noise (s) | {args.epochs}-epoch process (s) | training / cached | "
          f"epoch / cached | process / cached |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ratios = {"training": last_training, "epoch": lambda row: row["epochs"][-1]["seconds"],
              "process": lambda row: row["process"]}
    per_round = {}
    for variant in variants:
        rows = results[variant]
        per_round[variant] = {k: [f(a) / f(b) for a, b in zip(rows, results["cached"])] for k, f in ratios.items()}
        processes = [r["process"] for r in rows]
        print(f"| {variant} | {median([r['epochs'][0]['seconds'] for r in rows]):.1f} "
              f"| {median([r['epochs'][-1]['seconds'] for r in rows]):.1f} "
              f"| {median([r['epochs'][-1]['evals'] for r in rows]):.1f} "
              f"| {median([last_training(r) for r in rows]):.1f} | {median([r['grad_noise'] for r in rows]):.1f} "
              f"| {median(processes):.1f} (range {min(processes):.0f}-{max(processes):.0f}) "
              + "".join(f"| {median(v):.2f} " for v in per_round[variant].values()) + "|")
    for variant in variants[1:]:
        print(f"{variant} / cached per round: " + "; ".join(
            f"{k} {', '.join(format(v, '.2f') for v in values)}" for k, values in per_round[variant].items()))
    for variant in variants[1:]:
        for what, seconds_of in (("training", last_training),
                                 ("as run, held-out evaluations included", ratios["epoch"])):
            gain = median([seconds_of(a) - seconds_of(b) for a, b in zip(results[variant], results["cached"])])
            even = f"{build / gain:.2f} student epochs" if gain > 0 else "never (a cached epoch saves nothing)"
            print(f"break-even against {variant} ({what}): the build {build:.1f} s / {gain:.1f} s per epoch = {even}")
    print(f"\ncommand: python bench/kd_side_by_side.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        if sys.argv[2] == "bcpkd":
            child_bcpkd(sys.argv[3], sys.argv[5:])  # --child bcpkd STAMPS -- ARGV
        else:
            child_torchdistill(sys.argv[3], sys.argv[4])
    else:
        main()
