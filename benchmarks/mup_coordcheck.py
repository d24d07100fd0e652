"""μP coordinate check (Yang et al., Tensor Programs V, Sec. 5 / the `mup` package's coord check): per-layer activation
sizes and update sizes over the first few AdamW steps at widths 1x..8x a base width, under sp and mup.

    python -m benchmarks.mup_coordcheck                      # DiT and U-Net, widths 1x, 2x, 4x, 8x, 5 steps
    python -m benchmarks.mup_coordcheck --family dit --base 32 --mults 1 2 4 8 16 --steps 6 --lr 1e-3 --out docs

For each width the same seed builds the model (models.mup.parametrize), fixed data (one batch of 8x8x1 inputs, times,
noise and labels, drawn from the seed alone, so every width sees the same numbers) trains with one flow-matching
loss for `steps` AdamW steps (weight decay 0; under mup the per-group lr scales of models.mup.param_groups), and a
forward hook on every linear / conv layer records, before each update k, |out_k|.mean() (the activation size) and
|out_k - out_0|.mean() (the update size: how far k updates moved that layer's output). Under μP both stay flat in
width; under SP with Adam the update size of hidden layers grows about linearly with width. adaLN-Zero and the zero
readout mean a DiT's attention and MLP weights first move at update 3 (the readout moves first, then the gates), so
use steps >= 4. Writes <out>/mup_coordcheck.png and prints a markdown table (mean over each role's layers, last step).
"""

import argparse
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


def build(family, width):
    """A small DiT (depth 2, patch 2) or U-Net (two levels) on 8x8x1 inputs with 10 classes, at `width`."""
    if family == "dit":
        return DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=width, depth=2, num_heads=width // HEAD,
                   num_classes=10, learn_sigma=False)
    return UNet(input_size=8, in_channels=1, num_classes=10, learn_sigma=False, model_channels=width,
                channel_mult=(1, 2), attention_levels=(1,), num_res_blocks=1, norm_groups=8, head_channels=HEAD)


def fixed_batch(seed, batch=16):
    """(x_t, t, y, velocity target) of a rectified flow on N(0, 1) "images", from the seed alone."""
    gen = torch.Generator().manual_seed(seed)
    x, noise = torch.randn(batch, 1, 8, 8, generator=gen), torch.randn(batch, 1, 8, 8, generator=gen)
    t = torch.rand(batch, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return (1 - t[:, None, None, None]) * x + t[:, None, None, None] * noise, t * 1000, y, noise - x


def coord_data(family, param, widths, base, steps=5, lr=1e-3, seed=0):
    """Rows {family, param, width, step, module, role, act, update} for every linear/conv layer, steps 0..steps."""
    rows = []
    xt, t, y, target = fixed_batch(seed)
    for width in widths:
        torch.manual_seed(seed)
        model = parametrize(build(family, width), param, base)
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
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    rows = []
    for fam in FAMILIES if args.family == "both" else (args.family,):
        base = args.base or BASES[fam]
        for param in ("sp", "mup"):
            rows += coord_data(fam, param, [base * m for m in args.mults], base, args.steps, args.lr, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, args.steps, out / "mup_coordcheck.png")
    print(table(rows, args.steps))
    print(f"wrote {out / 'mup_coordcheck.png'}")


if __name__ == "__main__":
    main()
