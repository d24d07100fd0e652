"""Training throughput and model-FLOPs utilisation (MFU) of a DiT, next to the official implementation.

    python benchmarks/throughput.py --model DiT-S/2 --batch-size 16 --official /path/to/facebookresearch/DiT
    python benchmarks/throughput.py --model DiT-XL/2 --batch-size 256 --device cuda --precision bf16 --compile
    python benchmarks/throughput.py --model DiT-XL/2 --batch-size 256 --device cuda --precision bf16 --objective flow
    python benchmarks/throughput.py --data digits --model DiT-Mini/2 --batch-size 112 --objective flow --profile

One training step is what train.py does: the objective's loss (DDPM: learned sigma, hybrid loss; --objective flow:
flow matching, velocity on the Linear path) + backward + AdamW. Model FLOPs per training image = 3 (forward + backward) x 2 (flops per multiply-accumulate) x the
paper's Gflops; DiT-XL/2 at 256x256 costs 711.7 GFLOP. MFU divides the achieved FLOP/s by the device's peak:
the datasheet dense bf16 / tf32 figure for known GPUs, and a measured large-matmul rate on CPUs.

With --official PATH (a checkout of facebookresearch/DiT) the official models.py + diffusion are timed in
the same process at the same model, batch and input, the way the official train.py runs them (fp32, eager).
Ours runs with train.py's settings: --precision auto resolves as train.py's precision=auto does, the attention
kernel is train.attention=auto's, and AdamW is the fused kernel (optim.fused=true). --data digits times the
digits default's input (8x8 pixels, one channel, 10 classes) instead of SD-VAE latents of ImageNet.

--profile adds where our step's time goes (torch.profiler over a few steps, CPU self times): the matrix products,
the dtype casts (bf16 autocast's copies), and everything else, with the number of aten operations per step and the
ten operations with the largest self times. On a GPU these are the host's times (launch overhead), not the kernels'.
"""

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion import build_objective  # noqa: E402
from models import DiT_models, model_stats  # noqa: E402
from train import train_step  # noqa: E402
from utils.parallel import Trainables, checkpoint_activations, compile_blocks  # noqa: E402
from utils.speed import attention_backend, forward_context, resolve_precision  # noqa: E402

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}
CAST_OPS = {"aten::copy_", "aten::_to_copy"}
TOP_OPS = 10

# Dense peak TFLOP/s (no sparsity) by GPU name fragment: (bf16, tf32).
GPU_PEAKS = {"H200": (989.0, 494.7), "H100": (989.0, 494.7), "A100": (312.0, 156.0)}


def device_peak_tflops(device, precision):
    """Peak FLOP/s for MFU: the datasheet for known GPUs, a measured 4096^3 matmul on CPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, tf32) in GPU_PEAKS.items():
            if key in name:
                return (bf16 if precision == "bf16" else tf32), f"{name} datasheet"
        return None, f"{name} (no peak in the table)"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    a @ b
    start, reps = time.perf_counter(), 3
    for _ in range(reps):
        a @ b
    seconds = (time.perf_counter() - start) / reps
    return 2 * 4096 ** 3 / seconds / 1e12, f"CPU measured {dtype} matmul"


def time_steps(step, steps, warmup, device):
    """Seconds per step after warm-up, and the peak memory (GPU only)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return (time.perf_counter() - start) / steps, peak


def official_loss(diffusion):
    """loss(model, x, y) of the official DiT diffusion (its own t draw, as in its train.py)."""
    def loss(model, x, y):
        t = torch.randint(0, diffusion.num_timesteps, (len(x),), device=x.device)
        return diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
    return loss


def our_step(model, objective, x, y, precision, device, attention=None):
    """A closure running train.py's own training step (train.train_step: the objective's draws and loss, backward,
    the gradient norm) and the fused AdamW update on the fixed batch (x, y), as train.py runs them."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=True)
    trainables = Trainables().add(model.parameters(), opt, model)
    forward = forward_context(precision, device, attention)
    no_repa = torch.zeros(len(x), 0, device=device)

    def step():
        t, noise = objective.draw(None, len(x), x.shape[1:], x.device)
        trainables.zero_grad(1e-4)
        train_step(model, objective, trainables, (x, t, y, noise, no_repa), forward=forward)
        trainables.step()
    return step


def make_step(model, loss_fn, x, y, precision, device, fused, attention=None):
    """A closure running one training step of the official code's `model` on the fixed batch (x, y): the forward in
    bf16 autocast when precision is bf16 and under the forced attention kernel if any (utils.speed.forward_context)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=fused or None)
    forward = forward_context(precision, device, attention)

    def step():
        with forward():
            loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def profile_step(step, steps):
    """Self time per step (ms) of the matrix products, the dtype casts and the rest, the profiler's own total of
    all self times, the wall-clock time per profiled step (which that total can approach but not exceed: one
    thread's self times do not overlap), and aten operations per step."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps * 1e3
    events = prof.key_averages()
    ms = lambda keep: sum(e.self_cpu_time_total for e in events if keep(e.key)) / steps / 1e3
    top = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: e.self_cpu_time_total,
                 reverse=True)[:TOP_OPS]
    return {"matmul": ms(MATMUL_OPS.__contains__), "casts": ms(CAST_OPS.__contains__),
            "other": ms(lambda k: k not in MATMUL_OPS and k not in CAST_OPS),
            "total": events.self_cpu_time_total / steps / 1e3, "wall": wall,
            "ops": sum(e.count for e in events if e.key.startswith("aten::")) / steps,
            "top": [(e.key, e.self_cpu_time_total / steps / 1e3, e.count / steps) for e in top]}


def load_official(path):
    """Import the official models.py and diffusion package from a checkout, under names that do not collide."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location("official_dit_models", path / "models.py")
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    spec = importlib.util.spec_from_file_location("official_dit_diffusion", path / "diffusion" / "__init__.py",
                                                  submodule_search_locations=[str(path / "diffusion")])
    diffusion = importlib.util.module_from_spec(spec)
    sys.modules["official_dit_diffusion"] = diffusion
    spec.loader.exec_module(diffusion)
    return models, diffusion


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--image-size", type=int, default=256, help="pixels; the latent is image-size / 8")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: as train.py's precision=auto (bf16 on GPUs with bf16 and CPUs with AMX or "
                             "AVX512-BF16, else fp32)")
    parser.add_argument("--data", choices=("imagenet", "digits"), default="imagenet",
                        help="imagenet: SD-VAE latents (image-size / 8, 4 channels, 1000 classes); digits: 8x8x1, "
                             "10 classes")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend (aot_eager: traces the same graphs without generating kernels, "
                             "for a quick check of the path)")
    parser.add_argument("--peak", type=float, default=None,
                        help="the device's peak TFLOP/s for MFU (default: the datasheet for known GPUs, a measured "
                             "4096^3 matmul on CPUs)")
    parser.add_argument("--grad-checkpoint", action="store_true", help="recompute block activations in backward")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--objective", choices=("ddpm", "flow"), default="ddpm",
                        help="ours: DDPM (learned sigma, hybrid loss) or flow matching (Linear, velocity)")
    parser.add_argument("--official", default=None, help="path to a facebookresearch/DiT checkout (DDPM)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true",
                        help="also print where our step's CPU time goes (on a GPU: the host side only)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    precision = resolve_precision(args.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # The network's input: SD-VAE latents of ImageNet, or the digits' pixels.
    latent, channels, classes = (args.image_size // 8, 4, 1000) if args.data == "imagenet" else (8, 1, 10)
    build = lambda **kw: DiT_models[args.model](input_size=latent, in_channels=channels, num_classes=classes, **kw)
    gflops = model_stats(build, (channels, latent, latent))["gflops"]
    flops_per_image = 3 * 2 * gflops * 1e9
    peak, peak_source = (args.peak, "--peak") if args.peak else device_peak_tflops(device, precision)

    torch.manual_seed(0)
    x = torch.randn(args.batch_size, channels, latent, latent, device=device)
    y = torch.randint(0, classes, (args.batch_size,), device=device)
    objective = build_objective({"objective": args.objective})
    model = build(learn_sigma=objective.learn_sigma).to(device)
    if args.grad_checkpoint:
        checkpoint_activations(model)
    if args.compile:
        if device.type == "cpu":  # inductor's pool of compile workers competes with the timed steps for the cores
            from torch._inductor import config as inductor_config
            inductor_config.compile_threads = 1
        compile_blocks(model, backend=args.compile_backend)
    rows = []
    ours = our_step(model, objective, x, y, precision, device,
                    attention=attention_backend("auto", device, precision, args.compile))
    options = "+".join([args.objective, precision] + (["compile"] if args.compile else []) +
                       (["ckpt"] if args.grad_checkpoint else []))
    rows.append((f"ours ({options})", *time_steps(ours, args.steps, args.warmup, device)))
    profiled = profile_step(ours, min(args.steps, 5)) if args.profile else None
    del model, ours
    graphs = None
    if args.compile:  # identical blocks share one graph; a graph break or a recompilation shows as more
        from torch._dynamo.utils import counters
        breaks = counters["graph_break"]
        graphs = (f"torch.compile ({args.compile_backend}): {counters['stats']['unique_graphs']} graph(s) from "
                  f"{counters['frames']['ok']} compiled frame(s), {sum(breaks.values())} graph break(s)" +
                  (": " + "; ".join(breaks) if breaks else ""))

    if args.official:
        official_models, official_diffusion = load_official(args.official)
        if args.model not in official_models.DiT_models:
            parser.error(f"--official: the official code has no {args.model}; it has "
                         f"{', '.join(official_models.DiT_models)}")
        model = official_models.DiT_models[args.model](input_size=latent, in_channels=channels,
                                                       num_classes=classes).to(device)
        # The official train.py: fp32, eager, AdamW(lr=1e-4, weight_decay=0), model.train() for label dropout.
        model.train()
        step = make_step(model, official_loss(official_diffusion.create_diffusion(timestep_respacing="")), x, y, "fp32",
                         device, fused=False)
        rows.append(("official (fp32)", *time_steps(step, args.steps, args.warmup, device)))

    shape = (f"{args.image_size}x{args.image_size} (latent {latent}x{latent}x4)" if args.data == "imagenet" else
             f"the digits' {latent}x{latent}x{channels} pixels")
    print(f"{args.model} at {shape}, batch {args.batch_size}, {device}; {gflops:.3f} Gflops/image, "
          f"{flops_per_image / 1e9:.3f} GFLOP per training image")
    print(f"peak: {peak:.1f} TFLOP/s ({peak_source})" if peak else f"peak: unknown ({peak_source})")
    print(f"{'implementation':28s}{'images/s':>10s}{'step ms':>10s}{'MFU':>8s}{'peak mem':>10s}")
    for name, seconds, memory in rows:
        images = args.batch_size / seconds
        mfu = images * flops_per_image / (peak * 1e12) if peak else float("nan")
        mem = f"{memory:.1f} GiB" if memory is not None else "-"
        print(f"{name:28s}{images:>10.1f}{seconds * 1000:>10.0f}{mfu:>8.1%}{mem:>10s}")
    if len(rows) == 2:
        print(f"speed-up over the official implementation: {rows[1][1] / rows[0][1]:.2f}x")
    if graphs:
        print(graphs)
    if profiled:
        print(f"ours, profiled self time per step: {profiled['total']:.1f} ms of {profiled['wall']:.1f} ms wall time "
              f"= matrix products {profiled['matmul']:.1f} + dtype casts {profiled['casts']:.1f} + everything else "
              f"{profiled['other']:.1f} ms; {profiled['ops']:.0f} aten operations per step")
        print(f"the {TOP_OPS} largest self times per step: " + ", ".join(
            f"{key} {ms:.2f} ms ({calls:.0f} calls)" for key, ms, calls in profiled["top"]))


if __name__ == "__main__":
    main()
