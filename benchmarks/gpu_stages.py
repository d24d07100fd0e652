"""The GPU check's stages that run the entry scripts (benchmarks/gpu_check.sh): each starts train.py or sample.py as a
user would (under torchrun where the check is about processes), reads what they wrote, prints what it found and exits
1 if a check failed.

    python benchmarks/gpu_stages.py train --work DIR       # train.py through the DataLoader under torchrun (DDP; world =
                                                           #   the GPUs, at most 2), EMA, a checkpoint, a resume, and a
                                                           #   diverging run that the non-finite guard stops
    python benchmarks/gpu_stages.py parallel --work DIR    # FSDP against DDP on a flow objective in bf16 (2 GPUs; with
                                                           #   one, both at world size 1, and it says so)
    python benchmarks/gpu_stages.py sample --work DIR      # sample.py in bf16 and in fp32 from the train stage's run
    python benchmarks/gpu_stages.py isoflop --work DIR     # one isoFLOP point of experiment=isoflop-imagenet256 (μP,
                                                           #   DiT-XL/2's blocks at width 288) on synthetic latents:
                                                           #   steps, images/s, achieved TFLOP/s, GPU-hours per budget

--device cpu --tiny: the same commands on the CPU (gloo) with a tiny model, batch and step count: the check's dry run.
All runs and the image folder they read live under --work.
"""

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (GPU, --tiny): the network, image size (pixel space: no VAE weights needed), batch, steps per half of the train stage;
# iso_*: the isoflop stage's point (width, extra model overrides, images per latent cache, their resolution, batch,
# budget: 5e14 buys 79 steps of the 8.21-Gflop width-288 model at batch 256; the tiny one 4 steps of a 2-block model).
SIZES = {False: dict(model="DiT-S-2", image_size=32, batch=64, steps=10, workers=4, precision="bf16", samples=64,
                     sample_steps=25, iso_width=288, iso_model=[], iso_images=2048, iso_image_size=256,
                     iso_batch=256, iso_flops=5e14, iso_log_every=10, iso_eval_images=256),
         True: dict(model="DiT-T-8", image_size=16, batch=4, steps=2, workers=1, precision="fp32", samples=2,
                    sample_steps=2, iso_width=72, iso_model=["+model.kwargs.depth=2"], iso_images=8, iso_image_size=32,
                    iso_batch=4, iso_flops=3e7, iso_log_every=1, iso_eval_images=4)}
# docs/scaling.md "At scale" (and conf/experiment/isoflop-imagenet256.yaml) turn budgets into GPU-hours at this share
# of an H100's dense bf16 peak (benchmarks/throughput.py GPU_PEAKS) in hardware FLOPs (2x the paper's unit).
ASSUMED_MFU, ASSUMED_GPU = 0.40, "H100"


def run(args, expect=0, **kwargs):
    """Run a repository command with this interpreter; print its command line and wall time, and the end of its
    output when its exit code is not the `expect`ed one."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, **kwargs)
    shown = " ".join(a for a in args if not a.startswith(("run_dir=", "data.path=", "ckpt=", "out=")))
    print(f"$ {shown}\n  -> rc {result.returncode} in {time.perf_counter() - start:.1f} s", flush=True)
    if result.returncode != expect:
        print((result.stdout[-1500:] + "\n" + result.stderr[-2500:]).strip(), flush=True)
    return result


def torchrun(nproc, script, *overrides, expect=0):
    return run(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *overrides],
               expect=expect, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")})


def image_folder(work, size):
    """A small ImageNet-layout folder (4 classes x 16 random RGB images, larger than `size` so the crop resizes)."""
    from PIL import Image
    root = work / "images"
    if not root.is_dir():
        rng = np.random.default_rng(0)
        for c in range(4):
            (root / f"class{c}").mkdir(parents=True)
            for i in range(16):
                Image.fromarray(rng.integers(0, 256, (size + 8, size + 12, 3), dtype=np.uint8)).save(
                    root / f"class{c}" / f"{i}.png")
    return root


def common(work, size, device):
    return [f"model={size['model']}", "data=imagefolder", f"data.path={image_folder(work, size['image_size'])}",
            f"data.image_size={size['image_size']}", f"data.num_workers={size['workers']}", "vae=none",
            f"device={device}", "logger=none", f"train.batch_size={size['batch']}", "train.log_every=1",
            f"sample.steps={size['sample_steps']}", "sample.per_class=1", "fid.at_end=false", "optim.warmup_steps=0"]


def world(device):
    import torch
    return max(1, min(2, torch.cuda.device_count())) if device == "cuda" else 1


class Checks:
    """Named pass/fail lines; the stage's exit code."""

    def __init__(self):
        self.failed = []

    def __call__(self, name, ok, detail=""):
        print(f"  [{'ok' if ok else 'FAILED'}] {name}" + (f": {detail}" if detail else ""), flush=True)
        if not ok:
            self.failed.append(name)

    def exit(self):
        print(f"{len(self.failed)} check(s) failed: {', '.join(self.failed)}" if self.failed else "all checks passed")
        sys.exit(1 if self.failed else 0)


def losses(run_dir):
    from utils.logger import read_metrics
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r}


def stage_train(work, size, device, check):
    """DataLoader workers feeding DDP (world 1 on one GPU), EMA, checkpoint at the half, a resume to the end, and
    the guard stopping a diverging run before its update."""
    from utils.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
    from utils.guard import first_nonfinite_tensor
    from utils.logger import read_metrics

    n, half, run_dir = world(device), size["steps"], work / "train"
    base = [*common(work, size, device), "diffusion=flow", f"precision={size['precision']}", "ema.decay=0.9",
            f"train.ckpt_every={half}", f"run_dir={run_dir}"]
    print(f"train.py under torchrun, {n} process(es), {size['model']} on {size['image_size']} px images through "
          f"{size['workers']} DataLoader worker(s), batch {size['batch']}, {size['precision']}")
    first = torchrun(n, "train.py", *base, f"train.steps={half}")
    check("first half trains and checkpoints", first.returncode == 0 and latest_checkpoint(run_dir / "checkpoints")
          is not None)
    second = torchrun(n, "train.py", *base, f"train.steps={2 * half}")
    resumed = f"starting at step {half}" in second.stdout
    check("the same command with more steps resumes", second.returncode == 0 and resumed,
          "" if resumed else f"no 'starting at step {half}' in its output")
    if second.returncode == 0:
        ckpt = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
        rows = losses(run_dir)
        gap = max((ckpt["ema"][k].float() - ckpt["model"][k].float()).abs().max().item() for k in ckpt["model"])
        check("final checkpoint at the last step, finite", ckpt["step"] == 2 * half and
              first_nonfinite_tensor({k: ckpt[k] for k in ("model", "ema", "opt")}) is None, f"step {ckpt['step']}")
        check("EMA tracks the weights without equalling them", 0 < gap < math.inf, f"max |ema - model| {gap:.3g}")
        check("a loss row for every step", sorted(rows) == list(range(1, 2 * half + 1)),
              " ".join(f"{rows[s]:.4f}" for s in sorted(rows)))
        timing = [r for r in read_metrics(run_dir / "metrics.jsonl") if "images_per_sec" in r]
        if timing:
            print(f"  last logged speed: {timing[-1]['images_per_sec']:.0f} images/s, step {timing[-1]['step_time']:.3f} s")
    # The guard: lr 1e6 makes the loss non-finite within a few steps; two such steps are skipped, the third stops the
    # run (exit 2, a message, no traceback) before any update, and every checkpoint it left is finite.
    # Alone, the guard's agreement is local; with 2 GPUs both ranks agree through NCCL, so run it as the training ran.
    diverge = work / "diverge"
    overrides = [*common(work, size, device), "diffusion=flow", f"precision={size['precision']}", "optim.lr=1e6",
                 "train.skip_nonfinite=2", "train.steps=30", "train.ckpt_every=2", "train.keep_last=2",
                 f"run_dir={diverge}"]
    bad = torchrun(n, "train.py", *overrides, expect=1) if n > 1 else run(["train.py", *overrides], expect=2)
    skipped = [r for r in read_metrics(diverge / "metrics.jsonl") if r.get("skipped")] \
        if (diverge / "metrics.jsonl").exists() else []
    kept = list_checkpoints(diverge / "checkpoints")
    finite = all(first_nonfinite_tensor({k: v for k, v in load_checkpoint(p).items() if k in ("model", "ema", "opt")})
                 is None for p in kept)
    # Alone: exit 2 and one message, no traceback. Under torchrun the agent reports the ranks' exit with its own.
    stopped = bad.returncode == 2 and "Traceback" not in bad.stderr if n == 1 else bad.returncode != 0
    check("the guard skips 2 non-finite steps, then stops the run with a message",
          stopped and "is not finite" in bad.stderr and len(skipped) == 2,
          f"rc {bad.returncode}, {len(skipped)} skipped step(s) logged")
    check("no checkpoint with NaN or inf", finite, f"{len(kept)} kept")


def stage_parallel(work, size, device, check):
    """FSDP (bf16 parameters, fp32 reductions) against DDP (fp32 parameters, bf16 autocast) on a flow objective, the
    same data, noise and initial weights: the loss curves and final weights side by side."""
    n = world(device)
    if device == "cuda" and n < 2:
        print("one GPU: FSDP and DDP run at world size 1 (FSDP's bf16 parameters and input casts against DDP's "
              "autocast; no sharding, no all-gather or reduce-scatter: those need 2 GPUs)")
    steps = 2 * size["steps"]
    runs = {}
    for parallel in ("ddp", "fsdp"):
        run_dir = work / f"parallel-{parallel}"
        result = torchrun(n, "train.py", *common(work, size, device), "diffusion=flow", "precision=bf16",
                          f"train.parallel={parallel}", f"train.steps={steps}", f"train.ckpt_every={steps}",
                          f"run_dir={run_dir}")
        check(f"{parallel} at world size {n} trains", result.returncode == 0)
        runs[parallel] = run_dir
    if all((d / "metrics.jsonl").exists() for d in runs.values()):
        from utils.checkpoint import latest_checkpoint, load_checkpoint
        ddp, fsdp = losses(runs["ddp"]), losses(runs["fsdp"])
        rel = [abs(fsdp[s] - ddp[s]) / abs(ddp[s]) for s in sorted(ddp) if s in fsdp]
        print("  step  ddp loss  fsdp loss")
        for s in sorted(ddp):
            print(f"  {s:4d}  {ddp[s]:.5f}  {fsdp.get(s, float('nan')):.5f}")
        a, b = (load_checkpoint(latest_checkpoint(d / "checkpoints"))["model"] for d in (runs["ddp"], runs["fsdp"]))
        norm = lambda tensors: math.sqrt(sum(float(t.float().square().sum()) for t in tensors))
        drift = norm(a[k] - b[k] for k in a) / norm(a.values())   # all weights at once (zero-initialised layers
                                                                  # make a per-tensor ratio meaningless)
        check("the same steps logged, all finite", len(rel) == len(ddp) == len(fsdp) == steps and
              all(math.isfinite(v) for v in [*ddp.values(), *fsdp.values()]))
        check("losses agree within bf16 training noise (5%)", bool(rel) and max(rel) <= 0.05,
              f"max relative loss difference {max(rel, default=math.nan):.2%}, mean {np.mean(rel):.2%}; final "
              f"weights: |fsdp - ddp| / |ddp| = {drift:.2e}")


def stage_sample(work, size, device, check):
    """sample.py from the train stage's checkpoint, bf16 autocast against fp32: both write ADM's npz; their time and
    how far apart the images land (same noise, same labels)."""
    run_dir = work / "train"
    if not (run_dir / "checkpoints").is_dir():
        check("the train stage's run exists", False, f"no {run_dir}/checkpoints: the train stage did not run or failed")
        return
    out = {}
    for precision in ("bf16", "fp32"):
        out[precision] = work / f"samples-{precision}"
        result = run(["sample.py", f"ckpt={run_dir}", f"precision={precision}", f"device={device}",
                      f"num_samples={size['samples']}", f"batch_size={size['samples']}",
                      f"steps={size['sample_steps']}", f"out={out[precision]}"])
        check(f"sample.py precision={precision}", result.returncode == 0 and (out[precision] / "samples.npz").exists())
    if all((o / "samples.npz").exists() for o in out.values()):
        low, full = (np.load(o / "samples.npz") for o in (out["bf16"], out["fp32"]))
        s = size["image_size"]
        check("ADM format: uint8 (N, H, W, 3) and int64 labels, the same labels",
              low["arr_0"].shape == full["arr_0"].shape == (size["samples"], s, s, 3) and low["arr_0"].dtype == np.uint8
              and np.array_equal(low["arr_1"], full["arr_1"]))
        diff = np.abs(low["arr_0"].astype(int) - full["arr_0"].astype(int))
        print(f"  bf16 against fp32: mean |difference| {diff.mean():.2f} of 255 levels, {np.mean(diff > 8):.1%} of "
              f"pixels more than 8 levels apart")


def synthetic_latents(root, num_images, image_size, vae_id, scaling_factor, classes=10):
    """A complete latent cache of random posteriors, as extract_latents.py would write for `vae_id` (SD-VAE: 4
    channels, 8x down): means N(0, 1) / scaling_factor (unit variance once scaled), log-variances -6, labels cycling
    over `classes`. Data for speed only: the GPU machine has no ImageNet and no VAE weights."""
    from data.latents import ShardWriter, make_manifest, write_labels, write_manifest
    root.mkdir(parents=True, exist_ok=True)
    latent = image_size // 8
    manifest = make_manifest(vae=vae_id, scaling_factor=scaling_factor, image_size=image_size, latent_channels=4,
                             latent_size=latent, num_images=num_images, classes=[f"class{c}" for c in range(classes)],
                             shard_size=num_images, dtype="float16", source="synthetic (benchmarks/gpu_stages.py)")
    rng = np.random.default_rng(0)
    moments = np.concatenate([rng.standard_normal((num_images, 2, 4, latent, latent)) / scaling_factor,
                              np.full((num_images, 2, 4, latent, latent), -6.0)], axis=2).astype(np.float16)
    writer = ShardWriter(root, 0, num_images, moments.shape[1:], "float16")
    writer.write(moments)
    writer.commit()
    write_labels(root, np.arange(num_images) % classes)
    write_manifest(root, {**manifest, "complete": True})
    return root


def stage_isoflop(work, size, device, check):
    """One point of experiment=isoflop-imagenet256 as its sweep would run it (μP, DiT-XL/2's blocks at a narrow width,
    bf16, batch 256, the flow objective, a train.flops budget, the final evaluation loss), on a synthetic latent cache
    (random posteriors under SD-VAE's name; a small random AutoencoderKL stands in for SD-VAE to decode the final
    grid): the throughput that turns the experiment's budgets into GPU-hours, beside the one docs/scaling.md assumes."""
    import torch
    from diffusers import AutoencoderKL
    from omegaconf import OmegaConf
    from benchmarks.throughput import GPU_PEAKS
    from utils.logger import read_metrics

    sd_vae = OmegaConf.load(ROOT / "conf" / "vae" / "sd-vae-ft-ema.yaml")   # the experiment's tokenizer
    experiment = OmegaConf.load(ROOT / "conf" / "experiment" / "isoflop-imagenet256.yaml")
    budgets = [float(v) for v in str(experiment.hydra.sweeper.params["train.flops"]).split(",")]
    scaling = 0.18215
    cache = synthetic_latents(work / "iso-latents", size["iso_images"], size["iso_image_size"], sd_vae.id, scaling)
    vae_dir = work / "iso-vae"
    if not (vae_dir / "config.json").exists():
        torch.manual_seed(0)
        AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=4,
                      scaling_factor=scaling).save_pretrained(vae_dir)
    run_dir, width, batch = work / "isoflop", size["iso_width"], size["iso_batch"]
    result = run(["train.py", "experiment=isoflop-imagenet256", f"model.width={width}", *size["iso_model"],
                  f"data.path={cache}", f"data.image_size={size['iso_image_size']}", f"eval.path={cache}",
                  f"eval.num_images={size['iso_eval_images']}", f"vae.path={vae_dir}", f"train.flops={size['iso_flops']}",
                  f"train.batch_size={batch}", f"train.log_every={size['iso_log_every']}", f"device={device}",
                  f"precision={size['precision']}", f"data.num_workers={size['workers']}", "logger=none",
                  "sample.steps=2", "sample.per_class=1", f"run_dir={run_dir}"])
    rows = read_metrics(run_dir / "metrics.jsonl")
    windows = [r for r in rows if "step_time" in r]
    evals = [r for r in rows if "eval_loss" in r]
    check("train.py runs experiment=isoflop-imagenet256 to its budget", result.returncode == 0 and bool(windows))
    if not windows:
        return
    gflops, steps = windows[-1]["gflops"], windows[-1]["step"]
    expected = round(size["iso_flops"] / (3 * gflops * 1e9 * batch))
    check("the budget bought the steps train.flops says", steps == expected,
          f"{steps} steps (train.flops {size['iso_flops']:.3g} / (3 x {gflops:.3f} Gflops x 1e9 x batch {batch}) = "
          f"{expected})")
    # Throughput over the windows after the first (it holds the start-up: cuBLAS handles, kernels' first calls).
    timed = windows[1:] or windows
    counts = [r["step"] - p["step"] for p, r in zip(windows, windows[1:])] if len(windows) > 1 else [windows[0]["step"]]
    seconds = sum(r["step_time"] * n for r, n in zip(timed, counts))
    step_time = seconds / sum(counts)
    paper = 3 * gflops * 1e9 * batch / step_time / 1e12            # TFLOP/s in the DiT paper's unit (multiply-adds)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    peak = next((bf16 for key, (bf16, _) in GPU_PEAKS.items() if key in name), None)
    assumed = ASSUMED_MFU * GPU_PEAKS[ASSUMED_GPU][0] / 2          # the same in the paper's unit
    print(f"isoFLOP point: DiT-XL/2's blocks at width {width} (μP, base width {experiment.model.base_width}), "
          f"{gflops:.3f} Gflops per image, "
          f"batch {batch}, {size['precision']}, budget {size['iso_flops']:.3g} -> {steps} steps, on {name}")
    print(f"  images/s: {batch / step_time:.1f} (step {step_time * 1000:.1f} ms, mean of steps "
          f"{windows[0]['step'] + 1 if len(windows) > 1 else 1}-{steps}: the first window is warm-up)")
    print(f"  achieved: {paper:.1f} TFLOP/s in the DiT paper's unit (3 x Gflops x batch x steps / time); hardware "
          f"{2 * paper:.1f} TFLOP/s" + (f" = {2 * paper / peak:.1%} of the {peak:.0f} TFLOP/s bf16 peak" if peak else ""))
    print(f"  assumed by docs/scaling.md \"At scale\": {assumed:.1f} TFLOP/s in the paper's unit (hardware "
          f"{2 * assumed:.1f} = {ASSUMED_MFU:.0%} of an {ASSUMED_GPU}'s {GPU_PEAKS[ASSUMED_GPU][0]:.0f}): measured / "
          f"assumed = {paper / assumed:.2f}")
    if evals:
        print(f"  final eval_loss {evals[-1]['eval_loss']:.4f} (EMA {evals[-1].get('eval_loss_ema', math.nan):.4f}) at "
              f"step {evals[-1]['step']}: random latents, so a check that it is finite, not a quality")
    check("a finite final eval_loss", bool(evals) and math.isfinite(evals[-1]["eval_loss"]))
    print(f"  GPU-hours per run of experiment=isoflop-imagenet256 at this throughput / as assumed (training only, "
          f"at width {width}'s utilisation: wider models may reach a higher one):")
    for budget in budgets:
        print(f"    {budget:.0e}: {budget / (paper * 1e12) / 3600:9.3g} / {budget / (assumed * 1e12) / 3600:.3g}")


STAGES = {"train": stage_train, "parallel": stage_parallel, "sample": stage_sample, "isoflop": stage_isoflop}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--work", required=True, help="folder for the runs and the image folder (shared by stages)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny model, batch and steps (the CPU dry run)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    check = Checks()
    STAGES[args.stage](work, SIZES[args.tiny], args.device, check)
    check.exit()


if __name__ == "__main__":
    main()
