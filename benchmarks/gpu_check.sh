#!/usr/bin/env bash
# The GPU path, measured on a lent GPU machine (its image has torch / torchvision / timm,
# no Ray or MLflow): AMP and channels_last through the trainable, and trials sharing a GPU.
# Usage (from the repo root, wheels of missing pure-Python packages in .whl/):
#   bash benchmarks/gpu_check.sh
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
echo "== trainable vs bare loop: resnet50, 224 px, batch 128, full fine-tune"
for flags in "--amp --channels-last" "--amp --no-channels-last" "--no-amp --no-channels-last"; do
  echo "-- $flags"
  python3 benchmarks/trainable_overhead.py --device cuda --model resnet50 --image-size 224 --batch-size 128 \
    --images 1800 --unfreeze-last 4 --threads 4 --epochs 3 $flags | tail -4
done
echo "== trainable vs bare loop: the quickstart's EfficientNet-Lite0, 64 px, batch 32"
python3 benchmarks/trainable_overhead.py --device cuda --threads 4 --epochs 3 | tail -4
echo "== several trials on one GPU"
python3 benchmarks/gpu_sharing.py --model resnet18 --image-size 128 --batch-size 64 --trials 1 2 4
python3 benchmarks/gpu_sharing.py --model resnet50 --image-size 224 --batch-size 64 --trials 1 2 4
echo "== a trial's training input: the decoded-image cache, PIL in 8 workers, nvJPEG; then ResNet-50 fed from the cache"
python3 benchmarks/input_pipeline.py --device cuda --workers 8 --images 2000 --batch-size 128 --train
