"""Learning-rate transfer across widths (μP's promise, Yang et al. Tensor Programs V; Zheng et al. 2505.15270 Fig. 3):
for every (family, parametrization, width), the final evaluation loss of each learning rate of a sweep, the best rate,
and whether it moves with width.

    python train.py -m experiment=mup-lr-digits                    # the sweep (conf/experiment/mup-lr-digits.yaml)
    python -m evaluation.scaling lr runs/mup-lr-digits [--metric eval_loss_ema] [--out DIR]

A run is a folder with config.yaml and metrics.jsonl (what train.py writes); it counts once its last evaluation-loss
row is at its final step. A run that stopped before (diverged, killed) is listed as such and kept out of the argmin;
a finished run with a non-finite loss is a diverged rate. The best rate of a width is the grid's argmin, refined by a
parabola through it and its two neighbours in log2(lr) (reported beside it, never replacing it). Transfer holds when
the argmins of all widths lie within one grid step (a factor 2 on the digits grid) of each other.

Writes lr_transfer.png (loss against lr, one curve per width, one panel per family and parametrization),
lr_transfer.md (the table) and lr_transfer.json into --out (default <the folder given>/lr_transfer).
"""

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from utils.errors import ConfigError, MissingFile
from utils.files import atomic_write_text
from utils.logger import read_metrics

from .scaling import FAMILY_STYLE, _tidy_log_axes, find_runs

METRICS = ("eval_loss", "eval_loss_ema")


def family_of(model_name):
    """"DiT-Mini/2" -> "DiT"; "UNet-T8" -> "U-Net"."""
    prefix = model_name.split("-")[0]
    return "U-Net" if prefix.lower() == "unet" else prefix


def load_point(run_dir, metric="eval_loss"):
    """One sweep point from a run folder: family, param, width, lr, steps, the final metric (None when the run did
    not reach its last step) and its standard error."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    model, train = config["model"], config["train"]
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if metric in r]
    last = rows[-1] if rows else None
    done = last is not None and last["step"] == train["steps"]
    width = model.get("width") or model.get("kwargs", {}).get("hidden_size") or model.get("kwargs", {}).get(
        "model_channels")
    return dict(run=run_dir.name, path=str(run_dir), family=family_of(model["name"]), model=model["name"],
                param=model.get("param", "sp"), width=width, base_width=model.get("base_width"),
                lr=float(config["optim"]["lr"]), steps=train["steps"], done=done,
                loss=float(last[metric]) if done else None, se=last.get(f"{metric}_se") if done else None)


def load_points(paths, metric="eval_loss"):
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric}: choose one of {', '.join(METRICS)}")
    dirs = [d for d in find_runs(paths) if (d / "config.yaml").exists()]
    if not dirs:
        raise MissingFile(f"no run (config.yaml + metrics.jsonl) under {', '.join(map(str, paths))}")
    points = [load_point(d, metric) for d in dirs]
    for p in points:
        if not p["done"]:
            print(f"lr_transfer: {p['run']} has no {metric} at its last step {p['steps']} (unfinished or stopped); "
                  f"shown as missing", file=sys.stderr)
    if any(p["width"] is None for p in points):
        raise ConfigError("runs without model.width (or a hidden_size / model_channels kwarg) cannot be placed on a "
                          "width axis; sweep model.width")
    return points


def refine(lrs, losses, i):
    """The vertex of the parabola through the argmin i and its neighbours in log2(lr) (None at the grid's edge or
    when the three points are not convex)."""
    if i == 0 or i == len(lrs) - 1:
        return None
    x, y = np.log2(lrs[i - 1:i + 2]), np.asarray(losses[i - 1:i + 2])
    c2, c1, _ = np.polyfit(x, y, 2)
    return float(2 ** (-c1 / (2 * c2))) if c2 > 0 else None


def analyse(points):
    """Per (family, param): per width the curve (lr, loss), the argmin rate and its refinement; the spread of the
    argmins in grid steps (log2 of the largest over the smallest best rate) and whether it is within one step."""
    groups = defaultdict(lambda: defaultdict(list))
    for p in points:
        groups[(p["family"], p["param"])][p["width"]].append(p)
    out = []
    for (family, param), widths in sorted(groups.items()):
        curves = []
        for width, pts in sorted(widths.items()):
            pts.sort(key=lambda p: p["lr"])
            lrs = [p["lr"] for p in pts]
            losses = [p["loss"] if p["loss"] is not None and math.isfinite(p["loss"]) else math.inf for p in pts]
            i = int(np.argmin(losses))
            best = lrs[i] if math.isfinite(losses[i]) else None
            curves.append(dict(width=width, lrs=lrs, losses=[None if not math.isfinite(v) else v for v in losses],
                               ses=[p["se"] for p in pts], best_lr=best, best_loss=losses[i] if best else None,
                               refined_lr=refine(lrs, losses, i) if best else None,
                               edge=best is not None and i in (0, len(lrs) - 1)))
        bests = [c["best_lr"] for c in curves if c["best_lr"] is not None]
        spread = float(np.log2(max(bests) / min(bests))) if bests else math.nan
        out.append(dict(family=family, param=param, curves=curves, spread_steps=spread,
                        transfers=bool(bests) and spread <= 1.0 + 1e-9 and not any(c["edge"] for c in curves)))
    return out


def markdown(groups, metric):
    lines = [f"| family | param | width | best lr (grid) | refined | {metric} at best | loss per lr |",
             "|---|---|---|---|---|---|---|"]
    for g in groups:
        for c in g["curves"]:
            per_lr = ", ".join(f"{lr:.1e}: " + ("–" if v is None else f"{v:.4f}") for lr, v in zip(c["lrs"], c["losses"]))
            lines.append(f"| {g['family']} | {g['param']} | {c['width']} | "
                         + ("–" if c["best_lr"] is None else f"{c['best_lr']:.1e}" + (" (edge)" if c["edge"] else ""))
                         + f" | {'–' if c['refined_lr'] is None else format(c['refined_lr'], '.2e')} | "
                         + ("–" if c["best_loss"] is None else f"{c['best_loss']:.4f}") + f" | {per_lr} |")
    lines.append("")
    for g in groups:
        verdict = "within one grid step" if g["transfers"] else "moves"
        lines.append(f"- {g['family']} {g['param']}: the best rate spans {g['spread_steps']:.0f} grid step(s) "
                     f"(factor {2 ** g['spread_steps']:.0f}) across widths: {verdict}.")
    return "\n".join(lines) + "\n"


def plot(groups, path, metric):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({g["family"] for g in groups})
    params = sorted({g["param"] for g in groups}, key=lambda p: (p != "sp", p))
    fig, axes = plt.subplots(len(families), len(params), figsize=(5.2 * len(params), 3.9 * len(families)),
                             squeeze=False, sharey="row")
    for g in groups:
        ax = axes[families.index(g["family"])][params.index(g["param"])]
        cmap = matplotlib.colormaps["viridis"]
        marker = FAMILY_STYLE.get(g["family"], ("^",))[0]
        for k, c in enumerate(g["curves"]):
            color = cmap(k / max(len(g["curves"]) - 1, 1) * 0.9)
            x = [lr for lr, v in zip(c["lrs"], c["losses"]) if v is not None]
            y = [v for v in c["losses"] if v is not None]
            ax.plot(x, y, "-", marker=marker, ms=4, color=color, label=f"width {c['width']}")
            if c["best_lr"] is not None:
                ax.scatter([c["best_lr"]], [c["best_loss"]], s=90, facecolors="none", edgecolors=color, zorder=3)
        ax.set(xscale="log", yscale="log", xlabel="learning rate" + (" (base, μP)" if g["param"] == "mup" else ""),
               ylabel=f"final {metric}", title=f"{g['family']}, {g['param']}: best rate spans "
               f"{g['spread_steps']:.0f} step(s)")
        _tidy_log_axes(ax)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m evaluation.scaling lr", description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", help="the sweep's folder(s), searched for run folders")
    p.add_argument("--metric", default="eval_loss", choices=METRICS, help="raw weights (default) or the EMA")
    p.add_argument("--out", default=None, help="output folder (default <the first folder>/lr_transfer)")
    args = p.parse_args(argv)
    points = load_points(args.paths, args.metric)
    groups = analyse(points)
    out = Path(args.out) if args.out else Path(args.paths[0]) / "lr_transfer"
    table = markdown(groups, args.metric)
    plot(groups, out / "lr_transfer.png", args.metric)
    atomic_write_text(out / "lr_transfer.md", table)
    atomic_write_text(out / "lr_transfer.json", json.dumps(dict(metric=args.metric, groups=groups), indent=2) + "\n")
    print(table + f"wrote lr_transfer.png, lr_transfer.md, lr_transfer.json to {out}")
    return groups


if __name__ == "__main__":
    main()
