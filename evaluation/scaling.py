"""Scaling plots in the manner of the DiT paper (Peebles & Xie 2023, Figs. 2, 6, 8, 9): quality against
training steps, model Gflops and training compute, one series and one power-law fit per model family (DiT, U-Net).

    python -m evaluation.scaling runs/scaling-digits                 # a sweep folder (searched recursively)
    python -m evaluation.scaling runs/a runs/b --out plots/ --metric mse --last 5 --wandb
    python -m evaluation.scaling isoflop runs/isoflop-digits   # compute-optimal fits (evaluation/isoflop.py)
    python -m evaluation.scaling lr runs/mup-lr-digits         # learning-rate transfer (evaluation/lr_transfer.py)

A run folder is any folder holding `metrics.jsonl` (what train.py writes) and, beside it, `config.yaml` (the
resolved config: model name and batch size). The quality metric is the evaluation loss when every run logged one
(eval.every: fixed held-out images, times and noise, so it differs between runs only by their weights; `--metric
eval_loss_ema` for the EMA's), else FID when every run logged one (in-loop FID with any feature network: Inception,
digits, DINOv2), else the training loss averaged over the last K logged rows (each row is already a mean over
`train.log_every` steps): a single training-loss value is too noisy to compare models by. `--metric mse` uses the
loss's MSE term alone, which leaves out the high-variance variational-bound term. Models are compared at one training step
(the last one every run reached, or --step), as the paper compares them at 400K steps. Training compute is
counted as the paper does: forward Gflops per image x 3 (forward + backward) x batch x steps.

Writes, into --out (default: <the folder given>/scaling): metric_vs_steps.png, metric_vs_gflops.png,
metric_vs_compute.png, scaling.png (the three side by side), scaling.md (the table and the fit) and
scaling.json (the same numbers for scripts); prints the table. --wandb logs the images and table to a W&B
run (offline without an API key).
"""

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from utils.errors import ConfigError, MissingFile, report_user_errors
from utils.files import atomic_write_text
from utils.logger import read_metrics

from . import evaluator
from .real_digits import digits_reference

# Folders a run keeps beside metrics.jsonl that never hold other runs; skipped while searching.
_SKIP_DIRS = {"checkpoints", "samples", "wandb", "__pycache__", ".git"}
METRICS = ("auto", "eval_loss", "eval_loss_ema", "fid", "loss", "mse")
EVAL_METRICS = ("eval_loss", "eval_loss_ema")   # fixed data, times and noise: compared as logged, never averaged


#################################################################################
#                                Reading runs                                   #
#################################################################################

@dataclass
class Run:
    """One training run as the collector sees it: identity, size, and its logged rows."""
    path: Path
    name: str                      # the folder's path below the searched root, e.g. "DiT-S-2"
    model: str                     # config.yaml model.name, e.g. "DiT-S/2"
    batch_size: int | None
    gflops: float | None           # forward Gflops per image, as logged by train.py
    params: int | None
    rows: list = field(default_factory=list)

    @property
    def family(self):
        """The model family, from the name: "DiT-S/2" -> "DiT", "UNet-S" -> "U-Net" (anything else: its prefix)."""
        prefix = self.model.split("-")[0]
        return "U-Net" if prefix.lower() == "unet" else prefix


def train_compute(gflops, batch_size, steps):
    """Training compute in the paper's units: Gflops x 3 (forward + backward ~ 3 forwards) x batch x steps."""
    return gflops * 3 * batch_size * steps


def find_runs(paths):
    """Every folder under `paths` (each a run folder or a folder of them, any depth) holding metrics.jsonl."""
    found = []
    for root in map(Path, paths):
        if not root.exists():
            raise MissingFile(f"{root} does not exist; pass run folders or a sweep folder")
        if root.is_file():  # a metrics.jsonl given directly
            root = root.parent
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
            if "metrics.jsonl" in files:
                found.append(Path(folder))
    return sorted(set(found))


def _checkpoint_params(run_dir):
    """Number of entries in the newest checkpoint's model state dict (None when there is no checkpoint).
    The file is memory-mapped, so only its metadata is read, even for DiT-XL."""
    from utils.checkpoint import latest_checkpoint
    path = latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        return None
    try:
        import torch
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(sum(v.numel() for v in state["model"].values()))
    except Exception:  # an unreadable or foreign checkpoint only costs the params column
        return None


def load_run(run_dir, root=None):
    """A Run from a folder with metrics.jsonl (and, normally, config.yaml)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    rows = read_metrics(run_dir / "metrics.jsonl")
    name = run_dir.relative_to(root).as_posix() if root is not None and run_dir != root else run_dir.name
    model = (config.get("model") or {}).get("name") or name
    batch = (config.get("train") or {}).get("batch_size")
    gflops = next((r["gflops"] for r in reversed(rows) if "gflops" in r), None)
    params = next((r["params"] for r in reversed(rows) if "params" in r), None) or _checkpoint_params(run_dir)
    return Run(path=run_dir, name=name, model=model, batch_size=batch, gflops=gflops, params=params, rows=rows)


def fd_draws(run_dir, draws, num_samples=1000, features="digits", reference=None, weights=None, sample_args=(),
             name="fd"):
    """FD of a run's newest checkpoint `draws` times, draw k sampled by sample.py with seed=k (the same noise in every
    run) into <run>/samples/<name>-step<step>-seed<k>-n<N>[-<hash of sample_args>]; each score is cached beside its
    folder (<folder>-<features>.json), so a re-run only scores what is missing. Returns the rows, one per draw (fd,
    class_accuracy where the features give one, seed, step, ckpt, the settings)."""
    from utils.checkpoint import latest_checkpoint

    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise MissingFile(f"{run_dir} has no checkpoint to score; train it first (or score the in-loop FD rows)")
    if reference is None and features == "digits":
        reference = digits_reference()
    if reference is None:
        raise ConfigError(f"scoring with --features {features} needs --ref (reference statistics)")
    sample_args = list(sample_args)
    # Other sample.py settings give other folders (and cached scores): a short hash of them in the name.
    tag = f"-{hashlib.sha1(' '.join(sample_args).encode()).hexdigest()[:8]}" if sample_args else ""
    root = Path(__file__).resolve().parents[1]
    rows = []
    for k in range(draws):
        out = run_dir / "samples" / f"{name}-step{int(ckpt.stem)}-seed{k}-n{num_samples}{tag}"
        cached = out.with_name(f"{out.name}-{features}.json")
        row = json.loads(cached.read_text()) if cached.exists() else None
        if (row is None or row.get("ckpt") != ckpt.name or row.get("reference") != str(reference)
                or row.get("sample_args", []) != sample_args):
            # Paths quoted for Hydra: sweep folders are named by their overrides ("...,seed=0,...").
            subprocess.run([sys.executable, str(root / "sample.py"), f"ckpt='{ckpt}'", f"num_samples={num_samples}",
                            f"seed={k}", f"out='{out}'", *sample_args], check=True, stdout=_stderr())
            result = evaluator.evaluate(out / "samples.npz", reference, features=features, weights=weights,
                                        progress=False)
            row = {"fd": result["fid"], "seed": k, "num_samples": num_samples, "features": features,
                   "reference": str(reference), "ckpt": ckpt.name, "step": int(ckpt.stem), "sample_args": sample_args,
                   **({"class_accuracy": result["class_accuracy"]} if "class_accuracy" in result else {})}
            cached.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cached, json.dumps(row, indent=2))
        rows.append(row)
    return rows


def _stderr():
    """Where a child's stdout goes: our stderr (stdout carries the report), or inherited when it has no file."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def standard_error(values):
    """The standard error of a mean of draws (None for a single draw)."""
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def score_final(run, features="digits", reference=None, num_samples=1000, weights=None, sample_args=(), draws=2):
    """Score a run's newest checkpoint with `draws` noise draws (fd_draws: EMA weights, its objective's default
    sampler unless sample_args say otherwise, draw k from seed k in every run) and put their mean in the run's rows as
    its one FID row, at the checkpoint's step, with the standard error over draws (fid_se) beside it."""
    if draws < 1:
        raise ConfigError(f"--fd-draws {draws}: score each final checkpoint at least once")
    rows = fd_draws(run.path, draws, num_samples, features, reference, weights, sample_args, name="scaling-fd")
    fds = [r["fd"] for r in rows]
    row = {"step": rows[0]["step"], "fid": float(np.mean(fds)), "fid_se": standard_error(fds), "fid_draws": draws,
           "fid_samples": num_samples, "fid_features": features, "ckpt": rows[0]["ckpt"]}
    if all("class_accuracy" in r for r in rows):
        row["class_accuracy"] = float(np.mean([r["class_accuracy"] for r in rows]))
    run.rows = [r for r in run.rows if "fid" not in r] + [row]
    return row


def load_runs(paths):
    """Runs found under `paths`, named by their path below the common folder of all of them."""
    dirs = find_runs(paths)
    if not dirs:
        raise MissingFile(f"no metrics.jsonl under {', '.join(map(str, paths))}")
    root = Path(os.path.commonpath([d.resolve() for d in dirs]))
    if len(dirs) == 1:
        root = root.parent
    return [load_run(d.resolve(), root) for d in dirs]


#################################################################################
#                                 Measurements                                  #
#################################################################################

def choose_metric(runs, metric="auto"):
    """'auto': the evaluation loss when every run logged it (eval.every: the low-variance measure the fits want),
    else FID when every run logged it (the paper's measure), else the training loss."""
    if metric not in METRICS:
        raise ConfigError(f"metric={metric!r}; choose one of {', '.join(METRICS)}")
    if metric != "auto":
        return metric
    for candidate in ("eval_loss", "fid"):
        if all(any(candidate in r for r in run.rows) for run in runs):
            return candidate
    return "loss"


def metric_label(metric, last, features=None):
    if metric == "fid":
        return "FID" if features in (None, "inception") else f"FD ({features} features)"
    if metric in EVAL_METRICS:
        return "evaluation loss" + (" (EMA)" if metric == "eval_loss_ema" else "")
    term = "training loss" if metric == "loss" else "training MSE"
    return f"{term} (mean of last {last} logged rows)"


def curve(run, metric, last, max_step=None):
    """(steps, compute, values) of `metric` along a run. Loss-type metrics are a trailing mean over `last`
    logged rows, so each point is the same measurement as the final one."""
    rows = [r for r in run.rows if metric in r and "step" in r and (max_step is None or r["step"] <= max_step)]
    rows.sort(key=lambda r: r["step"])
    # A resume re-logs steps it redoes; keep the last row per step.
    rows = list({r["step"]: r for r in rows}.values())
    if not rows:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    steps = np.array([r["step"] for r in rows], dtype=np.float64)
    values = np.array([r[metric] for r in rows], dtype=np.float64)
    if metric in ("loss", "mse") and last > 1:
        csum = np.concatenate([[0.0], np.cumsum(values)])
        lo = np.maximum(np.arange(1, len(values) + 1) - last, 0)
        values = (csum[1:] - csum[lo]) / (np.arange(1, len(values) + 1) - lo)
    compute = np.array([_row_compute(run, r) for r in rows], dtype=np.float64)
    return steps, compute, values


def _row_compute(run, row):
    """Training compute at a row: as logged by train.py, else recomputed from Gflops, batch and step."""
    if "train_compute_gflops" in row:
        return row["train_compute_gflops"]
    if run.gflops is None or run.batch_size is None:
        return math.nan
    return train_compute(run.gflops, run.batch_size, row["step"])


def _standard_error_at(run, metric, step):
    """The standard error logged beside a metric at a step (eval_loss_se: bootstrap over images; fid_se: over noise
    draws), or None."""
    rows = [r for r in run.rows if r.get("step") == step and metric in r]
    return rows[-1].get(f"{metric}_se") if rows else None


def fit_power_law(x, y):
    """Least squares of log10 y = log10 a + b log10 x. Returns (a, b, r2), r2 in log space."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    lx, ly = np.log10(x[keep]), np.log10(y[keep])
    if len(lx) < 2 or np.ptp(lx) == 0:
        return math.nan, math.nan, math.nan
    b, log_a = np.polyfit(lx, ly, 1)
    residual = ly - (log_a + b * lx)
    total = np.sum((ly - ly.mean()) ** 2)
    r2 = 1.0 - np.sum(residual ** 2) / total if total > 0 else 1.0
    return float(10 ** log_a), float(b), float(r2)


def summarize(runs, metric="auto", last=5, max_step=None):
    """One record per run with a value of the metric: size, compute so far and the metric at the comparison
    step, sorted by Gflops; plus the power-law fits of that metric against Gflops and against training compute.

    Models are compared at the same training step, as in the paper (FID at 400K steps): `max_step`, or by default
    the last step every run has reached, so a sweep still in progress is compared fairly."""
    metric = choose_metric(runs, metric)
    ends = {}
    for run in runs:
        steps, _, _ = curve(run, metric, last)
        if len(steps) == 0:
            print(f"scaling: {run.name} has no {metric!r} rows; left out", file=sys.stderr)
        else:
            ends[run.name] = int(steps[-1])
    step = max_step if max_step is not None else min(ends.values(), default=None)
    if max_step is None and len(set(ends.values())) > 1:
        print(f"scaling: runs end at different steps ({min(ends.values())}..{max(ends.values())}); comparing them "
              f"at step {step} (--step to choose)", file=sys.stderr)
    records = []
    for run in runs:
        if run.name not in ends:
            continue
        steps, compute, values = curve(run, metric, last, step)
        if len(values) == 0:
            print(f"scaling: {run.name} logged no {metric!r} at or before step {step}; left out", file=sys.stderr)
            continue
        records.append(dict(run=run.name, model=run.model, family=run.family, params=run.params, gflops=run.gflops,
                            steps=int(steps[-1]), batch_size=run.batch_size, train_compute_gflops=float(compute[-1]),
                            value=float(values[-1]), se=_standard_error_at(run, metric, int(steps[-1]))))
    records.sort(key=lambda r: (r["gflops"] if r["gflops"] is not None else math.inf, r["run"]))

    def fits_of(rows):
        out = {}
        for key in ("gflops", "train_compute_gflops"):
            a, b, r2 = fit_power_law([r[key] if r[key] is not None else math.nan for r in rows],
                                     [r["value"] for r in rows])
            out[key] = dict(a=a, b=b, r2=r2, runs=len(rows))
        return out
    families = sorted({r["family"] for r in records})
    # One fit per family (the paper's DiT-vs-U-Net comparison); `fits` is over all runs (one family: the same).
    family_fits = {f: fits_of([r for r in records if r["family"] == f]) for f in families}
    networks = {r.get("fid_features", "inception") for run in runs for r in run.rows if "fid" in r}
    if metric == "fid" and len(networks) > 1:
        raise ConfigError(f"the runs logged FID in different feature spaces ({', '.join(sorted(networks))}), which "
                         f"are not comparable; collect them separately or rescore with --score-final --features ...")
    features = next(iter(networks)) if metric == "fid" and networks else None
    return dict(metric=metric, label=metric_label(metric, last, features), last=last, step=step, records=records,
                fits=fits_of(records), families=families, family_fits=family_fits)


#################################################################################
#                                    Output                                     #
#################################################################################

def _fmt(x, spec):
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _fmt_params(p):
    return "–" if p is None else f"{p / 1e6:.2f}M"


def markdown_table(summary):
    """The table (one row per run, by Gflops) and a line per fit, in markdown."""
    records = summary["records"]
    models = [r["model"] for r in records]
    show_run = len(set(models)) < len(models) or any(r["run"] != r["model"].replace("/", "-") for r in records)
    head = (["run"] if show_run else []) + ["model", "family", "params", "Gflops", "steps", "batch",
                                            "training compute (Gflops)", summary["label"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        cells = ([r["run"]] if show_run else []) + [
            r["model"], r["family"], _fmt_params(r["params"]), _fmt(r["gflops"], ".4g"), str(r["steps"]),
            _fmt(r["batch_size"], "d"), _fmt(r["train_compute_gflops"], ".3e"),
            _fmt(r["value"], ".4f") + (f" ± {r['se']:#.2g}" if r.get("se") is not None else "")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    groups = [(f"{f}: ", summary["family_fits"][f]) for f in summary["families"]] if len(summary["families"]) > 1 \
        else [("", summary["fits"])]
    for prefix, fits in groups:
        for key, what in (("gflops", "Gflops"), ("train_compute_gflops", "training compute")):
            f = fits[key]
            lines.append(f"{prefix}Power-law fit against {what}: {summary['label']} = {_fmt(f['a'], '.4g')} · "
                         f"x^{_fmt(f['b'], '.4f')} (R² = {_fmt(f['r2'], '.3f')}, {f['runs']} runs at step "
                         f"{summary['step']:,})")
            lines.append("")
    return "\n".join(lines)


def _colors(runs):
    """One colour per run, ordered by Gflops (small = dark), so every figure uses the same key."""
    import matplotlib
    order = sorted(runs, key=lambda r: (r.gflops if r.gflops is not None else math.inf, r.name))
    cmap = matplotlib.colormaps["viridis"]
    return {run.name: cmap(i / max(len(order) - 1, 1) * 0.9) for i, run in enumerate(order)}


FAMILY_STYLE = {"DiT": ("o", "-", "k"), "U-Net": ("s", "--", "tab:red")}  # marker, line style, fit colour


def _style(family):
    return FAMILY_STYLE.get(family, ("^", ":", "tab:blue"))


def _fit_line(ax, xs, f, label_x, family=None):
    if not xs or not math.isfinite(f["b"]):
        return
    grid = np.geomspace(min(xs), max(xs), 50)
    _, _, color = _style(family)
    name = f"{family} fit" if family else "fit"
    ax.plot(grid, f["a"] * grid ** f["b"], "--", color=color, lw=1,
            label=f"{name}: y = {f['a']:.3g} · {label_x}^{f['b']:.3f}  (R² = {f['r2']:.2f})")


def _tidy_log_axes(ax):
    """Plain numbers on log axes ("0.15", "1e+03"), minor labels only when an axis spans under a decade."""
    from matplotlib.ticker import FuncFormatter, NullFormatter
    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        if axis.get_scale() == "log" and lo > 0:
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(plain if hi / lo < 10 else NullFormatter())


def plot(runs, summary, out_dir):
    """Write the three figures and a combined one; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, last, label = summary["metric"], summary["last"], summary["label"]
    colors = _colors(runs)
    by_name = {r["run"]: r for r in summary["records"]}
    shown = [run for run in runs if run.name in by_name]
    shown.sort(key=lambda run: (run.gflops if run.gflops is not None else math.inf, run.name))

    families = summary["families"]
    several = len(families) > 1

    def legend_name(run):
        return f"{run.name} ({_fmt(run.gflops, '.3g')} Gflops)"

    def fits(ax, key, label_x):
        """One fit line per family over the points the fit used."""
        for family in families:
            xs = [r[key] for r in summary["records"] if r["family"] == family and r[key] is not None
                  and math.isfinite(r[key])]
            _fit_line(ax, xs, summary["family_fits"][family][key], label_x, family if several else None)

    def steps_panel(ax):
        for run in shown:
            steps, _, values = curve(run, metric, last)
            marker, line, _ = _style(run.family)
            ax.plot(steps, values, line, marker=marker, ms=2.5, color=colors[run.name], label=legend_name(run))
        if any(r.rows and max(row.get("step", 0) for row in r.rows) > summary["step"] for r in shown):
            ax.axvline(summary["step"], color="grey", ls=":", lw=1, label=f"compared at step {summary['step']:,}")
        ax.set(xlabel="training steps", ylabel=label, yscale="log", title=f"{label.split(' (')[0]} vs training steps")

    def gflops_panel(ax):
        records = [r for r in summary["records"] if r["gflops"] is not None]
        for r in records:
            ax.scatter(r["gflops"], r["value"], s=40, color=colors[r["run"]], marker=_style(r["family"])[0], zorder=3)
            ax.annotate(r["model"], (r["gflops"], r["value"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        fits(ax, "gflops", "Gflops")
        ax.margins(x=0.15, y=0.1)  # room for the labels
        ax.set(xlabel="model Gflops (forward, per image)", ylabel=label, xscale="log", yscale="log",
               title=f"{label.split(' (')[0]} at step {summary['step']:,} vs model Gflops")

    def compute_panel(ax):
        for run in shown:
            _, compute, values = curve(run, metric, last)
            marker, line, _ = _style(run.family)
            ax.plot(compute, values, line, color=colors[run.name], label=legend_name(run))
            r = by_name[run.name]  # the compared point (the fit's data)
            ax.scatter([r["train_compute_gflops"]], [r["value"]], s=40, color=colors[run.name], marker=marker,
                       zorder=3)
        fits(ax, "train_compute_gflops", "C")
        ax.set(xlabel="training compute C (Gflops = Gflops x 3 x batch x steps)", ylabel=label, xscale="log",
               yscale="log", title=f"{label.split(' (')[0]} vs training compute")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, panel in (("metric_vs_steps", steps_panel), ("metric_vs_gflops", gflops_panel),
                       ("metric_vs_compute", compute_panel)):
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        panel(ax)
        _tidy_log_axes(ax)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths[key] = out_dir / f"{key}.png"
        fig.savefig(paths[key], dpi=120)
        plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for ax, panel in zip(axes, (steps_panel, gflops_panel, compute_panel)):
        panel(ax)
        _tidy_log_axes(ax)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths["scaling"] = out_dir / "scaling.png"
    fig.savefig(paths["scaling"], dpi=110)
    plt.close(fig)
    return paths


def log_to_wandb(summary, images, out_dir, project="dit", group=None, mode=None):
    """Log the figures and the table to a W&B run kept in out_dir (offline without an API key; a re-run of
    the collector continues the same W&B run)."""
    import wandb

    from utils.logger import RunLogger
    logger = RunLogger(out_dir, {"scaling": {k: v for k, v in summary.items() if k != "records"}}, backend="wandb",
                       project=project, group=group, tags=["scaling"], name=f"scaling_{Path(out_dir).parent.name}",
                       mode=mode)
    step = max((r["steps"] for r in summary["records"]), default=0)
    for key, path in images.items():
        logger.log_image(key, path, step)
    columns = ["run", "model", "family", "params", "gflops", "steps", "batch_size", "train_compute_gflops", "value"]
    table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in summary["records"]])
    logger.wandb.log({"scaling_table": table, "step": step,
                      **{f"fit/{k}/{p}": v for k, f in summary["fits"].items() for p, v in f.items()},
                      **{f"fit/{fam}/{k}/{p}": v for fam, fits in summary["family_fits"].items()
                         for k, f in fits.items() for p, v in f.items()}})
    logger.finish()


def collect(paths, out_dir=None, metric="auto", last=5, max_step=None, wandb=False, project="dit", group=None,
            score=None):
    """Read the runs under `paths`, write figures, scaling.md and scaling.json into out_dir; return the summary.
    score: keyword arguments of score_final to score every run's final checkpoint instead of its in-loop FID."""
    paths = [Path(p) for p in paths]
    runs = load_runs(paths)
    if score is not None:
        for run in runs:
            score_final(run, **score)
        metric = "fid" if metric == "auto" else metric   # what was just scored is what the table is for
    if out_dir is None:
        base = paths[0] if len(paths) == 1 else Path(os.path.commonpath([p.resolve() for p in paths]))
        out_dir = base / "scaling"
    out_dir = Path(out_dir)
    summary = summarize(runs, metric, last, max_step)
    if not summary["records"]:
        raise ConfigError(f"no run under {', '.join(map(str, paths))} logged {summary['metric']!r}")
    images = plot(runs, summary, out_dir)
    table = markdown_table(summary)
    (out_dir / "scaling.md").write_text(table)
    (out_dir / "scaling.json").write_text(json.dumps({**summary, "images": {k: str(v) for k, v in images.items()}},
                                                     indent=2) + "\n")
    if wandb:
        log_to_wandb(summary, images, out_dir, project=project, group=group)
    return {**summary, "table": table, "images": images, "out_dir": out_dir}


#################################################################################
#                                Command line                                   #
#################################################################################

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m evaluation.scaling", description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", help="run folders, or folders searched recursively for metrics.jsonl")
    p.add_argument("--out", default=None, help="output folder (default: <the folder given>/scaling)")
    p.add_argument("--metric", default="auto", choices=METRICS,
                   help="auto = the evaluation loss when every run logged it, else FID when every run logged it, "
                        "else the training loss; with --score-final, the scored FD")
    p.add_argument("--last", type=int, default=5, help="loss metrics: mean over the last K logged rows")
    p.add_argument("--step", type=int, default=None,
                   help="compare the models at this training step (default: the last step every run reached)")
    p.add_argument("--score-final", action="store_true",
                   help="sample every run's final checkpoint and score it (instead of in-loop FID rows)")
    p.add_argument("--features", default="digits", choices=("inception", "digits", "dinov2"),
                   help="--score-final: the feature network (default digits)")
    p.add_argument("--ref", default=None, help="--score-final: reference statistics (digits: the train split)")
    p.add_argument("--weights", default=None, help="--score-final: the feature network's weights file")
    p.add_argument("--num-samples", type=int, default=1000, help="--score-final: samples per run")
    p.add_argument("--sample-args", nargs="*", default=[], help="--score-final: extra sample.py overrides")
    p.add_argument("--fd-draws", type=int, default=2,
                   help="--score-final: noise draws per run (seeds 0..K-1, the same in every run), averaged")
    p.add_argument("--wandb", action="store_true", help="also log the figures and table to W&B")
    p.add_argument("--project", default="dit", help="W&B project")
    p.add_argument("--group", default=None, help="W&B group (e.g. the sweep's logger.group)")
    return p.parse_args(argv)


SUBCOMMANDS = {"isoflop": "evaluation.isoflop", "lr": "evaluation.lr_transfer"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:  # `isoflop RUNS...` (compute-optimal fits), `lr RUNS...` (lr transfer)
        import importlib
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    args = parse_args(argv)
    if args.last < 1:
        raise SystemExit("--last must be at least 1")
    score = dict(features=args.features, reference=args.ref, num_samples=args.num_samples, weights=args.weights,
                 sample_args=args.sample_args, draws=args.fd_draws) if args.score_final else None
    result = collect(args.paths, args.out, metric=args.metric, last=args.last, max_step=args.step,
                     wandb=args.wandb, project=args.project, group=args.group, score=score)
    print(result["table"])
    print(f"wrote {', '.join(p.name for p in result['images'].values())}, scaling.md, scaling.json "
          f"to {result['out_dir']}")
    return result


if __name__ == "__main__":
    report_user_errors(main)()   # a user's mistake (no runs, too few sizes): one line, no traceback
