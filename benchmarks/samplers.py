"""Samples/s and quality of each sampler on one trained model, DDPM, flow or one-step.

DDPM models: DDPM-250, DDIM-50/25 and DPM-Solver++ at 10-25 steps. Flow models: the ODE (Euler, Heun, dopri5) and
the SDE (Euler-Maruyama, Heun) at 10-250 steps. MeanFlow / iMF and shortcut models: their own samplers at 1, 2, 4
and 8 steps (one network evaluation per step; docs/onestep.md). A sampler is NAME[-METHOD]:STEPS, e.g. ode-heun:25, sde:250,
sde-heun:50, dpm-solver++:20.

    python train.py run_dir=runs/digits/DiT-Mini-2                       # the default digits run (~5 min)
    python benchmarks/samplers.py --run runs/digits/DiT-Mini-2           # then time and judge every sampler
    python benchmarks/samplers.py --run runs/digits/DiT-Mini-2 --cfg-scale 1.5
    python benchmarks/samplers.py --run DiT-XL-2-256x256.pt --device cuda --precision bf16 --num-samples 256

Every sampler starts from the same noise and labels (100 per class by default) with the EMA weights. The time
is the whole sampling loop (network, guidance, solver) after a warm-up batch, decoding excluded. The network
evaluations per sample are counted, not assumed (adaptive dopri5 chooses its own). For a digits
model each sampler's samples are judged as in benchmarks/digits_quality.py (share judged as their class by a
classifier trained on real digits, Frechet distance in pixels); for other models only the speed is reported.
Writes a table (samplers.json), a grid per sampler and a quality-vs-speed plot (samplers.png) next to them.
"""

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from diffusion.objectives import objective_name  # noqa: E402
from diffusion.sampling import sample  # noqa: E402
from digits_quality import judge  # noqa: E402
from sample import load_sampling_model  # noqa: E402
from utils.checkpoint import resolve_checkpoint  # noqa: E402
from utils.images import save_grid, to_uint8  # noqa: E402

DEFAULT_SAMPLERS = {
    "ddpm": ("ddpm:250", "ddim:50", "ddim:25", "dpm-solver++:25", "dpm-solver++:20", "dpm-solver++:15",
             "dpm-solver++:10"),
    "flow": ("sde:250", "sde:100", "sde:50", "sde-heun:50", "ode-dopri5:50", "ode-heun:50", "ode-heun:25",
             "ode-heun:10", "ode-euler:100", "ode-euler:50", "ode-euler:25", "ode-euler:10"),
    "meanflow": ("meanflow:8", "meanflow:4", "meanflow:2", "meanflow:1"),
    "shortcut": ("shortcut:8", "shortcut:4", "shortcut:2", "shortcut:1"),
}


def parse_sampler(spec):
    """'dpm-solver++:20' -> ('dpm-solver++', 20); 'ode-heun:25' -> ('ode-heun', 25)."""
    name, sep, steps = spec.rpartition(":")
    if not sep or not steps.isdigit():
        raise argparse.ArgumentTypeError(f"sampler {spec!r} must be NAME:STEPS, e.g. ddim:50, ode-heun:25 or sde:250")
    return name, int(steps)


def sampler_kwargs(name):
    """'ode-heun' -> dict(sampler='ode', ode={'method': 'heun'}); 'sde-heun' -> SDE with Heun steps."""
    family, _, method = name.partition("-")
    if family == "ode":
        return dict(sampler="ode", ode={"method": method or "heun"})
    if family == "sde":
        return dict(sampler="sde", sde={"method": "Heun" if method == "heun" else "Euler"})
    return dict(sampler=name)


class CountingModel(torch.nn.Module):
    """The model, counting the rows it evaluates (a guided call of 2N rows counts 2 per sample)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x, t, y=None, **conditions):   # conditions: iMF's guidance inputs
        self.rows += len(x)
        return self.model(x, t, y, **conditions)


def is_digits_model(args):
    return args["in_channels"] == 1 and args["input_size"] == 8 and args["num_classes"] == 10


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_sampler(model, noise, labels, name, steps, args, info, batch_size, cfg_scale, autocast, seed):
    """All samples of one sampler in batches; returns (x_0 on the CPU, seconds)."""
    torch.manual_seed(seed)  # DDPM's per-step noise: the same stream for every run of this sampler
    outputs = []
    sync(noise.device)
    start = time.perf_counter()
    for i in range(0, len(noise), batch_size):
        with torch.no_grad(), autocast:
            x0 = sample(model, noise[i:i + batch_size], labels[i:i + batch_size], null_class=args["num_classes"],
                        **sampler_kwargs(name), steps=steps, cfg_scale=cfg_scale, diffusion_kwargs=info["diffusion"],
                        clip_denoised=not info["latent"], progress=True)
        outputs.append(x0.float().cpu())
    sync(noise.device)
    return torch.cat(outputs), time.perf_counter() - start


def plot(results, path, title):
    """Quality against speed, one line per sampler family, step counts written next to the points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (("class_match", 100, "judged as their class (%)"), ("frechet_pixels", 1, "Frechet distance, pixels"))
    for ax, (key, scale, label) in zip(axes, panels):
        families = dict.fromkeys(r["sampler"] for r in results)
        for family, marker in zip(families, "s^ovD<>p*"):
            rows = [r for r in results if r["sampler"] == family]
            if rows:
                ax.plot([r["samples_per_s"] for r in rows], [scale * r[key] for r in rows], marker=marker,
                        label=family)
                for r in rows:
                    ax.annotate(str(r["steps"]), (r["samples_per_s"], scale * r[key]), textcoords="offset points",
                                xytext=(4, 4), fontsize=8)
        ax.axhline(scale * results[0][f"{key}_real_heldout"], color="gray", linestyle=":", label="real held-out")
        ax.set_xscale("log")
        ax.set_xlabel("samples / s")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/digits/DiT-Mini-2", help="a run folder or a checkpoint file")
    parser.add_argument("--samplers", nargs="+", type=parse_sampler, metavar="NAME:STEPS", default=None,
                        help="default for DDPM models: " + " ".join(DEFAULT_SAMPLERS["ddpm"]) + "; for flow models: "
                             + " ".join(DEFAULT_SAMPLERS["flow"]))
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="default: <run>/samples/samplers-cfg<scale>")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    ckpt, state = resolve_checkpoint(args.run)
    model, info = load_sampling_model(ckpt, ckpt=state)
    model = CountingModel(model.to(device).eval())
    objective = objective_name(info["diffusion"])
    samplers = args.samplers or [parse_sampler(s) for s in DEFAULT_SAMPLERS[objective]]
    margs = info["model_args"]
    channels, size, num_classes = margs["in_channels"], margs["input_size"], margs["num_classes"]
    digits = is_digits_model(margs)
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.num_samples, channels, size, size, generator=generator).to(device)
    labels = (torch.arange(args.num_samples) % max(num_classes, 1)).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    run_dir = Path(args.run) if Path(args.run).is_dir() else Path("samples") / Path(args.run).stem
    out = Path(args.out) if args.out else run_dir / "samples" / f"samplers-cfg{args.cfg_scale:g}"
    out.mkdir(parents=True, exist_ok=True)

    # Warm-up: allocator, kernels and the diffusers scheduler's first call, at each sampler's fewest steps (a
    # shortcut model takes powers of 2 only).
    warm = min(args.batch_size, args.num_samples)
    for name in dict.fromkeys(name for name, _ in samplers):
        fewest = min(steps for other, steps in samplers if other == name)
        run_sampler(model, noise[:warm], labels[:warm], name, fewest, margs, info, args.batch_size, args.cfg_scale,
                    autocast, args.seed)

    results = []
    for name, steps in samplers:
        model.rows = 0
        x0, seconds = run_sampler(model, noise, labels, name, steps, margs, info, args.batch_size, args.cfg_scale,
                                  autocast, args.seed)
        row = {"sampler": name, "steps": steps, "samples": args.num_samples, "seconds": seconds,
               "samples_per_s": args.num_samples / seconds, "network_evals_per_sample": model.rows / args.num_samples}
        if digits:
            images = to_uint8(x0)
            row.update(judge(images.permute(0, 2, 3, 1).numpy(), labels.cpu().numpy()))
            save_grid(images[: 10 * 10], out / f"{name}{steps}.png", nrow=10)
        results.append(row)
        quality = (f"  judged as class {row['class_match']:6.1%}  Frechet {row['frechet_pixels']:6.2f}"
                   if "class_match" in row else "")
        print(f"{name + ':' + str(steps):18s} {row['samples_per_s']:9.1f} samples/s  "
              f"{row['network_evals_per_sample']:6.1f} NFE{quality}", flush=True)

    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU, {torch.get_num_threads()} threads")
    summary = {"checkpoint": str(ckpt), "device": device_name, "precision": args.precision,
               "cfg_scale": args.cfg_scale, "results": results}
    (out / "samplers.json").write_text(json.dumps(summary, indent=2))
    header = f"\n{'sampler':18s}{'samples/s':>11s}{'speed-up':>10s}{'NFE':>7s}"
    print(header + (f"{'judged':>9s}{'Frechet':>9s}" if digits else ""))
    for row in results:
        line = f"{row['sampler'] + ':' + str(row['steps']):18s}{row['samples_per_s']:11.1f}" \
               f"{row['samples_per_s'] / results[0]['samples_per_s']:9.1f}x{row['network_evals_per_sample']:7.1f}"
        if "class_match" in row:
            line += f"{row['class_match']:9.1%}{row['frechet_pixels']:9.2f}"
        print(line)
    if results and "class_match" in results[0]:
        print(f"{'real held-out digits':29s}{'':17s}{results[0]['class_match_real_heldout']:9.1%}"
              f"{results[0]['frechet_pixels_real_heldout']:9.2f}")
        plot(results, out / "samplers.png", f"{margs['name']}, {args.num_samples} samples, cfg {args.cfg_scale:g}, "
                                            f"{device_name}, {args.precision}")
        print(f"plot: {out / 'samplers.png'}; grids: {out}/<sampler><steps>.png")
    print(f"table: {out / 'samplers.json'}")


if __name__ == "__main__":
    main()
