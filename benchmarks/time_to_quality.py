"""Quality against wall-clock training time on the digits: the official DiT code beside ours, in one run.

    python benchmarks/time_to_quality.py --official /path/to/facebookresearch/DiT
    python benchmarks/time_to_quality.py --official <DiT> --ours default: quick:experiment=digits-quick
    python benchmarks/time_to_quality.py --ours default: --budgets 30 60          # ours only

The official side imports models.py and diffusion/ from the checkout and trains them the way its train.py does
(DiT with learned sigma, DDPM with 1000 steps, t uniform, AdamW without weight decay, EMA), with the recipe that
measured best for it on the digits: DiT-Mini/2's width (hidden 128, depth 4, 4 heads, patch 2), batch 112,
lr 1e-3 after a 100-step linear warm-up, EMA decay 0.995; it samples with its own 250-step DDPM loop (clipped to
[-1, 1], as pixels are). Its training time is the loop's, without the EMA copies kept for the budgets.

Each of ours (NAME:OVERRIDES, comma-separated train.py overrides) runs `python train.py` with a checkpoint every
--ckpt-every steps and is stopped with SIGTERM (train.py checkpoints and exits) once the loop's own time (the
metrics.jsonl step_time, which includes compilation and checkpoint writes) passes the last budget. Every draw is a
function of (seed, step), so with a constant rate after warm-up (optim.cooldown_fraction=0) the checkpoint at step
k is the final state of a k-step run. A recipe whose rate decays over the last fraction f of train.steps (the
default: f = 0.5) is measured as the run of N steps that fits each budget: its first N - round(f N) steps are
the constant-rate run's, so the script resumes that run's checkpoint there with train.steps=N in a folder of its
own (the decay branch, as in warm-stable-decay schedules) and trains the decay; the budget's time is the trunk's up
to the branch point plus the branch's. N is planned from the trunk's step time and planned again, smaller, if the
branch ran over the budget.

At every budget, each side's newest state within it samples --num-samples digits (classes in turn, EMA weights, no
guidance) and is judged by benchmarks/digits_quality.py: the share an SVM trained on real digits assigns to the
conditioning class, the Frechet distance in pixel space, and FD-digits (the digits network's features), each next
to real held-out digits. Printed as a table, plotted to <out>/time_to_quality.png, written to
<out>/time_to_quality.json; the last lines give, for each of ours, the first budget at which it is at least as good
as the official code at its last budget on all three measures.
"""

import argparse
import copy
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from digits_quality import judge, parse_config, sample_and_judge, training_seconds  # noqa: E402
from throughput import load_official  # noqa: E402

OFFICIAL_RECIPE = dict(hidden_size=128, depth=4, num_heads=4, patch_size=2, batch_size=112, lr=1e-3,
                       warmup_steps=100, ema_decay=0.995, sample_steps=250, class_dropout=0.1)
MEASURES = (("class_match", "share judged as class", max), ("frechet_pixels", "Frechet (pixels)", min),
            ("fd_digits", "FD-digits", min))


def digits_tensors():
    from data.digits import DigitsDataset
    data = DigitsDataset()
    return data.images, data.labels


def train_official(path, budgets, seed=0, recipe=OFFICIAL_RECIPE, progress=True):
    """Train the official DiT on the digits for max(budgets) seconds of loop time.

    Returns (model_args, {budget: (step, seconds, EMA state_dict of the newest step within the budget)}).
    """
    from tqdm import tqdm

    models, diffusion_module = load_official(path)
    images, labels = digits_tensors()
    torch.manual_seed(seed)
    model_args = dict(input_size=8, patch_size=recipe["patch_size"], in_channels=1,
                      hidden_size=recipe["hidden_size"], depth=recipe["depth"], num_heads=recipe["num_heads"],
                      num_classes=10, class_dropout_prob=recipe["class_dropout"], learn_sigma=True)
    model = models.DiT(**model_args)
    ema = copy.deepcopy(model).requires_grad_(False)
    diffusion = diffusion_module.create_diffusion(timestep_respacing="")
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0)
    model.train()
    ema.eval()
    gen = torch.Generator().manual_seed(seed)
    order, position = torch.randperm(len(labels), generator=gen), 0
    pending, kept = sorted(budgets), {}
    elapsed, step, last = 0.0, 0, None
    bar = tqdm(total=max(budgets), desc="official", unit="s", disable=not progress, mininterval=2,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{rate_fmt}]")
    while pending:
        start = time.perf_counter()
        if position + recipe["batch_size"] > len(order):  # a new epoch: a fresh permutation
            order, position = torch.randperm(len(labels), generator=gen), 0
        index = order[position:position + recipe["batch_size"]]
        position += recipe["batch_size"]
        x, y = images[index], labels[index]
        t = torch.randint(0, diffusion.num_timesteps, (len(x),), generator=gen)
        for group in opt.param_groups:
            group["lr"] = recipe["lr"] * min(1.0, (step + 1) / recipe["warmup_steps"])
        loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # the official update_ema: ema = decay * ema + (1 - decay) * model
            for e, p in zip(ema.parameters(), model.parameters()):
                e.mul_(recipe["ema_decay"]).add_(p.detach(), alpha=1 - recipe["ema_decay"])
        step += 1
        seconds = time.perf_counter() - start
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"the official run's loss is {loss.item()} at step {step}")
        while pending and elapsed + seconds > pending[0]:  # this step would overshoot: the previous state counts
            kept[pending.pop(0)] = last
        bar.update(min(seconds, max(budgets) - elapsed))
        elapsed += seconds
        last = (step, elapsed, copy.deepcopy(ema.state_dict()))
    bar.close()
    return model_args, kept


@torch.no_grad()
def sample_official(path, model_args, state, num_samples, steps=250, seed=0, batch_size=500):
    """num_samples digits (classes in turn) from the official 250-step DDPM loop, as uint8 (N, 8, 8, 1)."""
    models, diffusion_module = load_official(path)
    model = models.DiT(**model_args)
    model.load_state_dict(state)
    model.eval()
    diffusion = diffusion_module.create_diffusion(str(steps))
    labels = torch.arange(num_samples) % 10
    torch.manual_seed(seed)
    out = []
    from tqdm import tqdm
    for i in tqdm(range(0, num_samples, batch_size), desc=f"official DDPM-{steps} sampling", unit="batch"):
        y = labels[i:i + batch_size]
        z = torch.randn(len(y), 1, 8, 8)
        x = diffusion.p_sample_loop(model.forward, z.shape, z, clip_denoised=True, model_kwargs=dict(y=y),
                                    device=z.device, progress=False)
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
    return torch.cat(out).numpy(), labels.numpy()


def train_ours(run_dir, overrides, budget, log_every, steps=1_000_000, ckpt_every=None):
    """python train.py until the loop's own time passes `budget` seconds, then SIGTERM (it checkpoints), or to
    `steps`; logged and checkpointed every log_every steps unless ckpt_every says otherwise. The rate of a decayed
    recipe is constant over its first steps * (1 - cooldown_fraction)."""
    cmd = [sys.executable, "train.py", f"run_dir={run_dir}", "logger=none", f"train.ckpt_every={ckpt_every or log_every}",
           f"train.log_every={log_every}", "train.keep_last=0", f"train.steps={steps}", "fid.at_end=false",
           *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    metrics = Path(run_dir) / "metrics.jsonl"
    while proc.poll() is None:
        time.sleep(0.5)
        seconds = training_seconds(Path(run_dir)) if metrics.exists() else {}
        if seconds and max(seconds.values()) > budget:
            proc.send_signal(signal.SIGTERM)
            break
    if proc.wait() not in (0, 128 + signal.SIGTERM):
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")


def cooldown_fraction(overrides):
    """optim.cooldown_fraction of train.py's config composed with these overrides (0: constant after warm-up)."""
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return float(cfg.optim.get("cooldown_fraction", 0.0))


def checkpoint_steps(run_dir):
    return sorted(int(p.stem) for p in (Path(run_dir) / "checkpoints").glob("*.pt"))


def branch(trunk, overrides, branch_step, steps, run_dir, log_every):
    """The final state of a `steps`-step run of a decayed recipe, from the constant-rate trunk's checkpoint at
    branch_step (at most steps - round(f * steps), where the rates of the two runs still agree): that checkpoint and
    the trunk's metrics go into run_dir, and train.py resumes there with train.steps=steps (it truncates the metrics
    to the branch point, so run_dir's training_seconds count the trunk's time up to it, then the branch's)."""
    run_dir, final = Path(run_dir), Path(run_dir) / "checkpoints" / f"{steps:07d}.pt"
    if not final.exists() or checkpoint_steps(run_dir)[0] != branch_step:  # else done by an earlier call
        shutil.rmtree(run_dir, ignore_errors=True)
        (run_dir / "checkpoints").mkdir(parents=True)
        shutil.copy(Path(trunk) / "checkpoints" / f"{branch_step:07d}.pt", run_dir / "checkpoints")
        shutil.copy(Path(trunk) / "metrics.jsonl", run_dir / "metrics.jsonl")
        train_ours(run_dir, overrides, math.inf, log_every, steps=steps, ckpt_every=steps)
    return final, training_seconds(run_dir)[steps]


def states_ours(run_dir, overrides, budgets, fraction, log_every):
    """{budget: (checkpoint, step, training seconds, branch step or None)}: the state each budget judges."""
    seconds, ckpts = training_seconds(Path(run_dir)), checkpoint_steps(run_dir)
    states = {}
    for budget in budgets:
        within = [s for s in ckpts if seconds.get(s, math.inf) <= budget]
        if fraction == 0:
            if within:
                states[budget] = (Path(run_dir) / "checkpoints" / f"{within[-1]:07d}.pt", within[-1],
                                  seconds[within[-1]], None)
            continue
        per_step = seconds[max(seconds)] / max(seconds)
        steps = int(0.97 * budget / per_step)
        for _ in range(3):  # plan, and plan again (smaller) if the branch ran over the budget
            start = max((s for s in within if s <= steps - round(fraction * steps)), default=0)
            if start == 0:
                break
            ckpt, total = branch(run_dir, overrides, start, steps, Path(run_dir) / f"decay-{steps}", log_every)
            if total <= budget:
                states[budget] = (ckpt, steps, total, start)
                break
            steps = int(steps * budget / total * 0.98)
    return states


def judge_ours(run_dir, overrides, budgets, num_samples, fraction=0.0, log_every=25):
    sample_overrides = [o.removeprefix("sample.") for o in overrides if o.startswith("sample.")]
    states = states_ours(run_dir, overrides, budgets, fraction, log_every)
    rows = []
    for budget in budgets:
        if budget not in states:
            rows.append({"budget_seconds": budget, "step": None})
            continue
        ckpt, step, seconds, start = states[budget]
        judged = sample_and_judge(ckpt, Path(run_dir) / "samples" / f"judge-{step:07d}", sample_overrides,
                                  num_samples, 1.0)
        rows.append({"budget_seconds": budget, "step": step, "train_seconds": seconds, "decay_from": start,
                     **judged})
    return rows


def at_least_as_good(row, target):
    return row.get("step") is not None and all(
        (row[key] >= target[key]) if better is max else (row[key] <= target[key]) for key, _, better in MEASURES)


def plot(results, real, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MEASURES), figsize=(5 * len(MEASURES), 3.8))
    for ax, (key, title, _) in zip(axes, MEASURES):
        for name, rows in results.items():
            done = [r for r in rows if r.get("step") is not None]
            ax.plot([r["train_seconds"] for r in done], [r[key] for r in done], "o-", label=name)
        ax.axhline(real[f"{key}_real_heldout"], color="gray", ls="--", label="real held-out digits")
        ax.set_xlabel("training time (s, loop only)")
        ax.set_title(title)
        if key != "class_match":
            ax.set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", default=None, help="a facebookresearch/DiT checkout (omit: ours only)")
    parser.add_argument("--ours", nargs="*", type=parse_config, default=[parse_config("default:")],
                        metavar="NAME:OVERRIDES", help="train.py configs (default: the default, `default:`; none: the official code only)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[30, 60, 120, 220], help="training seconds")
    parser.add_argument("--ours-budgets", nargs="*", type=float, default=[],
                        help="more budgets for ours only (a finer time to reach the official code's quality)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the rows of <out>/time_to_quality.json for sides not run now (e.g. the official)")
    parser.add_argument("--ckpt-every", type=int, default=25, help="our checkpoint (and budget) resolution, steps")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--out", default="runs/time-to-quality")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out, budgets = Path(args.out), sorted(args.budgets)
    out.mkdir(parents=True, exist_ok=True)
    if args.official and not (Path(args.official) / "models.py").exists():
        sys.exit(f"--official {args.official}: no models.py there; pass a checkout of "
                 f"https://github.com/facebookresearch/DiT")

    saved = out / "time_to_quality.json"
    results = json.loads(saved.read_text()) if args.keep and saved.exists() else {}
    if args.official:
        model_args, kept = train_official(args.official, budgets, seed=args.seed)
        rows = []
        for budget in budgets:
            if kept.get(budget) is None:
                rows.append({"budget_seconds": budget, "step": None})
                continue
            step, seconds, state = kept[budget]
            start = time.perf_counter()
            images, labels = sample_official(args.official, model_args, state, args.num_samples,
                                             OFFICIAL_RECIPE["sample_steps"], seed=args.seed)
            rows.append({"budget_seconds": budget, "step": step, "train_seconds": seconds,
                         "sampler": f"ddpm-{OFFICIAL_RECIPE['sample_steps']}",
                         "sample_seconds": time.perf_counter() - start, **judge(images, labels)})
        results["official"] = rows
    for name, overrides in args.ours:
        run_dir, ours_budgets = out / name, sorted({*budgets, *args.ours_budgets})
        fraction = cooldown_fraction(overrides)
        # A decayed recipe branches its decays off the constant-rate trunk, which needs to reach the last branch point.
        trunk = ours_budgets[-1] * (1 if fraction == 0 else 1.1 * (1 - fraction))
        if not (run_dir / "metrics.jsonl").exists() or max(training_seconds(run_dir).values(), default=0) < trunk:
            train_ours(run_dir, overrides, trunk, args.ckpt_every)
        results[name] = judge_ours(run_dir, overrides, ours_budgets, args.num_samples, fraction, args.ckpt_every)
        (out / "time_to_quality.json").write_text(json.dumps(results, indent=2))
    (out / "time_to_quality.json").write_text(json.dumps(results, indent=2))

    real = next(r for rows in results.values() for r in rows if r.get("step") is not None)
    print(f"\nquality after N s of training (no guidance): judged as class / Frechet (pixels) / FD-digits [steps]")
    columns = sorted({r["budget_seconds"] for rows in results.values() for r in rows})
    print(f"{'':14s}" + "".join(f"{b:>32g} s" for b in columns))
    for name, rows in results.items():
        by_budget = {r["budget_seconds"]: r for r in rows}
        cells = [f"{r['class_match']:.1%} / {r['frechet_pixels']:.2f} / {r['fd_digits']:.3f} [{r['step']}]"
                 if (r := by_budget.get(b, {})).get("step") is not None else "-" for b in columns]
        print(f"{name:14s}" + "".join(f"{c:>34s}" for c in cells))
    print(f"{'real held-out':14s}{real['class_match_real_heldout']:>28.1%} / {real['frechet_pixels_real_heldout']:.2f} / "
          f"{real['fd_digits_real_heldout']:.3f}")
    plot(results, real, out / "time_to_quality.png")
    if "official" in results and results["official"][-1].get("step") is not None:
        target = results["official"][-1]
        print(f"official at {target['budget_seconds']:g} s: {target['class_match']:.1%} / {target['frechet_pixels']:.2f} / "
              f"{target['fd_digits']:.3f}")
        for name, rows in results.items():
            if name == "official":
                continue
            hit = next((r for r in rows if at_least_as_good(r, target)), None)
            print(f"{name}: the official code's {target['budget_seconds']:g}-s quality " +
                  (f"reached within {hit['budget_seconds']:g} s (step {hit['step']}, {hit['train_seconds']:.0f} s)"
                   if hit else f"not reached within {rows[-1]['budget_seconds']:g} s"))
    print(f"results: {out / 'time_to_quality.json'}, plot: {out / 'time_to_quality.png'}")


if __name__ == "__main__":
    main()
