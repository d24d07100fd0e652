"""What a training step of the one-step objectives costs against a flow step, on the same network and batch.

    python benchmarks/onestep_cost.py --threads 1          # DiT-Mini/2 on the digits, DiT-S/2 on 16x16 latents
    python benchmarks/onestep_cost.py --models DiT-B/4:4x32x32:32 --device cuda --precision bf16
    python benchmarks/onestep_cost.py --models DiT-XL/2:4x32x32:32 --objectives flow meanflow imf --device cuda \
        --precision bf16                                    # the GPU check's stage

For each MODEL:CxHxW:BATCH it times the forward and backward passes of one step (objective.losses, then backward) of
  flow               flow matching (diffusion=flow): one forward, one backward
  meanflow           MeanFlow without guidance: one forward with its JVP (forward-mode AD, math attention), backward
  meanflow-guided    MeanFlow with omega and kappa: plus one no-grad forward of 2N for the guided velocity
  shortcut           a shortcut model: one forward of N, its 2 no-grad forwards of the self-consistency share, backward
  imf                improved MeanFlow (diffusion.variant=imf): the no-grad guided velocity (two forwards at r = t), the
                     forward with its JVP along the network's own velocity, and the v-loss's extra forward (backward of
                     both)
as the median of --repeat steps after --warmup, the objectives taking turns step by step (so a change in the machine's
load slows each alike), and prints each against the flow step. Nothing is written.
"""

import argparse
import copy
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffusion import build_objective  # noqa: E402
from diffusion.objectives import attach_ema  # noqa: E402
from models import create_model  # noqa: E402

OBJECTIVES = {
    "flow": {"objective": "flow"},
    "meanflow": {"objective": "meanflow"},
    "meanflow-guided": {"objective": "meanflow", "omega": 1.0, "kappa": 0.5},
    "shortcut": {"objective": "shortcut"},
    "imf": {"objective": "meanflow", "variant": "imf"},
}


def one_step(model, objective, x, y, shape, gen, device, precision):
    """Seconds of one step's losses + backward."""
    t, noise = objective.draw(gen, len(x), shape, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast:
        loss = objective.losses(model, x, t, noise, dict(y=y))["loss"].mean()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["DiT-Mini/2:1x8x8:112", "DiT-S/2:4x16x16:16"])
    parser.add_argument("--objectives", nargs="+", default=[k for k in OBJECTIVES if k != "imf"],
                        choices=list(OBJECTIVES), help="default: all but imf")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, {torch.get_num_threads()} threads, precision {args.precision}", flush=True)
    for spec in args.models:
        name, dims, batch = spec.split(":")
        shape = tuple(int(d) for d in dims.split("x"))
        setups = {}
        for key in args.objectives:
            try:
                objective = build_objective(OBJECTIVES[key])
            except Exception as error:   # an objective this checkout lacks
                print(f"  {key}: skipped ({error})")
                continue
            torch.manual_seed(0)
            kwargs = dict(input_size=shape[1], in_channels=shape[0], num_classes=10, learn_sigma=False,
                          **getattr(objective, "network_kwargs", {}))
            with device:   # built where it runs: initialising DiT-XL/2 on a GPU takes a moment, on the CPU seconds
                model = create_model(name, **kwargs).train()
            attach_ema(objective, copy.deepcopy(model).requires_grad_(False))   # shortcut models' target network
            setups[key] = (model, objective, torch.Generator(device).manual_seed(0))
        x = torch.randn((int(batch), *shape), device=device)
        y = torch.randint(0, 11, (int(batch),), device=device)
        times = {key: [] for key in setups}
        # Round-robin over the objectives, so that a machine whose load changes slows each of them alike.
        for i in range(args.warmup + args.repeat):
            for key, (model, objective, gen) in setups.items():
                seconds = one_step(model, objective, x, y, shape, gen, device, args.precision)
                if i >= args.warmup:
                    times[key].append(seconds)
        rows = {key: statistics.median(values) for key, values in times.items()}
        base = rows.get("flow")
        print(f"{name} on {dims}, batch {batch}:")
        for key, seconds in rows.items():
            ratio = f"  ({seconds / base:.2f}x flow)" if base else ""
            print(f"  {key:16s} {seconds * 1000:8.1f} ms/step{ratio}", flush=True)


if __name__ == "__main__":
    main()
