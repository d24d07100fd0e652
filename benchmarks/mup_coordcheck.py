"""μP coordinate check (Yang et al., Tensor Programs V, Sec. 5 / the `mup` package's coord check): per-layer activation
sizes and update sizes over the first few AdamW steps at widths 1x..8x a base width, under sp and mup.

    python -m benchmarks.mup_coordcheck                      # DiT and U-Net, widths 1x, 2x, 4x, 8x, 5 steps
    python -m benchmarks.mup_coordcheck --family dit --base 32 --mults 1 2 4 8 16 --steps 6 --lr 1e-3 --out docs
    python -m benchmarks.mup_coordcheck --family dit --device cuda --head 72 --base 288 --mults 1 2 3 4 --strict
                                                             # DiT-XL's heads (72) up to its width 1152 (the GPU check)

For each width the same seed builds the model (models.mup.parametrize), fixed data (one batch of 8x8x1 inputs, times,
noise and labels, drawn from the seed alone, so every width sees the same numbers) trains with one flow-matching
loss for `steps` AdamW steps (weight decay 0; under mup the per-group lr scales of models.mup.param_groups), and a
forward hook on every linear / conv layer records, before each update k, |out_k|.mean() (the activation size) and
|out_k - out_0|.mean() (the update size: how far k updates moved that layer's output). Under μP both stay flat in
width; under SP with Adam the update size of hidden layers grows about linearly with width. adaLN-Zero and the zero
readout mean a DiT's attention and MLP weights first move at update 3 (the readout moves first, then the gates), so
use steps >= 4. Writes <out>/mup_coordcheck.png and prints a markdown table (mean over each role's layers, last step)
and a verdict: the log-log slope of each role's update size against width, per parametrization; μP holds when the
hidden layers' slope is flat under mup (|slope| <= 0.3) and the check can tell: sp's slope is at least 0.3 above it
(SP's growth flattens once its updates saturate, lr x steps large against the weights). --strict exits 1 when it
does not. --head sets the (fixed) head width, --depth the blocks, --device where it runs.
"""

import argparse
import math
import sys
from pathlib import Path

import matplotlib
import torch
import torch.nn as nn

from models import DiT
from models.mup import classify, optimizer_params, parametrize
from models.unet import UNet

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HEAD = 16   # fixed head size: widths grow by adding heads, so attention keeps 1/sqrt(d_head)
FAMILIES = ("dit", "unet")
BASES = {"dit": 32, "unet": 16}


def build(family, width, head=HEAD, depth=2):
    """A small DiT (`depth` blocks, patch 2) or U-Net (two levels) on 8x8x1 inputs with 10 classes, at `width`, with
    heads `head` channels wide."""
    if width % head:
        raise SystemExit(f"width {width} is not a multiple of the head width {head}")
    if family == "dit":
        return DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=width, depth=depth, num_heads=width // head,
                   num_classes=10, learn_sigma=False)
    return UNet(input_size=8, in_channels=1, num_classes=10, learn_sigma=False, model_channels=width,
                channel_mult=(1, 2), attention_levels=(1,), num_res_blocks=1, norm_groups=8, head_channels=head)


def fixed_batch(seed, batch=16):
    """(x_t, t, y, velocity target) of a rectified flow on N(0, 1) "images", from the seed alone."""
    gen = torch.Generator().manual_seed(seed)
    x, noise = torch.randn(batch, 1, 8, 8, generator=gen), torch.randn(batch, 1, 8, 8, generator=gen)
    t = torch.rand(batch, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return (1 - t[:, None, None, None]) * x + t[:, None, None, None] * noise, t * 1000, y, noise - x


def coord_data(family, param, widths, base, steps=5, lr=1e-3, seed=0, head=HEAD, depth=2, device="cpu"):
    """Rows {family, param, width, step, module, role, act, update} for every linear/conv layer, steps 0..steps."""
    rows = []
    xt, t, y, target = (v.to(device) for v in fixed_batch(seed))
    for width in widths:
        torch.manual_seed(seed)   # the same initial weights on any device: built on the CPU, then moved
        model = parametrize(build(family, width, head, depth), param, base).to(device)
        opt = torch.optim.AdamW(optimizer_params(model, param, base), lr=lr, weight_decay=0.0)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        roles = classify(model)
        outs, first = {}, None
        hooks = [m.register_forward_hook(lambda mod, args, out, name=name: outs.__setitem__(name, out.detach().float()))
                 for name, m in model.named_modules()
                 if isinstance(m, (nn.Linear, nn.Conv2d)) and f"{name}.weight" in roles]
        for step in range(steps + 1):
            opt.zero_grad(set_to_none=True)
            loss = (model(xt, t, y) - target).pow(2).mean()
            first = first or dict(outs)
            for name, out in outs.items():
                rows.append(dict(family=family, param=param, width=width, step=step, module=name,
                                 role=roles[f"{name}.weight"], act=out.abs().mean().item(),
                                 update=(out - first[name]).abs().mean().item()))
            if step < steps:
                loss.backward()
                opt.step()
        for hook in hooks:
            hook.remove()
    return rows


def role_means(rows, step, key):
    """{(family, param, role, width): mean of `key` over the role's layers at `step`}."""
    sums = {}
    for r in rows:
        if r["step"] == step:
            k = (r["family"], r["param"], r["role"], r["width"])
            total, n = sums.get(k, (0.0, 0))
            sums[k] = (total + r[key], n + 1)
    return {k: total / n for k, (total, n) in sums.items()}


def table(rows, steps):
    """Markdown: per family, role and parametrization, the last step's mean update and activation size at each width
    (as a multiple of the family's smallest, the base)."""
    upd, act = role_means(rows, steps, "update"), role_means(rows, steps, "act")
    mults = sorted({r["width"] // min(q["width"] for q in rows if q["family"] == r["family"]) for r in rows})
    lines = ["| family | role | param | " + " | ".join(f"update {m}x" for m in mults) + " | "
             + " | ".join(f"act {m}x" for m in mults) + " |", "|" + "---|" * (3 + 2 * len(mults))]
    for fam, param, role in sorted({k[:3] for k in upd}):
        base = min(r["width"] for r in rows if r["family"] == fam)
        cells = lambda d: " | ".join(f"{d[(fam, param, role, base * m)]:.3g}" if (fam, param, role, base * m) in d
                                     else "" for m in mults)
        lines.append(f"| {fam} | {role} | {param} | {cells(upd)} | {cells(act)} |")
    return "\n".join(lines)


def slope(widths, values):
    """Least-squares slope of log(values) against log(widths): 0 = flat in width, 1 = linear growth."""
    xs, ys = [math.log(w) for w in widths], [math.log(max(v, 1e-30)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def verdict(rows, steps):
    """(lines, ok): per family and role, the slope of the last step's update size against width under sp and mup;
    ok when every family's hidden layers are flat under mup (|slope| <= 0.3) and grow faster under sp (its slope at
    least 0.3 above mup's)."""
    upd = role_means(rows, steps, "update")
    lines, ok = [], True
    for fam in sorted({k[0] for k in upd}):
        widths = sorted({k[3] for k in upd if k[0] == fam})
        slopes = {}
        for param, role in sorted({k[1:3] for k in upd if k[0] == fam}):
            values = [upd.get((fam, param, role, w)) for w in widths]
            if None not in values and len(widths) > 1:
                slopes[(param, role)] = slope(widths, values)
        roles = sorted({role for _, role in slopes})
        for role in roles:
            lines.append(f"  {fam} {role:7s} update-size slope vs width: " +
                         ", ".join(f"{param} {slopes[(param, role)]:+.2f}" for param in ("sp", "mup")
                                   if (param, role) in slopes))
        mup, sp = slopes.get(("mup", "hidden")), slopes.get(("sp", "hidden"))
        holds = mup is not None and sp is not None and abs(mup) <= 0.3 and sp - mup >= 0.3
        ok = ok and holds
        lines.append(f"verdict {fam} (widths {', '.join(map(str, widths))}): " + (
            "μP holds: hidden update sizes flat under mup, growing under sp" if holds else
            "μP does NOT hold here: hidden update sizes " +
            (f"slope {mup:+.2f} under mup (want |slope| <= 0.3), {sp:+.2f} under sp (want >= mup's + 0.3)"
             if mup is not None and sp is not None else "missing (need sp and mup at 2+ widths)")))
    return lines, ok


def plot(rows, steps, path):
    families = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    colors = {"input": "tab:blue", "hidden": "tab:gray", "output": "tab:red", "vector": "tab:green"}
    fig, axes = plt.subplots(len(families), 4, figsize=(16, 3.6 * len(families)), squeeze=False)
    for i, fam in enumerate(families):
        for j, (param, key) in enumerate([("sp", "act"), ("sp", "update"), ("mup", "act"), ("mup", "update")]):
            ax = axes[i][j]
            mine = [r for r in rows if r["family"] == fam and r["param"] == param and r["step"] == steps]
            for module in sorted({r["module"] for r in mine}):
                pts = sorted((r["width"], r[key], r["role"]) for r in mine if r["module"] == module)
                ax.plot([p[0] for p in pts], [max(p[1], 1e-12) for p in pts], color=colors[pts[0][2]],
                        alpha=0.35 if pts[0][2] == "hidden" else 0.9, marker=".")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            what = "|out|" if key == "act" else "|out - out_0|"
            ax.set_title(f"{fam} {param}: {what} after {steps} steps", fontsize=9)
            ax.set_xlabel("width")
    for role, color in colors.items():
        axes[0][0].plot([], [], color=color, label=role)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=[*FAMILIES, "both"], default="both")
    parser.add_argument("--base", type=int, default=None, help="base width (default: DiT 32, U-Net 16)")
    parser.add_argument("--mults", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs")
    parser.add_argument("--head", type=int, default=HEAD, help=f"head width, fixed across widths (default {HEAD}; "
                                                                "DiT-XL's is 72)")
    parser.add_argument("--depth", type=int, default=2, help="DiT blocks (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the verdict says μP does not hold")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    rows = []
    for fam in FAMILIES if args.family == "both" else (args.family,):
        base = args.base or BASES[fam]
        for param in ("sp", "mup"):
            rows += coord_data(fam, param, [base * m for m in args.mults], base, args.steps, args.lr, args.seed,
                               head=args.head, depth=args.depth, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, args.steps, out / "mup_coordcheck.png")
    print(f"device {args.device}, heads of {args.head}, depth {args.depth}, {args.steps} AdamW steps at lr {args.lr}")
    print(table(rows, args.steps))
    lines, ok = verdict(rows, args.steps)
    print("\n".join(lines))
    print(f"wrote {out / 'mup_coordcheck.png'}")
    if args.strict and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
