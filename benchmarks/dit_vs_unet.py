"""Training throughput and Gflops of DiT / U-Net pairs matched in Gflops, side by side.

    python benchmarks/dit_vs_unet.py       # the S pair at batch 8 on CPU, fp32: about a minute on 2 cores
    python benchmarks/dit_vs_unet.py --pairs S B L XL --device cuda --batch-size 64 --precision bf16 \
        --steps 20 --warmup 5

One training step is what train.py does per batch: the diffusion loss (MSE + vb, learned sigma) on random
latents, backward, and an AdamW step. Images/s counts the timed steps only, after warm-up steps; on CUDA the
clock waits for the device. Gflops are forward multiply-accumulates per image (models.model_stats), the DiT
paper's convention, so training compute per image is about 3x that.
"""

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from diffusion import create_diffusion  # noqa: E402
from models import MODELS, model_stats  # noqa: E402
from models.unet import DIT_MATCH  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(name, args, device):
    """Images/s of forward + backward + AdamW step for model `name`, and its peak CUDA memory in GiB."""
    torch.manual_seed(0)
    model = MODELS[name](input_size=args.input_size, in_channels=args.in_channels, num_classes=args.num_classes)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    diffusion = create_diffusion(timestep_respacing="")
    dtype = PRECISIONS[args.precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    b = args.batch_size
    x = torch.randn(b, args.in_channels, args.input_size, args.input_size, device=device)
    y = torch.randint(args.num_classes, (b,), device=device)

    def step():
        t = torch.randint(diffusion.num_timesteps, (b,), device=device)
        with autocast:
            loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model, opt
    return b * args.steps / seconds, memory


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["S"], choices=list(DIT_MATCH),
                        help="sizes to compare: UNet-<size> against the DiT matched to it")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="autocast dtype")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per model (more on a GPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (more on a GPU)")
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256x256 images)")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU, {torch.get_num_threads()} threads"
    shape = (args.in_channels, args.input_size, args.input_size)
    print(f"{where}; batch {args.batch_size}, {args.precision}, input {'x'.join(map(str, shape))}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'model':<10s}{'params':>10s}{'Gflops':>9s}{'train img/s':>13s}{'peak GiB':>10s}{'U-Net/DiT':>11s}")

    results = []
    for size in args.pairs:
        row = {}
        for name in (DIT_MATCH[size], f"UNet-{size}"):
            stats = model_stats(lambda: MODELS[name](input_size=args.input_size, in_channels=args.in_channels,
                                                     num_classes=args.num_classes), shape)
            images_per_second, memory = train_throughput(name, args, device)
            row[name] = dict(params=stats["params"], gflops=stats["gflops"], images_per_second=images_per_second,
                             peak_memory_gib=memory)
        dit, unet = row.values()
        for name, r in row.items():
            ratio = f"{unet['images_per_second'] / dit['images_per_second']:.2f}x" if r is unet else ""
            memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
            gflops = f"{r['gflops']:.2f}" if r["gflops"] >= 1 else f"{r['gflops']:.3f}"
            print(f"{name:<10s}{r['params'] / 1e6:>9.1f}M{gflops:>9s}{r['images_per_second']:>13.1f}"
                  f"{memory:>10s}{ratio:>11s}")
        results.append(dict(size=size, **row))
    if args.json:
        print(json.dumps(dict(device=where, batch_size=args.batch_size, precision=args.precision,
                              input_shape=shape, pairs=results)))


if __name__ == "__main__":
    main()
