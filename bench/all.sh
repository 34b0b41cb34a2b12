#!/usr/bin/env bash
# Every figure of docs/benchmarks.md with one command (each script prints its own table):
#   bash bench/all.sh            (PYTHON=... to use another interpreter, WORK=... for the miniatures; about an hour on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" bench/cache_cost.py --arch resnet20 --n 1024 --samples 4 --repeats 5
"$PY" bench/cache_cost.py --arch mlp --n 22500 --samples 4 --repeats 15 --batch 1024
"$PY" bench/distill_speed.py --n 768 --repeats 6
"$PY" bench/student_throughput.py --steps 5
if [ -d data/cifar10-jpeg ]; then
  "$PY" bench/data_path.py --root data/cifar10-jpeg
else
  echo "bench/data_path.py skipped: unpack CIFAR-10 as ImageFolder JPEGs into data/cifar10-jpeg first"
fi
"$PY" bench/laplace_fit.py
"$PY" bench/topk.py --epochs 10
"$PY" bench/cache_shards.py
"$PY" bench/threads.py
WORK=${WORK:-/tmp/bcpkd-bench}
"$PY" bench/miniature.py --work "$WORK" --per-class 1
"$PY" bench/miniature.py --work "$WORK" --per-class 2
"$PY" bench/stream_wait.py --root "$WORK/miniature-2" --image-size 128 --steps 10
"$PY" bench/stream_wait.py --root "$WORK/miniature-2" --image-size 224 --steps 8
