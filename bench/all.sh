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
if [ -d data/cifar10-jpeg ]; then  # the shortened teacher/student pairs of "What distillation buys at deployment"
  P=${WORK:-bench-work}/payoff
  SHORT=(-r recipes/cifar10-cpu.yaml --data-root data/cifar10-jpeg --set data.n_train=4000 --set data.n_heldout=1000 --force)
  "$PY" -m bcpkd_cli train-teacher "${SHORT[@]}" --bayes laplace --arch resnet20 --epochs 3 --out "$P/t" >/dev/null
  "$PY" -m bcpkd_cli distill "${SHORT[@]}" --teacher "$P/t/teacher.pt" --arch wrn_16_1 --epochs 3 --out "$P/s" >/dev/null
  "$PY" -m bcpkd_cli train-teacher "${SHORT[@]}" --bayes laplace --arch torchvision:resnet18 --epochs 2 --out "$P/tv-t" >/dev/null
  for S in timm:resnet10t torchvision:mobilenet_v3_small; do
    "$PY" -m bcpkd_cli distill "${SHORT[@]}" --teacher "$P/tv-t/teacher.pt" --arch "$S" --epochs 2 --out "$P/tv-s-${S#*:}" >/dev/null
  done
  # each student's calibrated teacher (the teacher.pt beside its cache) is found and exported beside it
  "$PY" bench/deploy_payoff.py "$P/s" "$P/tv-s-resnet10t" "$P/tv-s-mobilenet_v3_small" --work "$P/exports"
else
  echo "bench/deploy_payoff.py skipped: unpack CIFAR-10 as ImageFolder JPEGs into data/cifar10-jpeg first"
fi
"$PY" bench/laplace_fit.py
"$PY" bench/topk.py --epochs 10
"$PY" bench/cache_shards.py
"$PY" bench/cache_speed.py --teacher resnet56 --student resnet20 --n 1024 --views 1 --batches 0,32,64,256,512,1024 --repeats 3
"$PY" bench/grad_noise_cost.py --n 4096 --sample 2048 --repeats 3
"$PY" bench/heldout_cost.py --n 5000 --heldout 1000 --epochs 2 --repeats 3 --threads 1
"$PY" bench/threads.py
WORK=${WORK:-bench-work}
"$PY" bench/miniature.py --work "$WORK" --per-class 1
"$PY" bench/miniature.py --work "$WORK" --per-class 2
"$PY" bench/stream_wait.py --root "$WORK/miniature-2" --image-size 128 --steps 10
"$PY" bench/stream_wait.py --root "$WORK/miniature-2" --image-size 224 --steps 8
