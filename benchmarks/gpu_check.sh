#!/usr/bin/env bash
# The project's GPU check (about 8 minutes of one device run). Prepare it on the development machine with
#   bash ../shared/gpu/prepare.sh /path/to/facebookresearch-DiT      # copies this file to .gpu/check.sh
# then run `bash .gpu/check.sh` on the GPU machine from the project root. Everything it prints also lands in
# $OUT/gpu-check.log; record device, commands and numbers in docs/benchmarks.md. One stage per feature whose
# speed or correctness needs a GPU, each with its own time limit.
set -uo pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
log=${OUT:-.}/gpu-check.log
exec > >(tee "$log") 2>&1
site=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .gpu/whl/*.whl \
  && export PYTHONPATH=$site:$PWD || { echo "wheel install failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
off=(); [ -d .gpu/official ] && off=(--official .gpu/official)
stage() { local s=$1; shift; echo; echo "== $* (limit ${s}s)"; SECONDS=0; timeout "$s" "$@"; echo "== rc $? in ${SECONDS}s"; }
stage 180 python3 -m pytest -q -x -m "gpu and (slow or not slow)" tests/test_gpu.py
stage 150 python3 benchmarks/throughput.py --model DiT-XL/2 --batch-size 64 --device cuda --precision bf16 --compile --steps 20 --warmup 5 "${off[@]}"
stage 90  python3 benchmarks/throughput.py --model DiT-XL/2 --batch-size 64 --device cuda --precision bf16 --steps 20 --warmup 5
stage 60  python3 benchmarks/throughput.py --model DiT-S/2 --batch-size 256 --device cuda --precision bf16 --compile --steps 20 --warmup 5
# Flows: the same network trained by flow matching (no variance half, no vb term), and the flow samplers.
stage 120 python3 benchmarks/throughput.py --model DiT-XL/2 --batch-size 64 --device cuda --precision bf16 --compile --steps 20 --warmup 5 --objective flow
stage 60  python3 -m pytest -q -x tests/test_transport_parity.py tests/test_transport.py
echo; echo "done; log at $log"
