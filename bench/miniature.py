"""The ImageNet-shaped miniature through the whole pipeline, stream and store, at two sizes: wall time and peak
resident memory of every stage, and the training loops' data wait.

    python bench/miniature.py --work DIR [--per-class 2,4] [--decode stream,store]

Writes the miniature (recipes/examples/make_imagenet_miniature.py: 1,000 classes, JPEGs of 150 to 500 px, one
test image per class) with N training images per class for each N, then runs `bcpkd train-teacher` (Laplace
around torchvision:resnet18), `calibrate` (top-5 cache of 4 random-resized-crop views), `distill` and
`evaluate` from recipes/imagenet-miniature.yaml, each stage a fresh process. Peak resident memory is the
largest of that process and its worker processes (getrusage of the children). A store is decoded by the
first stage that needs it: that stage's time includes decoding.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "imagenet-miniature.yaml"


def stage(name: str, args: list[str], log: Path) -> dict:
    """One CLI stage in a child interpreter that reports its children's peak RSS."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode, file=sys.stderr)")
    started = time.perf_counter()
    with open(log, "w") as err:
        result = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "bcpkd_cli", *args],
                                stdout=subprocess.PIPE, stderr=err, text=True)
    seconds = time.perf_counter() - started
    tail = log.read_text().strip().splitlines()
    peak_kb, code = (int(v) for v in tail[-1].split())
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); see {log}")
    waits = [float(w) for w in re.findall(r"data wait ([\d.]+)%", log.read_text())]
    return {"stage": name, "seconds": round(seconds, 1), "peak_rss_mb": round(peak_kb / 1024),
            "data_wait_percent": waits[-1] if waits else None, "stdout": result.stdout.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the miniatures and runs")
    parser.add_argument("--per-class", default="2,4", help="training images per class, one run per value")
    parser.add_argument("--decode", default="stream,store")
    args = parser.parse_args()
    rows = []
    for per_class in [int(v) for v in args.per_class.split(",")]:
        data = args.work / f"miniature-{per_class}"
        if not (data / "test").is_dir():
            subprocess.run([sys.executable, str(REPO / "recipes" / "examples" / "make_imagenet_miniature.py"),
                            str(data), "--per-class", str(per_class)], check=True, stdout=subprocess.DEVNULL)
        for decode in args.decode.split(","):
            run = args.work / f"run-{per_class}-{decode}"
            common = ["--recipe", str(RECIPE), "--set", f"data.root={data}", "--set", f"data.decode={decode}"]
            teacher = stage("train-teacher", ["train-teacher", *common, "--bayes", "laplace", "--out", str(run / "t")],
                            args.work / f"{run.name}-teacher.log")
            calibrate = stage("calibrate", ["calibrate", *common, "--teacher", str(run / "t" / "teacher.pt")],
                              args.work / f"{run.name}-calibrate.log")
            distill = stage("distill", ["distill", *common, "--teacher", str(run / "t" / "teacher.pt"),
                                        "--out", str(run / "s")], args.work / f"{run.name}-distill.log")
            evaluate = stage("evaluate", ["evaluate", *common, str(run / "s" / "student.pt")],
                             args.work / f"{run.name}-evaluate.log")
            for result in (teacher, calibrate, distill, evaluate):
                result.pop("stdout")
                rows.append({"images": 1000 * per_class, "decode": decode, **result})
                print(json.dumps(rows[-1]), flush=True)
    print("\n| training images | decode | stage | wall (s) | peak RSS (MB) | data wait |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        wait = "" if r["data_wait_percent"] is None else f"{r['data_wait_percent']}%"
        print(f"| {r['images']:,} | {r['decode']} | {r['stage']} | {r['seconds']} | {r['peak_rss_mb']:,} | {wait} |")


if __name__ == "__main__":
    main()
