"""REPA's cost per training step, DiT-S/2 at 256x256: the encoder in the loop against its features stored in the cache.

    python benchmarks/repa_features.py            # CPU: batch 2, 4 steps, 8 images; a few minutes on 2 cores
    python benchmarks/repa_features.py --device cuda --batch-size 64 --steps 30 --images 256 --precision bf16

Four train.py runs on the same images, each timed by the loop itself (metrics.jsonl step_time, the mean over the
steps after the first `--warmup` ones):
    fly            images, VAE encoding on the fly, no REPA
    fly+repa       images, VAE on the fly, REPA with DINOv2-B run on every batch
    cache          a latent cache made by extract_latents.py, no REPA
    cache+repa     the same cache made with repa.encoder=dinov2-vit-b: stored features, no encoder in the step
so the encoder's cost is fly+repa - fly and what REPA costs without it is cache+repa - cache (the projector and the
loss). The VAE is the real SD-VAE architecture and DINOv2-B the real ViT-B/14, both with random weights written to
a temporary folder (their speed is that of the real ones; nothing is downloaded).
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from latent_cache import SD_VAE_CONFIG  # noqa: E402
from utils.logger import read_metrics  # noqa: E402


def write_inputs(folder, images):
    """Random 256x256 JPEGs in two classes, the SD-VAE (random) and DINOv2-B (random) weights."""
    from diffusers import AutoencoderKL
    import timm
    rng = np.random.default_rng(0)
    for i in range(images):
        (folder / "images" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / "images" / f"c{i % 2}" / f"{i}.jpg")
    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(folder / "vae")
    torch.save(timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=224, num_classes=0).state_dict(),
               folder / "dinov2_vitb14.pth")


def run(args, script, overrides):
    start = time.perf_counter()
    subprocess.run([sys.executable, script, *overrides], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def step_seconds(run_dir, warmup):
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    times = [r["step_time"] for r in rows if "step_time" in r and r["step"] > warmup]
    return float(np.mean(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="steps left out of the mean")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_inputs(tmp, args.images)
        weights = tmp / "dinov2_vitb14.pth"
        common_extract = [f"data.path={tmp / 'images'}", "data.image_size=256", "data.num_workers=0", "vae=local",
                          f"vae.path={tmp / 'vae'}", f"device={args.device}", "batch_size=4"]
        extract = {"cache": run(args, "extract_latents.py", [*common_extract, f"out={tmp / 'cache'}"]),
                   "cache+repa": run(args, "extract_latents.py", [*common_extract, f"out={tmp / 'cache_repa'}",
                                                                  "repa.encoder=dinov2-vit-b", f"repa.weights={weights}"])}
        repa = ["repa.encoder=dinov2-vit-b", "repa.depth=8", f"repa.weights={weights}"]
        train = ["model=DiT-S-2", "logger=none", f"device={args.device}", f"precision={args.precision}",
                 f"train.batch_size={args.batch_size}", f"train.steps={args.steps}", "train.log_every=1",
                 f"train.ckpt_every={args.steps}", "sample.per_class=1", "sample.steps=2", "fid.at_end=false",
                 "data.image_size=256", "vae=local", f"vae.path={tmp / 'vae'}", "data.num_workers=0"]
        fly = ["data=imagenet", f"data.path={tmp / 'images'}"]
        runs = {"fly": [*fly], "fly+repa": [*fly, *repa], "cache": ["data=latents", f"data.path={tmp / 'cache'}"],
                "cache+repa": ["data=latents", f"data.path={tmp / 'cache_repa'}", *repa]}
        results = {}
        for name, overrides in runs.items():
            run(args, "train.py", [*train, *overrides, f"run_dir={tmp / 'runs' / name}"])
            results[name] = step_seconds(tmp / "runs" / name, args.warmup)
    print(f"DiT-S/2 at 256x256, batch {args.batch_size}, {args.precision} on {args.device} "
          f"({torch.get_num_threads()} threads); seconds per training step (mean of steps {args.warmup + 1}..{args.steps}):")
    for name, seconds in results.items():
        print(f"  {name:12s} {seconds:8.3f} s/step  {args.batch_size / seconds:7.2f} img/s")
    print(f"  the encoder in the step: +{results['fly+repa'] - results['fly']:.3f} s/step; REPA from stored features: "
          f"+{results['cache+repa'] - results['cache']:.3f} s/step over the cache without REPA")
    print(f"  extraction of {args.images} images: {extract['cache']:.1f} s latents only, {extract['cache+repa']:.1f} s "
          f"with DINOv2-B features (one-off, including start-up)")


if __name__ == "__main__":
    main()
