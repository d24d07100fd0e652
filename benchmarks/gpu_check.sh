#!/usr/bin/env bash
# The project's GPU check: one device run whose stage limits add to 480 s, inside the run's 600 s with room for the
# set-up. Prepare it on the development machine with
#   bash ../shared/gpu/prepare.sh /path/to/facebookresearch-DiT   # copies this file to .gpu/check.sh, wheels to .gpu/whl
# then one device run from the project root: command "bash .gpu/check.sh", carry [".gpu"], timeout_s 600.
# Everything it prints also lands in $OUT/gpu-check.log; record device, commands and numbers in docs/benchmarks.md.
#
# Only what a GPU can show, one stage each, under its own limit (seconds; none has run on a GPU yet, so each limit is
# an estimate: about 10 s of Python, CUDA and import start-up per process, plus the work, with some room):
#    60  train.py through DataLoader workers under torchrun (DDP; world = the GPUs, at most 2), EMA, a checkpoint, a
#        resume, and the non-finite guard stopping a diverging run: three short train.py starts
#                                                                              (benchmarks/gpu_stages.py train)
#    30  sample.py in bf16 and in fp32 from that run: two short starts        (benchmarks/gpu_stages.py sample)
#    30  CUDA numerics: bf16 autocast and TF32 against fp32, the flash attention kernel, fused AdamW (the quick tests
#        of tests/test_gpu.py; its compile, FSDP and throughput tests are the stages below)
#    55  peak memory of one training step of DiT-XL/2 at 256 px (batch 32 per GPU), XL/2 at 512 px (32) and
#        LightningDiT-XL/1 on VA-VAE latents (128), with and without activation checkpointing: six steps, one process
#                                                                              (benchmarks/memory_probe.py)
#    70  torch.compile with activation checkpointing: graphs, graph breaks, speed and memory of DiT-XL/2 (the first
#        inductor compile of the run: the longest start-up)
#    40  FSDP against DDP on a flow objective in bf16 (2 GPUs; on 1 GPU both at world size 1, and it says so): two
#        short torchrun starts                                                 (benchmarks/gpu_stages.py parallel)
#    80  MFU of DiT-XL/2 (compiled, bf16) against the official code (fp32) when .gpu/official exists (inductor's
#        cache from the compile stage shortens its compile)
#    20  μP coordinate check at DiT-XL's head width (72): widths 288, 576, 864, 1152 (4-16 heads), depth 2, 5 AdamW
#        steps, sp and mup; the per-width update sizes, the verdict (exit 1 when μP does not hold), the plot
#        $OUT/mup_coordcheck.png: small models, seconds of work            (benchmarks/mup_coordcheck.py, issue 29)
#    45  one isoFLOP point: train.py experiment=isoflop-imagenet256 (μP, DiT-XL/2's blocks at width 288, bf16, batch
#        256) on a synthetic latent cache for train.flops=5e14 (79 steps) and the final eval_loss; images/s, achieved
#        TFLOP/s in the paper's unit and 2x in hardware FLOPs, beside docs/scaling.md's assumed 40% of 989, and the
#        GPU-hours of the experiment's budgets at both                      (benchmarks/gpu_stages.py isoflop, issue 30)
#    25  tokenizers: encode and decode images/s at 256x256, batch 32, fp32 / tf32 / bf16, random weights in the real
#        architectures: SD-VAE (= SDXL-VAE's) and DC-AE f32c32           (benchmarks/latent_cache.py --codecs, issue 31)
#    25  MeanFlow's and improved MeanFlow's (iMF) training step against a flow step, DiT-XL/2 on 4x32x32 latents,
#        batch 32, bf16: forward + JVP + backward                            (benchmarks/onestep_cost.py, issue 31)
# The first seven had 480 s between them before the last four came; they gave up 115 s (train 10, sample 10,
# numerics 10, memory 15, compile 15, parallel 30, MFU 25), judged from what each one runs, not from a GPU run.
#
# Wheels: the image lacks diffusers (models/vae.py, train.py and the tokenizer stage import it); prepare.sh fetches it
# (and hydra-core, omegaconf, torch-fidelity, importlib-metadata, zipp, pyyaml) without being asked, so these stages
# need no EXTRA_WHEELS (leave it unset: EXTRA_WHEELS=""). diffusers' AutoencoderKL and AutoencoderDC import without
# transformers and regex (checked with both blocked); AutoencoderRAE needs transformers, so RAE is not timed.
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
if [ "$dry" = 1 ]; then out=${OUT:-$work}; else out=${OUT:-.}; fi   # the log and the coordinate check's plot
log=$out/gpu-check.log
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
  coord=(--device cpu --base 32 --head 16 --mults 1 2 --steps 5 --strict)   # tests/test_mup.py's widths: μP holds
  codecs=(--device cpu --tiny --image-size 32 --batch-size 2 --warmup 1 --steps 1)
  onestep=(--models DiT-T/2:4x8x8:2 --device cpu --precision fp32 --warmup 1 --repeat 1)
else
  dev=(--device cuda); probe=(--device cuda)
  xl=(--model DiT-XL/2 --batch-size 64 --device cuda --precision bf16)
  short=(--steps 5 --warmup 2); long=(--steps 10 --warmup 3)
  coord=(--device cuda --base 288 --head 72 --mults 1 2 3 4 --steps 5 --strict)
  codecs=(--device cuda --image-size 256 --batch-size 32 --warmup 1 --steps 3)
  onestep=(--models DiT-XL/2:4x32x32:32 --device cuda --precision bf16 --warmup 2 --repeat 5)
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
stage 60  "train.py: DataLoader, DDP, EMA, guard, checkpoint, resume" "$py" benchmarks/gpu_stages.py train --work "$work" "${dev[@]}"
stage 30  "sample.py in bf16 and fp32" "$py" benchmarks/gpu_stages.py sample --work "$work" "${dev[@]}"
stage 30  "CUDA numerics (tests/test_gpu.py; skipped on a CPU)" "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "not compiled and not fsdp and not throughput"
stage 55  "peak memory of one step, with and without activation checkpointing" "$py" benchmarks/memory_probe.py "${probe[@]}"
stage 70  "compile with activation checkpointing: graphs" "$py" benchmarks/throughput.py "${xl[@]}" --compile --grad-checkpoint "${short[@]}"
stage 40  "FSDP against DDP, flow objective" "$py" benchmarks/gpu_stages.py parallel --work "$work" "${dev[@]}"
stage 80  "MFU of DiT-XL/2 against the official code" "$py" benchmarks/throughput.py "${xl[@]}" --compile "${long[@]}" "${off[@]}"
stage 20  "μP coordinate check at DiT-XL width, sp and mup" "$py" -m benchmarks.mup_coordcheck --family dit --depth 2 --out "$out" "${coord[@]}"
stage 45  "one isoFLOP point: throughput of experiment=isoflop-imagenet256" "$py" benchmarks/gpu_stages.py isoflop --work "$work" "${dev[@]}"
stage 25  "tokenizers: encode and decode images/s, fp32, tf32, bf16" "$py" benchmarks/latent_cache.py --codecs "${codecs[@]}"
stage 25  "MeanFlow and iMF step against a flow step" "$py" benchmarks/onestep_cost.py --objectives flow meanflow imf "${onestep[@]}"

echo; echo "limit  rc  time  stage"
printf '%s\n' "${summary[@]}"
echo "stage limits: ${total} s; whole check: ${SECONDS} s; ${failed} stage(s) failed; log at $log"
rm -rf "$work"
[ "$failed" = 0 ]
