#!/usr/bin/env bash
# The project's GPU check: one device run whose stage limits add to 480 s, inside the run's 600 s with room for the
# set-up. Prepare it on the development machine with
#   bash ../shared/gpu/prepare.sh /path/to/facebookresearch-DiT   # copies this file to .gpu/check.sh, wheels to .gpu/whl
# then one device run from the project root: command "bash .gpu/check.sh", carry [".gpu"], timeout_s 600.
# Everything it prints also lands in $OUT/gpu-check.log; record device, commands and numbers in docs/benchmarks.md.
#
# Only what a GPU can show, one stage each, under its own limit (seconds):
#    70  train.py through DataLoader workers under torchrun (DDP; world = the GPUs, at most 2), EMA, a checkpoint, a
#        resume, and the non-finite guard stopping a diverging run             (benchmarks/gpu_stages.py train)
#    40  sample.py in bf16 and in fp32 from that run                           (benchmarks/gpu_stages.py sample)
#    40  CUDA numerics: bf16 autocast and TF32 against fp32, the flash attention kernel, fused AdamW (the quick tests
#        of tests/test_gpu.py; its compile, FSDP and throughput tests are the stages below)
#    70  peak memory of one training step of DiT-XL/2 at 256 px (batch 32 per GPU), XL/2 at 512 px (32) and
#        LightningDiT-XL/1 on VA-VAE latents (128), with and without activation checkpointing
#                                                                              (benchmarks/memory_probe.py)
#    85  torch.compile with activation checkpointing: graphs, graph breaks, speed and memory of DiT-XL/2
#    70  FSDP against DDP on a flow objective in bf16 (2 GPUs; on 1 GPU both at world size 1, and it says so)
#   105  MFU of DiT-XL/2 (compiled, bf16) against the official code (fp32) when .gpu/official exists
#
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # every stage on the CPU with tiny sizes, no nvidia-smi, no wheels
#                                                # installed (tests/test_gpu_check.py), so a typo costs no GPU minutes
# Exits 1 when a stage failed; the summary at the end lists every stage's rc and time.
set -uo pipefail
dry=0
case "${1:-}" in
  --cpu-dry-run) dry=1 ;;
  "") ;;
  *) echo "usage: bash $0 [--cpu-dry-run]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."                        # the project root, from benchmarks/ or from .gpu/
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
work=$(mktemp -d)
if [ "$dry" = 1 ]; then log=${OUT:-$work}/gpu-check.log; else log=${OUT:-.}/gpu-check.log; fi
exec > >(tee "$log") 2>&1

# Wheels: prepare.sh fetches them for one Python version; install those this Python can use, say which it cannot.
usable=()
if ls .gpu/whl/*.whl >/dev/null 2>&1; then
  while read -r verdict wheel reason; do
    if [ "$verdict" = ok ]; then usable+=("$wheel"); else echo "wheel $wheel skipped: $reason"; fi
  done < <("$py" - .gpu/whl/*.whl <<'EOF'
import sys
here = sys.version_info[:2]

def fits(tag, abi):  # py3 / py3XX, or CPython's own tag (abi3: this version or older)
    if tag in ("py3", f"py{here[0]}{here[1]}"):
        return True
    if tag.startswith("cp") and tag[2:].isdigit():
        version = (int(tag[2]), int(tag[3:]))
        return version == here or (abi == "abi3" and version <= here)
    return False

for path in sys.argv[1:]:
    python, abi = path[:-len(".whl")].rsplit("/", 1)[-1].split("-")[-3:-1]
    ok = any(fits(tag, abi) for tag in python.split("."))
    print("ok", path) if ok else print("skip", path, f"built for {python}-{abi}, this Python is {here[0]}.{here[1]}")
EOF
)
  if [ "${#usable[@]}" -lt "$(ls .gpu/whl/*.whl | wc -l)" ]; then
    echo "some wheels do not fit this Python: going on without them (stages that import them fail); prepare.sh's"
    echo "--python-version must be this image's"
  fi
else
  echo "no .gpu/whl: going on with the installed packages only (bash ../shared/gpu/prepare.sh writes it)"
fi
export PYTHONPATH=$PWD
if [ "$dry" = 1 ]; then
  echo "CPU dry run: every stage with tiny sizes on device=cpu; ${#usable[@]} wheel(s) would be installed"
  "$py" -c "import platform, torch; print('torch', torch.__version__, 'on', platform.machine(), torch.get_num_threads(), 'threads')"
else
  site=$(mktemp -d)
  if [ "${#usable[@]}" -gt 0 ]; then
    if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${usable[@]}"; then
      export PYTHONPATH=$site:$PWD
    else
      echo "wheel install failed: going on with the image's packages only (stages that need them fail)"
    fi
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'x', torch.cuda.device_count())"
fi

# Sizes: the GPU's, or tiny ones on the CPU (aot_eager traces the graphs inductor would compile, without kernels).
if [ "$dry" = 1 ]; then
  dev=(--device cpu --tiny); probe=(--device cpu --tiny --precision fp32)
  xl=(--model DiT-T/2 --image-size 32 --batch-size 2 --device cpu --precision fp32 --peak 1 --compile-backend aot_eager)
  short=(--steps 1 --warmup 1); long=(--steps 1 --warmup 1)
else
  dev=(--device cuda); probe=(--device cuda)
  xl=(--model DiT-XL/2 --batch-size 64 --device cuda --precision bf16)
  short=(--steps 5 --warmup 2); long=(--steps 10 --warmup 3)
fi
off=()
if [ -d .gpu/official ]; then off=(--official .gpu/official); else echo "no .gpu/official: the MFU stage times ours only"; fi

summary=(); failed=0; total=0
stage() {  # stage LIMIT NAME COMMAND...: one stage under its own limit (the dry run allows 300 s: a CPU is slower)
  local limit=$1 name=$2; shift 2
  local allowed=$limit start=$SECONDS rc
  [ "$dry" = 1 ] && allowed=300
  echo; echo "== $name (limit ${limit}s): $*"
  timeout "$allowed" "$@"; rc=$?
  echo "== rc $rc in $((SECONDS - start))s"
  summary+=("$(printf '%4s s  rc %3s  %4s s  %s' "$limit" "$rc" "$((SECONDS - start))" "$name")")
  total=$((total + limit))
  [ "$rc" = 0 ] || failed=$((failed + 1))
}
stage 70  "train.py: DataLoader, DDP, EMA, guard, checkpoint, resume" "$py" benchmarks/gpu_stages.py train --work "$work" "${dev[@]}"
stage 40  "sample.py in bf16 and fp32" "$py" benchmarks/gpu_stages.py sample --work "$work" "${dev[@]}"
stage 40  "CUDA numerics (tests/test_gpu.py; skipped on a CPU)" "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "not compiled and not fsdp and not throughput"
stage 70  "peak memory of one step, with and without activation checkpointing" "$py" benchmarks/memory_probe.py "${probe[@]}"
stage 85  "compile with activation checkpointing: graphs" "$py" benchmarks/throughput.py "${xl[@]}" --compile --grad-checkpoint "${short[@]}"
stage 70  "FSDP against DDP, flow objective" "$py" benchmarks/gpu_stages.py parallel --work "$work" "${dev[@]}"
stage 105 "MFU of DiT-XL/2 against the official code" "$py" benchmarks/throughput.py "${xl[@]}" --compile "${long[@]}" "${off[@]}"

echo; echo "limit  rc  time  stage"
printf '%s\n' "${summary[@]}"
echo "stage limits: ${total} s; whole check: ${SECONDS} s; ${failed} stage(s) failed; log at $log"
rm -rf "$work"
[ "$failed" = 0 ]
