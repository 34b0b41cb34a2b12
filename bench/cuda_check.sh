#!/usr/bin/env bash
# The CUDA path in one command, for a GPU machine (about 5 minutes on one GPU):
#   bash bench/cuda_check.sh            (PYTHON=... for another interpreter; DEVICE=cpu tries it on a CPU)
# 1. student images/s under bf16 autocast + channels_last, float32, and torch.compile (resnet18, wrn_16_2);
# 2. the synthetic pipeline on the device: teacher, cache, student, evaluation;
# 3. data-parallel distillation through torchrun on every visible GPU (NCCL; skipped with one GPU),
#    checked against the single-process student;
# 4. images read per batch on the device: a 100-class miniature stored and streamed (nvJPEG), data wait;
# 5. text: recipes/text-example.yaml on the device (tiny BERTs under bf16 autocast), where transformers is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
WORK=$(mktemp -d)
echo "device $DEVICE, $GPUS GPU(s), torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
[ "$DEVICE" = cpu ] || nvidia-smi -L

"$PY" bench/student_throughput.py --device "$DEVICE" --compile --steps "${STEPS:-50}"

SMALL=(--set data.n_train=20000 --set teacher.epochs=3 --set distill.epochs=2 --set distill.batch_size=512 --device "$DEVICE")
teacher=$("$PY" -m bcpkd_cli train-teacher --bayes laplace --out "$WORK/t" "${SMALL[@]}")
one=$("$PY" -m bcpkd_cli distill --teacher "$teacher" --out "$WORK/one" "${SMALL[@]}")
"$PY" -m bcpkd_cli evaluate "$one" "$teacher" --out "$WORK/eval" "${SMALL[@]}"  # the table on stderr
if [ "$GPUS" -ge 2 ] && [ "$DEVICE" != cpu ]; then
  many=$("$PY" -m torch.distributed.run --standalone --nproc-per-node "$GPUS" -m bcpkd_cli distill \
    --teacher "$teacher" --out "$WORK/many" "${SMALL[@]}" | tail -1)
  "$PY" - "$one" "$many" <<'PYEOF'
import sys, torch
a, b = (torch.load(p, weights_only=True)["state_dict"] for p in sys.argv[1:])
print("DDP vs one process, largest weight difference:", max((a[k].float() - b[k].float()).abs().max().item() for k in a))
PYEOF
else
  echo "torchrun DDP check skipped: it needs two or more GPUs"
fi
"$PY" recipes/examples/make_imagenet_miniature.py "$WORK/mini" --classes 100 --per-class 20 > /dev/null
"$PY" bench/stream_wait.py --root "$WORK/mini" --image-size 224 --device "$DEVICE" --batch 128 --steps 12
if "$PY" -c "import transformers, tokenizers" 2>/dev/null; then
  T="$WORK/text/data/text-example"
  "$PY" recipes/examples/make_text.py "$T" > /dev/null
  "$PY" -m bcpkd_cli run recipes/text-example.yaml --out "$WORK/text/runs" --set device="$DEVICE" \
    --set data.root="$T" --set teacher.arch="hf:$T/teacher-bert" --set distill.arch="hf:$T/student-bert"
  cat "$WORK/text/runs/summary.md"
else
  echo "text check skipped: transformers and tokenizers are not installed"
fi
echo "artifacts in $WORK"
