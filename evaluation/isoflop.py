"""Compute-optimal (isoFLOP) analysis of a sweep trained at fixed budgets: which model size and how many images
minimise the loss at a given training compute, and how the best loss falls with compute. Chinchilla's approaches 2
and 3 (Hoffmann et al. 2022), as Liang et al. apply them to diffusion Transformers (arXiv 2410.08184).

    python -m evaluation.scaling isoflop runs/isoflop-digits                       # folders searched recursively
    python -m evaluation.scaling isoflop runs/a runs/b --metric eval_loss_ema --bootstrap 200 --out plots/
    python -m evaluation.scaling isoflop runs/isoflop-digits --fd-draws 3 --fd-samples 1000 --wandb

A run folder holds config.yaml (train.py's resolved config) and metrics.jsonl. Each run names its budget C in
`train.flops`, in the DiT paper's unit: 3 x forward multiply-adds per image x images (hardware FLOPs are twice
this). N is the logged `params`, D = train.steps x train.batch_size images, and the run's loss is its final
evaluation loss (`eval_loss`, or `--metric eval_loss_ema`) at step train.steps. Runs that stopped earlier are named
on stderr and in the report and left out of every fit.

Per model family (DiT, U-Net, ...), separately:
  approach 2   at each budget, a parabola of loss in log10 N (all seeds as points) gives the vertex N*(C) and the
               minimum L*(C), one in log10 D gives D*(C); across budgets N* = k_N C^a, D* = k_D C^b (least squares
               in log-log) and the frontier L*(C) = E + A C^-alpha_C (E in [0, min L*)).
  approach 3   L(N, D) = E + A/N^alpha + B/D^beta on all runs (summed Huber loss on log L, delta 1e-3, L-BFGS
               from starts found by variable projection: for fixed (alpha, beta) the model is linear in (E, A, B),
               solved by non-negative least squares); N*(C) by minimising L over N at fixed C, with
               D = C / (3 gflops(N) 1e9) and gflops(N) interpolated log-log from the runs (it is not exactly ∝ N).
  bootstrap    runs resampled with replacement within each budget, everything refitted: 95% percentile
               intervals of the exponents, E and the predicted N*, L*; failed refits are counted and reported.
  held out     with >= 3 budgets, the fits without the largest budget predict its N* and L*, compared with its
               parabola vertex and its best size's mean loss over seeds (targets: loss within 0.5%, the reducible
               part L - E within 10%, size within one grid step).
  FD           FD = k loss^p and Spearman's rank correlation over the runs with an FD: final-step `fid` rows (one
               draw each), or `--fd-draws K` samples of each final checkpoint, the same noise (seed k) for every run.

With several families, one frontier figure overlays them and the report names the budget where they cross.

Writes into --out (default <common folder of the runs>/isoflop): isoflop.png, frontier.png, optimal.png,
loss_vs_fd.png (when there are FDs), isoflop.md (also printed) and isoflop.json; --wandb logs them to one
summary run in --group (offline without an API key).
"""

import argparse
import contextlib
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import yaml
from scipy import optimize, stats
from tqdm import tqdm
from utils.errors import ConfigError
from utils.files import atomic_write_text

from .scaling import FAMILY_STYLE, _tidy_log_axes, fd_draws, find_runs, fit_power_law, load_run, standard_error

METRICS = ("eval_loss", "eval_loss_ema")
HUBER_DELTA = 1e-3          # Hoffmann et al.'s delta, on log L
TARGETS = {"loss_pct": 0.5, "reducible_pct": 10.0, "grid_steps": 1.0,   # the held-out check's pass marks
           "vertex_loss_pct": 0.5}
EXTRAPOLATE = 10.0          # predictions and figures reach a decade past the largest budget
FAR_DEX = 3.0               # a parabola's vertex this many decades outside its sizes: no minimum, a failed fit


class FitFailed(RuntimeError):
    """A fit that cannot be made from these points (too few sizes or budgets, every parabola upside down):
    a ConfigError for the user's data, a counted failure inside the bootstrap."""


#################################################################################
#                                 Reading runs                                  #
#################################################################################

def family_of(model):
    """The model family: "UNet-S4" -> "U-Net" (any name starting with UNet), "DiT-Mini/2" -> "DiT"."""
    return "U-Net" if model.lower().startswith("unet") else model.split("-")[0]


def _final_eval(rows, metric, steps):
    """(value, SE, last eval step) of `metric` at the run's last eval row; the value is None unless that row is
    at step `steps` (a run that stopped early)."""
    evals = sorted((r for r in rows if metric in r and "step" in r), key=lambda r: r["step"])
    if not evals:
        return None, None, None
    last = evals[-1]
    if last["step"] != steps:
        return None, None, last["step"]
    return float(last[metric]), last.get(metric + "_se"), last["step"]


def load_isoflop_runs(paths, metric="eval_loss"):
    """Records of the complete runs under `paths` (run folders, or folders searched recursively), and the runs left
    out, each {"run", "reason"} (also printed to stderr). Runs without train.flops are an error naming them."""
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric!r}; choose one of {', '.join(METRICS)}")
    paths = [Path(p) for p in paths]
    dirs = find_runs(paths)
    if not dirs:
        raise ConfigError(f"no run folders (metrics.jsonl beside config.yaml) under {', '.join(map(str, paths))}; "
                          f"pass the isoFLOP sweep's folder")
    root = Path(os.path.commonpath([d.resolve() for d in dirs]))
    if len(dirs) == 1:
        root = root.parent
    records, left_out, no_budget, unsized = [], [], [], []
    for folder in dirs:
        run = load_run(folder.resolve(), root)
        config_path = run.path / "config.yaml"
        config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
        train, model = config.get("train") or {}, config.get("model") or {}
        if train.get("flops") is None:
            no_budget.append(run.name)
            continue
        steps, batch = train.get("steps"), train.get("batch_size")
        loss, se, last = _final_eval(run.rows, metric, steps)
        if loss is None:
            reason = f"no {metric!r} rows" if last is None else f"last {metric!r} at step {last} of {steps}"
            left_out.append({"run": run.name, "reason": reason})
            print(f"isoflop: {run.name} is incomplete ({reason}); left out of the fits", file=sys.stderr)
            continue
        if run.params is None or run.gflops is None:
            unsized.append(run.name)
            continue
        fid_rows = [r for r in run.rows if "fid" in r and r.get("step") == steps]
        fds = [float(r["fid"]) for r in fid_rows]
        records.append(dict(
            run=run.name, path=str(run.path), model=run.model, family=family_of(run.model), width=model.get("width"),
            param=model.get("param", "sp"), lr=(config.get("optim") or {}).get("lr"), seed=config.get("seed"),
            params=int(run.params), gflops=float(run.gflops), flops=float(train["flops"]), steps=int(steps),
            batch_size=int(batch), D=int(steps) * int(batch), loss=loss, loss_se=se,
            fd=float(np.mean(fds)) if fds else None, fd_se=standard_error(fds), fd_draws=len(fds),
            fd_features=fid_rows[0].get("fid_features", "inception") if fid_rows else None))
    if no_budget:
        raise ConfigError(f"{len(no_budget)} run(s) have no train.flops, so they are not isoFLOP runs: "
                          f"{', '.join(no_budget)}; train them with train.flops=<budget> or leave them out")
    if unsized:
        raise ConfigError(f"{len(unsized)} run(s) logged no `params` and `gflops` rows (train.py's training-log "
                          f"rows carry them): {', '.join(unsized)}")
    return records, left_out


def score_fd_draws(record, draws, num_samples=1000, features="digits", reference=None, weights=None,
                   sample_args=()):
    """FD of the run's final checkpoint `draws` times (scaling.fd_draws: draw k from seed k, the same noise in every
    run, into <run>/samples/isoflop-fd-step<step>-seed<k>-n<N>[-<hash of sample_args>], cached). Sets the record's fd
    (the mean), fd_se and fd_draws; returns the draws."""
    rows = fd_draws(record["path"], draws, num_samples, features, reference, weights, sample_args, name="isoflop-fd")
    values = [float(r["fd"]) for r in rows]
    record.update(fd=float(np.mean(values)), fd_se=standard_error(values), fd_draws=len(values), fd_features=features)
    return values


#################################################################################
#                        Approach 2: isoFLOP parabolas                          #
#################################################################################

def budget_of(record):
    """The budget a run belongs to: train.flops to 3 significant digits, so runs of one budget group together."""
    return float(f"{record['flops']:.3g}")


def group_runs(records):
    """{family: {budget: [records]}}, budgets ascending."""
    groups = {}
    for r in records:
        groups.setdefault(r["family"], {}).setdefault(budget_of(r), []).append(r)
    return {f: dict(sorted(b.items())) for f, b in sorted(groups.items())}


def fit_parabola(x, y):
    """Least squares y = c2 (x - x0)^2 + c1 (x - x0) + c0 with x0 = mean x (for conditioning). Returns a dict with
    the coefficients, the vertex (x*, y*) and a flag: None, "opens downward" (no minimum: x*, y* are NaN) or
    "vertex outside the sampled range" (an extrapolated minimum, kept)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(np.unique(x)) < 3:
        raise FitFailed(f"a parabola needs 3 distinct sizes, got {len(np.unique(x))}")
    x0 = float(x.mean())
    c2, c1, c0 = np.polyfit(x - x0, y, 2)
    if c2 <= 0:
        return dict(coef=[c2, c1, c0], x0=x0, vertex_x=math.nan, vertex_y=math.nan, flag="opens downward")
    vx, vy = x0 - c1 / (2 * c2), c0 - c1 ** 2 / (4 * c2)
    flag = None if x.min() <= vx <= x.max() else "vertex outside the sampled range"
    return dict(coef=[float(c2), float(c1), float(c0)], x0=x0, vertex_x=float(vx), vertex_y=float(vy), flag=flag)


def parabola_at(fit, x):
    """The parabola of fit_parabola at x."""
    c2, c1, c0 = fit["coef"]
    u = np.asarray(x, dtype=np.float64) - fit["x0"]
    return c2 * u ** 2 + c1 * u + c0


def isoflop_profile(runs, C):
    """Approach 2 at one budget: parabolas of loss in log10 N and in log10 D (every run a point, seeds apart),
    their vertices N*, D*, L*, the grid spacing (median step between sizes, in decades) and the best size by its
    mean loss over seeds."""
    N = np.array([r["params"] for r in runs], dtype=np.float64)
    D = np.array([r["D"] for r in runs], dtype=np.float64)
    L = np.array([r["loss"] for r in runs])
    sizes = np.unique(N)
    if len(sizes) < 3:
        raise FitFailed(f"C={C:.3g} has {len(sizes)} distinct model sizes; a parabola needs 3")
    by_N, by_D = fit_parabola(np.log10(N), L), fit_parabola(np.log10(D), L)
    for q, fit, x in (("N", by_N, np.log10(N)), ("D", by_D, np.log10(D))):
        if abs(fit["vertex_x"] - np.clip(fit["vertex_x"], x.min(), x.max())) > FAR_DEX:   # (NaN: opens downward)
            raise FitFailed(f"C={C:.3g}: the parabola in {q} has its vertex at 10^{fit['vertex_x']:.3g}, more than "
                            f"{FAR_DEX:g} decades outside the sampled {q}: no minimum near these sizes")
    means = [L[N == n].mean() for n in sizes]
    best = int(np.argmin(means))
    return dict(C=C, runs=len(runs), sizes=len(sizes), N_range=[float(sizes[0]), float(sizes[-1])],
                D_range=[float(D.min()), float(D.max())], spacing_dex=float(np.median(np.diff(np.log10(sizes)))),
                N_star=10 ** by_N["vertex_x"], L_star=by_N["vertex_y"], D_star=10 ** by_D["vertex_x"],
                L_star_D=by_D["vertex_y"], parabola_N=by_N, parabola_D=by_D,
                flags=[f"{q}: {fit['flag']}" for q, fit in (("N", by_N), ("D", by_D)) if fit["flag"]],
                best=dict(N=float(sizes[best]), loss=float(means[best]), seeds=int((N == sizes[best]).sum())))


#################################################################################
#                        Frontier and power laws across budgets                  #
#################################################################################

def _frontier_linear(z, L, E_max):
    """min over E in [0, E_max], A >= 0 of |E + A z - L|^2 (closed form: the interior solution, else the best of
    the faces). Returns (E, A, sum of squares)."""
    candidates = []
    zc, Lc = z - z.mean(), L - L.mean()
    if zc @ zc > 0:
        A = (zc @ Lc) / (zc @ zc)
        candidates.append((L.mean() - A * z.mean(), A))
    for E in (0.0, E_max):                      # the faces E = 0 and E = E_max
        candidates.append((E, max((z @ (L - E)) / (z @ z), 0.0)))
    candidates.append((min(max(L.mean(), 0.0), E_max), 0.0))
    best = None
    for E, A in candidates:
        if 0 <= E <= E_max and A >= 0:
            sse = float(np.sum((E + A * z - L) ** 2))
            if best is None or sse < best[2]:
                best = (float(E), float(A), sse)
    return best


def fit_frontier(C, L, E=None):
    """L*(C) = E + A C^-alpha through the per-budget minima by least squares, E in [0, min L*). For each alpha the
    model is linear in (E, A) (solved in closed form); alpha is a bounded 1-D search. With E given (fewer than 3
    budgets: approach 3's E) only A and alpha are fitted. Returns {E, A, alpha, E_fixed, rmse}."""
    C, L = np.asarray(C, dtype=np.float64), np.asarray(L, dtype=np.float64)
    if len(C) < (2 if E is not None else 3):
        raise FitFailed(f"the frontier needs {'2' if E is not None else '3'} budgets with a minimum, got {len(C)}")
    C0 = float(np.exp(np.mean(np.log(C))))     # C / C0 keeps A of order L
    E_max = float(L.min()) * (1 - 1e-9)
    if E is not None:
        E_max = min(float(E), E_max)
    if not E_max > 0:   # a vertex extrapolated far outside its sizes can put L* at or below zero
        raise FitFailed(f"the frontier needs positive minimum losses, got min L* = {float(L.min()):.4g}")

    def solve(alpha):
        z = (C / C0) ** -alpha
        if E is not None:
            A = max(float(z @ (L - E_max)) / float(z @ z), 0.0)
            return E_max, A, float(np.sum((E_max + A * z - L) ** 2))
        return _frontier_linear(z, L, E_max)

    grid = np.linspace(0.005, 2.0, 120)
    sse = [solve(a)[2] for a in grid]
    i = int(np.argmin(sse))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    alpha = optimize.minimize_scalar(lambda a: solve(a)[2], bounds=(lo, hi), method="bounded",
                                     options={"xatol": 1e-7}).x
    E_fit, A, s = solve(alpha)
    return dict(E=E_fit, A=A * C0 ** alpha, alpha=float(alpha), E_fixed=E is not None,
                rmse=math.sqrt(s / len(C)))


def frontier_at(frontier, C):
    return frontier["E"] + frontier["A"] * np.asarray(C, dtype=np.float64) ** -frontier["alpha"]


#################################################################################
#                       Approach 3: L(N, D) = E + A/N^a + B/D^b                   #
#################################################################################

def _huber_objective(theta, lnN, lnD, lnL, delta):
    """Sum over runs of Huber_delta(log L_hat - log L) and its gradient, with log L_hat = LSE(a - alpha lnN,
    b - beta lnD, e) (Hoffmann et al. App. D.2); lnN, lnD are logs of N, D over their reference scales."""
    a, b, e, alpha, beta = theta
    u = np.stack([a - alpha * lnN, b - beta * lnD, np.full_like(lnN, e)])     # (3, runs)
    top = u.max(axis=0)
    w = np.exp(u - top)
    total = w.sum(axis=0)
    r = top + np.log(total) - lnL
    w /= total                                                               # d log L_hat / d u
    absr = np.abs(r)
    f = np.sum(np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta)))
    g = np.clip(r, -delta, delta)                                            # Huber'(r)
    grad = np.array([g @ w[0], g @ w[1], g @ w[2], -(g * w[0]) @ lnN, -(g * w[1]) @ lnD])
    return f, grad


def _projected_starts(n, d, L, grid):
    """Variable projection over an (alpha, beta) grid: for each pair, non-negative least squares of the relative
    error (E + A n^-alpha + B d^-beta - L) / L in (E, A, B). Returns [(sse, E, A, B, alpha, beta)] best first."""
    out = []
    for alpha in grid:
        na = n ** -alpha
        for beta in grid:
            X = np.stack([np.ones_like(n), na, d ** -beta], axis=1) / L[:, None]
            coef, residual = optimize.nnls(X, np.ones_like(L))
            out.append((residual ** 2, *coef, alpha, beta))
    return sorted(out, key=lambda s: s[0])


def fit_approach3(N, D, L, starts=(), grid=12, keep=3, delta=HUBER_DELTA):
    """Hoffmann et al.'s approach 3 on all runs: L(N, D) = E + A/N^alpha + B/D^beta by L-BFGS on the summed
    Huber loss of log L (a sum, not a mean, and tight tolerances: a mean with default tolerances stops early, the
    Epoch AI replication's finding). Starts: the `keep` best of a `grid` x `grid` variable-projection search over
    (alpha, beta) in [0.05, 1.5], plus `starts` given as (E, A, B, alpha, beta). Returns {E, A, B, alpha, beta,
    huber, converged}."""
    N, D, L = (np.asarray(v, dtype=np.float64) for v in (N, D, L))
    if len(np.unique(N)) < 2 or len(np.unique(D)) < 2:
        raise FitFailed("approach 3 needs runs of several sizes and lengths")
    N0, D0 = float(np.exp(np.log(N).mean())), float(np.exp(np.log(D).mean()))   # reference scales
    lnN, lnD, lnL = np.log(N / N0), np.log(D / D0), np.log(L)
    floor = 1e-8 * float(L.mean())                 # log of a coefficient NNLS set to zero
    theta0 = []
    for _, E, A, B, alpha, beta in _projected_starts(N / N0, D / D0, L, np.linspace(0.05, 1.5, grid))[:keep]:
        theta0.append([math.log(max(A, floor)), math.log(max(B, floor)), math.log(max(E, floor)), alpha, beta])
    for E, A, B, alpha, beta in starts:          # given in N and D: A/N^alpha = A N0^-alpha (N/N0)^-alpha
        theta0.append([math.log(max(A, 1e-300)) - alpha * math.log(N0), math.log(max(B, 1e-300)) -
                       beta * math.log(D0), math.log(max(E, floor)), alpha, beta])
    best = None
    bounds = [(None, None)] * 3 + [(1e-3, 4.0)] * 2
    for t0 in theta0:
        res = optimize.minimize(_huber_objective, np.array(t0), args=(lnN, lnD, lnL, delta), jac=True,
                                method="L-BFGS-B", bounds=bounds,
                                options={"ftol": 1e-15, "gtol": 1e-13, "maxiter": 3000})
        if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
            best = res
    if best is None:
        raise FitFailed("approach 3's optimiser found no finite fit")
    a, b, e, alpha, beta = best.x
    return dict(E=math.exp(e), A=math.exp(a + alpha * math.log(N0)), B=math.exp(b + beta * math.log(D0)),
                alpha=float(alpha), beta=float(beta), huber=float(best.fun), converged=bool(best.success))


def loss_at(params, N, D):
    """Approach 3's L(N, D)."""
    return params["E"] + params["A"] * np.asarray(N, dtype=np.float64) ** -params["alpha"] + \
        params["B"] * np.asarray(D, dtype=np.float64) ** -params["beta"]


def gflops_interpolator(N, gflops):
    """gflops(N) from the runs' (N, gflops) pairs: piecewise linear in log-log between the sizes, extended past
    either end with its last segment's slope (one size: gflops ∝ N)."""
    N, g = np.asarray(N, dtype=np.float64), np.asarray(gflops, dtype=np.float64)
    x = np.unique(np.log(N))
    y = np.array([np.log(g[np.log(N) == v]).mean() for v in x])
    if len(x) == 1:
        return lambda n: np.exp(y[0] + np.log(np.asarray(n, dtype=np.float64)) - x[0])
    lo, hi = (y[1] - y[0]) / (x[1] - x[0]), (y[-1] - y[-2]) / (x[-1] - x[-2])

    def gflops_of(n):
        ln = np.log(np.asarray(n, dtype=np.float64))
        inside = np.interp(ln, x, y)
        return np.exp(np.where(ln < x[0], y[0] + lo * (ln - x[0]), np.where(ln > x[-1], y[-1] + hi * (ln - x[-1]),
                                                                              inside)))
    return gflops_of


def images_at(C, N, gflops_of):
    """D = C / (3 gflops(N) 1e9): the images a budget C buys a model of N parameters (DiT's compute unit)."""
    return C / (3 * gflops_of(N) * 1e9)


def approach3_optimum(params, C, gflops_of, N_range, widen=3.0):
    """The N minimising approach 3's L(N, D(N)) at budget C, searched over N_range widened by `widen` decades
    each way (a log grid, then Brent's method around its best point). Returns {C, N, D, L, at_edge}."""
    lo, hi = math.log(N_range[0]) - widen * math.log(10), math.log(N_range[1]) + widen * math.log(10)

    def f(lnN):
        n = np.exp(lnN)
        return loss_at(params, n, images_at(C, n, gflops_of))

    grid = np.linspace(lo, hi, 121)
    i = int(np.argmin(f(grid)))
    res = optimize.minimize_scalar(f, bounds=(grid[max(i - 1, 0)], grid[min(i + 1, 120)]), method="bounded",
                                   options={"xatol": 1e-9})
    N = float(np.exp(res.x))
    D = float(images_at(C, N, gflops_of))
    return dict(C=float(C), N=N, D=D, L=float(loss_at(params, N, D)), at_edge=i in (0, 120))


#################################################################################
#                                One family's fit                               #
#################################################################################

def fit_family(records, gflops_of=None, starts=(), grid=12, quiet=False):
    """Approaches 2 and 3 on one family's runs, and their compute-optimal predictions at every budget and a decade
    past the largest. Flags of the parabolas are printed unless quiet. Raises FitFailed when a fit cannot be made."""
    family = records[0]["family"]
    budgets = group_runs(records)[family]
    profiles = [isoflop_profile(runs, C) for C, runs in budgets.items()]
    if not quiet:
        for p in profiles:
            for flag in p["flags"]:
                print(f"isoflop: {family} at C={p['C']:.3g}: parabola in {flag}; "
                      f"{'left out of the fits' if 'downward' in flag else 'kept'}", file=sys.stderr)
    N = np.array([r["params"] for r in records], dtype=np.float64)
    if gflops_of is None:
        gflops_of = gflops_interpolator(N, [r["gflops"] for r in records])
    p3 = fit_approach3(N, [r["D"] for r in records], [r["loss"] for r in records], starts=starts, grid=grid)

    with_N = [p for p in profiles if math.isfinite(p["N_star"])]
    with_D = [p for p in profiles if math.isfinite(p["D_star"])]
    if len(with_N) < 2 or len(with_D) < 2:
        raise FitFailed(f"only {min(len(with_N), len(with_D))} budget(s) have a parabola with a minimum; the power "
                        f"laws need 2")
    k_N, a, r2_N = fit_power_law([p["C"] for p in with_N], [p["N_star"] for p in with_N])
    k_D, b, r2_D = fit_power_law([p["C"] for p in with_D], [p["D_star"] for p in with_D])
    frontier = fit_frontier([p["C"] for p in with_N], [p["L_star"] for p in with_N],
                            E=p3["E"] if len(with_N) < 3 else None)
    approach2 = dict(a=a, k_N=k_N, r2_N=r2_N, b=b, k_D=k_D, r2_D=r2_D, frontier=frontier)

    N_range = [float(N.min()), float(N.max())]
    optima = [approach3_optimum(p3, p["C"], gflops_of, N_range) for p in profiles]
    if not quiet and any(o["at_edge"] for o in optima):
        print(f"isoflop: {family}: approach 3's L(N, D) has no minimum within 3 decades of the trained sizes at some "
              f"budgets (alpha {p3['alpha']:.3g}, beta {p3['beta']:.3g}); its optima are the search's edge",
              file=sys.stderr)
    k3N, a3, _ = fit_power_law([o["C"] for o in optima], [o["N"] for o in optima])
    k3D, b3, _ = fit_power_law([o["C"] for o in optima], [o["D"] for o in optima])
    approach3 = dict(p3, a=a3, k_N=k3N, b=b3, k_D=k3D, a_closed=p3["beta"] / (p3["alpha"] + p3["beta"]),
                     b_closed=p3["alpha"] / (p3["alpha"] + p3["beta"]), optima=optima)

    Cs = [p["C"] for p in profiles] + [profiles[-1]["C"] * EXTRAPOLATE]
    predictions = [predict_at(approach2, approach3, C, gflops_of, N_range) for C in Cs]
    return dict(family=family, runs=len(records), budgets=profiles, approach2=approach2, approach3=approach3,
                predictions=predictions, N_range=N_range, _gflops_of=gflops_of)


def predict_at(approach2, approach3, C, gflops_of, N_range):
    """Compute-optimal N*, D*, L* at budget C by both approaches."""
    o = approach3_optimum(approach3, C, gflops_of, N_range)
    return dict(C=float(C),
                approach2=dict(N=approach2["k_N"] * C ** approach2["a"], D=approach2["k_D"] * C ** approach2["b"],
                               L=float(frontier_at(approach2["frontier"], C))),
                approach3=dict(N=o["N"], D=o["D"], L=o["L"]))


def _check_groups(records):
    """One ConfigError listing every family and budget that cannot be fitted (too few sizes or budgets)."""
    if not records:
        raise ConfigError("no complete isoFLOP runs to fit; finish the runs (the same command resumes them) or "
                          "point at the sweep's folder")
    problems = []
    for family, budgets in group_runs(records).items():
        if len(budgets) < 2:
            problems.append(f"{family} has runs at {len(budgets)} budget (C={next(iter(budgets)):.3g}); the power "
                            f"laws need at least 2 budgets (3 for the held-out check): train the size sweep at more "
                            f"train.flops values")
        for C, runs in budgets.items():
            sizes = sorted({r["params"] for r in runs})
            if len(sizes) < 3:
                problems.append(f"{family} at C={C:.3g} has {len(sizes)} model size(s) "
                                f"(N={', '.join(f'{n:.3g}' for n in sizes)}); a parabola needs at least 3: train more "
                                f"sizes around the optimum at that budget or leave its runs out")
    if problems:
        raise ConfigError("; ".join(problems))


#################################################################################
#                                   Bootstrap                                   #
#################################################################################

def _scalars(fit):
    """The bootstrapped numbers of a family fit, by name."""
    a2, a3 = fit["approach2"], fit["approach3"]
    out = {"approach2.a": a2["a"], "approach2.b": a2["b"], "approach2.frontier.E": a2["frontier"]["E"],
           "approach2.frontier.alpha": a2["frontier"]["alpha"]}
    out.update({f"approach3.{k}": a3[k] for k in ("alpha", "beta", "E", "a", "b", "a_closed", "b_closed")})
    for i, p in enumerate(fit["predictions"]):
        for approach in ("approach2", "approach3"):
            out.update({f"predictions.{i}.{approach}.{q}": p[approach][q] for q in ("N", "L")})
    return out


def bootstrap_family(records, fit, resamples=1000, seed=0, progress=True):
    """Resample the runs with replacement within each budget, refit everything `resamples` times (approach 3
    started from the full fit and a coarse projection grid), and return 95% percentile intervals of the exponents,
    E and the predictions, the bands of N*(C), D*(C), L*(C) for the figures, and the failed refits by reason.

    Read the intervals as lower bounds: a resample keeps or drops the few edge runs that pin approach 3's beta and E,
    which narrows their spread; on tests/test_isoflop.py's synthetic sweep those intervals came out about 0.65x the
    spread of the estimates over fresh noise (approach 2's exponents were covered)."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    groups = list(group_runs(records)[fit["family"]].values())
    a3 = fit["approach3"]
    start = [(a3["E"], a3["A"], a3["B"], a3["alpha"], a3["beta"])]
    band_C = np.geomspace(fit["budgets"][0]["C"] / 1.5, fit["budgets"][-1]["C"] * EXTRAPOLATE, 40)
    samples, bands, failures = [], {"N": [], "D": [], "L": []}, {}
    for _ in tqdm(range(resamples), desc=f"bootstrap {fit['family']}", disable=not progress, file=sys.stderr):
        drawn = [runs[i] for runs in groups for i in rng.integers(0, len(runs), len(runs))]
        try:
            refit = fit_family(drawn, gflops_of=fit["_gflops_of"], starts=start, grid=6, quiet=True)
        except (FitFailed, np.linalg.LinAlgError) as error:
            # Counted by kind: the numbers in a message (a loss, a vertex) differ from one resample to the next.
            reason = re.sub(r"-?\d[\d.e+-]*", "#", str(error).split(";")[0])
            failures[reason] = failures.get(reason, 0) + 1
            continue
        samples.append(_scalars(refit))
        a2 = refit["approach2"]
        bands["N"].append(a2["k_N"] * band_C ** a2["a"])
        bands["D"].append(a2["k_D"] * band_C ** a2["b"])
        bands["L"].append(frontier_at(a2["frontier"], band_C))
    ci = {}
    if samples:
        for key in samples[0]:
            values = np.array([s[key] for s in samples], dtype=np.float64)
            values = values[np.isfinite(values)]
            ci[key] = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) else \
                [math.nan, math.nan]
    band = {"C": band_C.tolist()}
    for q, rows in bands.items():
        if rows:
            band[q] = [np.percentile(rows, 2.5, axis=0).tolist(), np.percentile(rows, 97.5, axis=0).tolist()]
    return dict(resamples=resamples, succeeded=len(samples), failed=resamples - len(samples), failures=failures,
                seed=seed, ci=ci, bands=band)


#################################################################################
#                             Held-out prediction                               #
#################################################################################

def predict_holdout(records, gflops_of=None):
    """Fit one family without its largest budget and predict that budget's N* and L* by approach 2 (power law
    and frontier) and approach 3, against the trained runs there: the size against its parabola vertex, in grid
    steps (decades / the median spacing of its sizes), the loss against its best size's mean over seeds, in % of
    the loss and in % of its reducible part L - E (E of the predicting fit). Pass marks: TARGETS."""
    family = records[0]["family"]
    budgets = group_runs(records)[family]
    if len(budgets) < 3:
        raise ConfigError(f"the held-out check of {family} needs 3 budgets (2 to fit, the largest to predict), "
                          f"it has {len(budgets)}; drop --holdout or train another budget")
    C = list(budgets)[-1]
    if gflops_of is None:   # the size -> gflops map is architecture, known before training: all sizes inform it
        gflops_of = gflops_interpolator([r["params"] for r in records], [r["gflops"] for r in records])
    train = [r for r in records if budget_of(r) != C]
    fit = fit_family(train, gflops_of=gflops_of, quiet=True)
    held = isoflop_profile(budgets[C], C)
    observed = dict(C=C, N_vertex=held["N_star"], L_vertex=held["L_star"], best_N=held["best"]["N"],
                    best_loss=held["best"]["loss"], spacing_dex=held["spacing_dex"], flags=held["flags"])
    pred = predict_at(fit["approach2"], fit["approach3"], C, gflops_of, fit["N_range"])
    out = dict(C=C, trained_budgets=[p["C"] for p in fit["budgets"]], observed=observed)
    for approach, E in (("approach2", fit["approach2"]["frontier"]["E"]), ("approach3", fit["approach3"]["E"])):
        N, L = pred[approach]["N"], pred[approach]["L"]
        Lobs = observed["best_loss"]
        steps = abs(math.log10(N) - math.log10(observed["N_vertex"])) / observed["spacing_dex"] \
            if math.isfinite(observed["N_vertex"]) else math.nan
        errors = dict(loss_pct=100 * (L - Lobs) / Lobs, reducible_pct=100 * (L - Lobs) / (Lobs - E),
                      grid_steps=steps)
        # Also against the held-out parabola's vertex: the best trained size sits up to half a grid step off the
        # optimum, so its loss is an upper bound of the optimal loss that a prediction is compared with.
        Lv = observed["L_vertex"]
        vertex_pct = 100 * (L - Lv) / Lv if math.isfinite(Lv) and not held["flags"] else math.nan
        out[approach] = dict(N=N, L=L, E=E, **errors, vertex_loss_pct=vertex_pct,
                             passed={k: bool(abs(v) <= TARGETS[k]) if math.isfinite(v) else None
                                     for k, v in {**errors, "vertex_loss_pct": vertex_pct}.items()})
    return out


#################################################################################
#                            Families and FD mapping                            #
#################################################################################

def crossovers(fits, curve="approach2"):
    """Budgets where two families' frontiers cross, within the budgets' span widened by a decade each way:
    [{families, C, better_below, better_above, within}] (within: inside the budgets both families trained)."""
    out, names = [], sorted(fits)
    for i, f1 in enumerate(names):
        for f2 in names[i + 1:]:
            spans = [(fits[f]["budgets"][0]["C"], fits[f]["budgets"][-1]["C"]) for f in (f1, f2)]
            lo, hi = min(s[0] for s in spans) / 10, max(s[1] for s in spans) * 10
            grid = np.geomspace(lo, hi, 120)   # then Brent's method between the two points of a sign change
            diff = _frontier_curve(fits[f1], curve, grid) - _frontier_curve(fits[f2], curve, grid)
            for j in np.flatnonzero(np.sign(diff[:-1]) * np.sign(diff[1:]) < 0):
                lnC = optimize.brentq(lambda x: float(_frontier_curve(fits[f1], curve, [math.exp(x)])[0] -
                                                      _frontier_curve(fits[f2], curve, [math.exp(x)])[0]),
                                      math.log(grid[j]), math.log(grid[j + 1]))
                below_first = diff[j] < 0
                C = math.exp(lnC)
                out.append(dict(families=[f1, f2], C=C, better_below=f1 if below_first else f2,
                                better_above=f2 if below_first else f1,
                                within=max(s[0] for s in spans) <= C <= min(s[1] for s in spans)))
    return out


def _frontier_curve(fit, curve, C):
    """L*(C) on a grid: approach 2's fitted frontier, or approach 3's loss at its optimum."""
    if curve == "approach2":
        return frontier_at(fit["approach2"]["frontier"], C)
    return np.array([approach3_optimum(fit["approach3"], c, fit["_gflops_of"], fit["N_range"])["L"] for c in C])


def fd_mapping(records):
    """FD = k loss^p (least squares in log-log, with R²) and Spearman's rank correlation, over the runs with an FD:
    all families together and each family; None with fewer than 3 such runs."""
    def one(rows):
        if len(rows) < 3:
            return None
        loss, fd = [r["loss"] for r in rows], [r["fd"] for r in rows]
        k, p, r2 = fit_power_law(loss, fd)
        rho, pvalue = stats.spearmanr(loss, fd)
        return dict(runs=len(rows), k=k, p=p, r2=r2, spearman=float(rho), spearman_p=float(pvalue))

    rows = [r for r in records if r.get("fd") is not None]
    if len(rows) < 3:
        return None
    features = sorted({r.get("fd_features") or "inception" for r in rows})
    if len(features) > 1:
        print(f"isoflop: the FDs come from different feature networks ({', '.join(features)}), which are not "
              f"comparable; no loss -> FD mapping (rescore them with --fd-draws)", file=sys.stderr)
        return dict(features=features, all=None, families={})
    families = sorted({r["family"] for r in rows})
    return dict(features=features, all=one(rows),
                families={f: one([r for r in rows if r["family"] == f]) for f in families} if len(families) > 1
                else {})


def _one_blas_thread():
    """A context running BLAS on one thread: every matrix here is tiny, and OpenBLAS's threads only contend (on a
    busy machine L-BFGS-B's steps ran 100x slower with them). A no-op without threadpoolctl (scikit-learn's)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def fit_isoflop(records, bootstrap=1000, seed=0, holdout=None, progress=True):
    """The whole analysis of complete-run records (load_isoflop_runs): per family, approaches 2 and 3, the
    bootstrap intervals (bootstrap=0: none), the held-out check (holdout None: when a family has >= 3 budgets);
    the frontiers' crossovers between families; the loss -> FD mapping. Bad input raises one ConfigError."""
    _check_groups(records)
    with _one_blas_thread():
        return _fit_isoflop(records, bootstrap, seed, holdout, progress)


def _fit_isoflop(records, bootstrap, seed, holdout, progress):
    fits = {}
    for family, budgets in group_runs(records).items():
        runs = [r for rs in budgets.values() for r in rs]
        try:
            fit = fit_family(runs)
        except FitFailed as error:
            raise ConfigError(f"{family}: {error}; add sizes around the optimum at the flagged budgets") from None
        fit["bootstrap"] = bootstrap_family(runs, fit, bootstrap, seed, progress) if bootstrap else None
        if fit["bootstrap"] and fit["bootstrap"]["failed"]:
            print(f"isoflop: {family}: {fit['bootstrap']['failed']} of {bootstrap} bootstrap refits failed "
                  f"({fit['bootstrap']['failures']})", file=sys.stderr)
        wants = len(budgets) >= 3 if holdout is None else holdout
        try:
            fit["holdout"] = predict_holdout(runs, fit["_gflops_of"]) if wants else None
        except FitFailed as error:
            fit["holdout"] = dict(error=str(error))
            print(f"isoflop: {family}: the held-out fit failed: {error}", file=sys.stderr)
        fits[family] = fit
    return dict(families=list(fits), fits=fits, records=records,
                crossovers={c: crossovers(fits, c) for c in ("approach2", "approach3")} if len(fits) > 1 else None,
                fd=fd_mapping(records))


#################################################################################
#                                    Report                                     #
#################################################################################

def _f(x, spec=".4g"):
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _ci(fit, key, spec=".3f"):
    boot = fit.get("bootstrap")
    if not boot or key not in boot["ci"]:
        return "–"
    lo, hi = boot["ci"][key]
    return f"[{_f(lo, spec)}, {_f(hi, spec)}]"


def _pass(flag):
    return "–" if flag is None else ("pass" if flag else "FAIL")


def markdown_report(result):
    """The report: runs, per-budget vertices, exponents with 95% intervals, predictions, the held-out check, the
    families' crossover and the FD mapping."""
    metric = result.get("metric", "eval_loss")
    lines = [f"# isoFLOP analysis ({metric})", "",
             f"{len(result['records'])} complete runs; C in the DiT paper's unit (3 × forward multiply-adds × "
             f"images; hardware FLOPs are 2×), D in images.", ""]
    if result.get("left_out"):
        lines += ["Left out (incomplete): " + "; ".join(f"{r['run']} ({r['reason']})" for r in result["left_out"]),
                  ""]
    lines += ["## Runs", "", "| run | family | width | N | Gflops | C | seed | steps | D | loss ± SE | FD |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["records"], key=lambda r: (r["family"], r["flops"], r["params"], r["seed"] or 0)):
        fd = _f(r["fd"], ".4g") + (f" ± {_f(r['fd_se'], '.2g')}" if r.get("fd_se") else "")
        lines.append(f"| {r['run']} | {r['family']} | {_f(r['width'], 'd')} | "
                     f"{r['params'] / 1e6:.4g}M | {r['gflops']:.4g} | {r['flops']:.3g} | {_f(r['seed'], 'd')} | "
                     f"{r['steps']} | {r['D']:.3g} | {r['loss']:.5f} ± {_f(r['loss_se'], '.2g')} | {fd} |")
    lines += ["", "## Approach 2: isoFLOP vertices", "",
              "| family | C | runs | sizes | grid step (dex) | N* | D* | L* | best size (mean loss) | flags |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for family, fit in result["fits"].items():
        for p in fit["budgets"]:
            lines.append(f"| {family} | {p['C']:.3g} | {p['runs']} | {p['sizes']} | {p['spacing_dex']:.3f} | "
                         f"{_f(p['N_star'], '.4g')} | {_f(p['D_star'], '.4g')} | {_f(p['L_star'], '.5f')} | "
                         f"{p['best']['N']:.4g} ({p['best']['loss']:.5f}) | {'; '.join(p['flags']) or '–'} |")
    lines += ["", "## Fitted laws (95% bootstrap intervals)", ""]
    for family, fit in result["fits"].items():
        boot = fit.get("bootstrap")
        a2, a3, fr = fit["approach2"], fit["approach3"], fit["approach2"]["frontier"]
        note = (f"{boot['succeeded']} of {boot['resamples']} resamples (seed {boot['seed']}), "
                f"{boot['failed']} failed" + (f": {boot['failures']}" if boot["failures"] else "")) if boot \
            else "no bootstrap"
        lines += [f"### {family} ({fit['runs']} runs, {len(fit['budgets'])} budgets; {note})", "",
                  "| approach | quantity | value | 95% CI |", "|---|---|---|---|",
                  f"| 2 | a in N* = k_N·C^a (k_N = {a2['k_N']:.4g}, R² {a2['r2_N']:.4f}) | {a2['a']:.4f} | "
                  f"{_ci(fit, 'approach2.a')} |",
                  f"| 2 | b in D* = k_D·C^b (k_D = {a2['k_D']:.4g}, R² {a2['r2_D']:.4f}) | {a2['b']:.4f} | "
                  f"{_ci(fit, 'approach2.b')} |",
                  f"| 2 | α_C in L* = E + A·C^−α_C (A = {fr['A']:.4g}) | {fr['alpha']:.4f} | "
                  f"{_ci(fit, 'approach2.frontier.alpha')} |",
                  f"| 2 | E of the frontier{' (fixed: approach 3)' if fr['E_fixed'] else ''} | {fr['E']:.4f} | "
                  f"{_ci(fit, 'approach2.frontier.E', '.4f')} |",
                  f"| 3 | α in A/N^α (A = {a3['A']:.4g}) | {a3['alpha']:.4f} | {_ci(fit, 'approach3.alpha')} |",
                  f"| 3 | β in B/D^β (B = {a3['B']:.4g}) | {a3['beta']:.4f} | {_ci(fit, 'approach3.beta')} |",
                  f"| 3 | E | {a3['E']:.4f} | {_ci(fit, 'approach3.E', '.4f')} |",
                  f"| 3 | a of the optima N*(C) (gflops(N) from the runs) | {a3['a']:.4f} | "
                  f"{_ci(fit, 'approach3.a')} |",
                  f"| 3 | b of the optima D*(C) | {a3['b']:.4f} | {_ci(fit, 'approach3.b')} |",
                  f"| 3 | β/(α+β) (a if gflops ∝ N) | {a3['a_closed']:.4f} | {_ci(fit, 'approach3.a_closed')} |",
                  ""]
        if not a3["converged"]:
            lines += ["Approach 3's optimiser stopped without reporting convergence; treat its numbers with care.", ""]
        lines += ["| C | approach 2 N* | approach 2 L* | approach 3 N* | approach 3 L* |", "|---|---|---|---|---|"]
        last = len(fit["predictions"]) - 1
        for i, p in enumerate(fit["predictions"]):
            cells = [f"{p['C']:.3g}" + (" (extrapolated)" if i == last else "")]
            for approach in ("approach2", "approach3"):
                for q, spec in (("N", ".4g"), ("L", ".5f")):
                    ci = _ci(fit, f"predictions.{i}.{approach}.{q}", spec)
                    cells.append(f"{p[approach][q]:{spec}}" + (f" {ci}" if ci != "–" else ""))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += _holdout_lines(result)
    lines += _families_lines(result)
    lines += _fd_lines(result)
    return "\n".join(lines) + "\n"


def _holdout_lines(result):
    held = {f: fit["holdout"] for f, fit in result["fits"].items() if fit.get("holdout")}
    if not held:
        return []
    lines = ["## Held-out prediction of the largest budget", "",
             f"Targets: loss within {TARGETS['loss_pct']:g}% (and its reducible part L − E within "
             f"{TARGETS['reducible_pct']:g}%) of the best size's mean loss over seeds, N* within "
             f"{TARGETS['grid_steps']:g} grid step of the budget's parabola vertex; the loss also against that "
             f"vertex's L* (the best trained size sits up to half a grid step off the optimum).", "",
             "| family | C | approach | N* predicted | vertex N* | grid steps | L* predicted | best loss | "
             "loss error | reducible error | vertex L* | error vs vertex |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for family, h in held.items():
        if "error" in h:
            lines.append(f"| {family} | – | – | the fit without the largest budget failed: {h['error']} |||||||||")
            continue
        o = h["observed"]
        for approach in ("approach2", "approach3"):
            p = h[approach]
            ok = p["passed"]
            lines.append(f"| {family} | {h['C']:.3g} | {approach[-1]} | {p['N']:.4g} | {_f(o['N_vertex'])} | "
                         f"{_f(p['grid_steps'], '.2f')} {_pass(ok['grid_steps'])} | {p['L']:.5f} | "
                         f"{o['best_loss']:.5f} | {p['loss_pct']:+.3f}% {_pass(ok['loss_pct'])} | "
                         f"{p['reducible_pct']:+.2f}% {_pass(ok['reducible_pct'])} | {_f(o['L_vertex'], '.5f')} | "
                         f"{_f(p['vertex_loss_pct'], '+.3f')}% {_pass(ok['vertex_loss_pct'])} |")
    return lines + [""]


def _families_lines(result):
    if not result.get("crossovers"):
        return []
    lines = ["## Families", ""]
    for curve, found in result["crossovers"].items():
        name = "approach 2 frontiers" if curve == "approach2" else "approach 3 frontiers"
        if not found:
            fits = result["fits"]
            C = fits[result["families"][0]]["budgets"][-1]["C"]
            best = min(fits, key=lambda f: float(_frontier_curve(fits[f], curve, [C])[0]))
            lines.append(f"- {name}: no crossing within a decade of the budgets; {best} is lower throughout.")
        for c in found:
            lines.append(f"- {name}: {c['families'][0]} and {c['families'][1]} cross at C = {c['C']:.3g} "
                         f"({'within' if c['within'] else 'outside'} the trained budgets): {c['better_below']} is "
                         f"compute-optimal below, {c['better_above']} above.")
    return lines + [""]


def _fd_lines(result):
    fd = result.get("fd")
    if not fd:
        return []
    lines = ["## Loss → FD", ""]
    if fd["all"] is None:
        return lines + [f"FDs from different feature networks ({', '.join(fd['features'])}); no mapping.", ""]
    for name, m in [("all runs", fd["all"])] + list(fd["families"].items()):
        if m is not None:
            lines.append(f"- {name} ({m['runs']} runs, {fd['features'][0]} features): FD = {m['k']:.4g}·loss^"
                         f"{m['p']:.3f} (R² {m['r2']:.3f}); Spearman ρ = {m['spearman']:.3f} "
                         f"(p = {m['spearman_p']:.2g})")
    return lines + [""]


#################################################################################
#                                    Figures                                    #
#################################################################################

def _family_style(family):
    return FAMILY_STYLE.get(family, ("^", ":", "tab:blue"))


def _finish(ax):
    """Plain log-axis labels, a light grid, a small legend."""
    _tidy_log_axes(ax)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_isoflop(result, path):
    """One panel per family: loss against N, a colour per budget, a marker per seed, the parabolas and vertices."""
    import matplotlib.pyplot as plt
    seeds = sorted({r["seed"] for r in result["records"]}, key=lambda s: (s is None, s))
    markers = dict(zip(seeds, "osD^vP*Xph" * 10))
    fig, axes = plt.subplots(1, len(result["fits"]), figsize=(6.4 * len(result["fits"]), 4.8), squeeze=False)
    for ax, (family, fit) in zip(axes[0], result["fits"].items()):
        cmap = plt.get_cmap("viridis")
        for i, p in enumerate(fit["budgets"]):
            color = cmap(i / max(len(fit["budgets"]) - 1, 1) * 0.9)
            runs = [r for r in result["records"] if r["family"] == family and budget_of(r) == p["C"]]
            for seed in seeds:
                mine = [r for r in runs if r["seed"] == seed]
                if mine:
                    ax.scatter([r["params"] for r in mine], [r["loss"] for r in mine], color=color, s=22,
                               marker=markers[seed], zorder=3)
            x = np.linspace(math.log10(p["N_range"][0]) - 0.1, math.log10(p["N_range"][1]) + 0.1, 100)
            ax.plot(10 ** x, parabola_at(p["parabola_N"], x), color=color, lw=1, label=f"C = {p['C']:.3g}")
            if math.isfinite(p["N_star"]):
                ax.scatter([p["N_star"]], [p["L_star"]], marker="*" if not p["flags"] else "X", s=140,
                           color=color, edgecolor="k", zorder=4)
        if len(seeds) > 1:
            for seed in seeds:
                ax.scatter([], [], marker=markers[seed], color="grey", label=f"seed {seed}")
        ax.scatter([], [], marker="*", s=100, color="w", edgecolor="k", label="vertex (X: flagged)")
        ax.set(xscale="log", xlabel="parameters N", ylabel=result.get("metric", "eval_loss"),
               title=f"{family}: isoFLOP profiles")
        _finish(ax)
    _save(fig, path)


def plot_frontier(result, path):
    """L*(C) per family with E + A C^-alpha_C (approach 2, band: bootstrap) and approach 3's optimum loss, reaching
    a decade past the largest budget; the held-out budget hollow, its prediction as a cross."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for family, fit in result["fits"].items():
        marker, line, color = _family_style(family)
        color = color if len(result["fits"]) > 1 else "k"
        Cs = np.array([p["C"] for p in fit["budgets"]])
        Ls = np.array([p["L_star"] for p in fit["budgets"]])
        held = fit.get("holdout") if fit.get("holdout") and "error" not in fit["holdout"] else None
        inner = slice(None, -1) if held else slice(None)
        ax.scatter(Cs[inner], Ls[inner], marker=marker, color=color, zorder=3, label=f"{family} L* (vertices)")
        grid = np.geomspace(Cs[0] / 1.5, Cs[-1] * EXTRAPOLATE, 100)
        fr = fit["approach2"]["frontier"]
        ax.plot(grid, frontier_at(fr, grid), line, color=color, lw=1.2,
                label=f"{family}: {fr['E']:.3f} + {fr['A']:.3g}·C^−{fr['alpha']:.3f}")
        band = (fit.get("bootstrap") or {}).get("bands", {})
        if "L" in band:
            ax.fill_between(band["C"], band["L"][0], band["L"][1], color=color, alpha=0.12, lw=0)
        coarse = np.geomspace(grid[0], grid[-1], 12)     # each point a 1-D minimisation
        ax.plot(coarse, _frontier_curve(fit, "approach3", coarse), ":", color=color, lw=1,
                label=f"{family}: approach 3, min over N of L(N, D)")
        if held:
            ax.scatter(Cs[-1:], Ls[-1:], marker=marker, facecolor="none", edgecolor=color, s=60, zorder=3,
                       label=f"{family} held-out budget")
            ax.scatter([held["C"]], [held["approach2"]["L"]], marker="x", color=color, s=50, zorder=4,
                       label=f"{family} its prediction (approach 2)")
    for c in (result.get("crossovers") or {}).get("approach2", []):
        ax.axvline(c["C"], color="grey", ls="--", lw=0.8, label=f"crossover C = {c['C']:.3g}")
    ax.set(xscale="log", yscale="log", xlabel="training compute C (3 × MACs × images)",
           ylabel=f"min {result.get('metric', 'eval_loss')}", title="compute-optimal frontier")
    _finish(ax)
    _save(fig, path)


def plot_optimal(result, path):
    """N*(C) and D*(C): the parabola vertices, the power laws (band: bootstrap) and approach 3's optima."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, q, name in ((axes[0], "N", "parameters N*"), (axes[1], "D", "images D*")):
        for family, fit in result["fits"].items():
            marker, line, color = _family_style(family)
            color = color if len(result["fits"]) > 1 else "k"
            a2 = fit["approach2"]
            Cs = [p["C"] for p in fit["budgets"]]
            ax.scatter(Cs, [p[f"{q}_star"] for p in fit["budgets"]], marker=marker, color=color, zorder=3,
                       label=f"{family} vertices")
            grid = np.geomspace(Cs[0] / 1.5, Cs[-1] * EXTRAPOLATE, 50)
            k, e = (a2["k_N"], a2["a"]) if q == "N" else (a2["k_D"], a2["b"])
            ax.plot(grid, k * grid ** e, line, color=color, lw=1.2, label=f"{family}: {k:.3g}·C^{e:.3f}")
            band = (fit.get("bootstrap") or {}).get("bands", {})
            if q in band:
                ax.fill_between(band["C"], band[q][0], band[q][1], color=color, alpha=0.12, lw=0)
            coarse = np.geomspace(grid[0], grid[-1], 12)
            optima = [approach3_optimum(fit["approach3"], c, fit["_gflops_of"], fit["N_range"]) for c in coarse]
            ax.plot(coarse, [o[q] for o in optima], ":", color=color, lw=1,
                    label=f"{family}: approach 3 (C^{fit['approach3']['a' if q == 'N' else 'b']:.3f})")
        ax.set(xscale="log", yscale="log", xlabel="training compute C (3 × MACs × images)", ylabel=name,
               title=f"compute-optimal {name}")
        _finish(ax)
    _save(fig, path)


def plot_loss_vs_fd(result, path):
    """FD against the loss, one colour per family, with the power-law fit over all runs."""
    import matplotlib.pyplot as plt
    fd = result["fd"]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    rows = [r for r in result["records"] if r.get("fd") is not None]
    for family in sorted({r["family"] for r in rows}):
        marker, _, color = _family_style(family)
        mine = [r for r in rows if r["family"] == family]
        ax.scatter([r["loss"] for r in mine], [r["fd"] for r in mine], marker=marker, color=color, s=20, label=family)
        own = fd["families"].get(family)
        if own is not None:
            x = np.geomspace(min(r["loss"] for r in mine), max(r["loss"] for r in mine), 20)
            ax.plot(x, own["k"] * x ** own["p"], "-", color=color, lw=0.8,
                    label=f"{family}: FD = {own['k']:.3g}·loss^{own['p']:.2f} (R² {own['r2']:.2f})")
    m = fd.get("all")
    if m is not None:
        x = np.geomspace(min(r["loss"] for r in rows), max(r["loss"] for r in rows), 50)
        ax.plot(x, m["k"] * x ** m["p"], "--", color="grey",
                label=f"FD = {m['k']:.3g}·loss^{m['p']:.2f} (R² {m['r2']:.2f}, ρ {m['spearman']:.2f})")
    ax.set(xscale="log", yscale="log", xlabel=result.get("metric", "eval_loss"), ylabel=f"FD ({fd['features'][0]})",
           title="FD against evaluation loss (final checkpoints)")
    _finish(ax)
    _save(fig, path)


#################################################################################
#                                    Output                                     #
#################################################################################

def _jsonable(x):
    """The result as JSON: NaN -> null, numpy -> Python, private keys (callables) dropped."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_report(result, out_dir):
    """Write the figures, isoflop.md and isoflop.json into out_dir; returns {name: path} of the figures and adds
    the markdown to result["markdown"]."""
    import matplotlib
    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = {"isoflop": out_dir / "isoflop.png", "frontier": out_dir / "frontier.png",
              "optimal": out_dir / "optimal.png"}
    plot_isoflop(result, images["isoflop"])
    plot_frontier(result, images["frontier"])
    plot_optimal(result, images["optimal"])
    if result.get("fd") and result["fd"].get("all"):
        images["loss_vs_fd"] = out_dir / "loss_vs_fd.png"
        plot_loss_vs_fd(result, images["loss_vs_fd"])
    result["markdown"] = markdown_report(result)
    atomic_write_text(out_dir / "isoflop.md", result["markdown"])
    saved = {k: v for k, v in result.items() if k != "markdown"}
    atomic_write_text(out_dir / "isoflop.json", json.dumps(_jsonable(
        {**saved, "images": {k: str(v) for k, v in images.items()}}), indent=2) + "\n")
    return images


def summary_scalars(result):
    """The fitted numbers as flat W&B keys: isoflop/<family>/<approach>/<name>."""
    out = {}
    for family, fit in result["fits"].items():
        a2, a3 = fit["approach2"], fit["approach3"]
        out.update({f"isoflop/{family}/approach2/{k}": a2[k] for k in ("a", "b", "k_N", "k_D")})
        out.update({f"isoflop/{family}/approach2/frontier_{k}": a2["frontier"][k] for k in ("E", "A", "alpha")})
        out.update({f"isoflop/{family}/approach3/{k}": a3[k] for k in ("E", "A", "B", "alpha", "beta", "a", "b")})
        for key, (lo, hi) in ((fit.get("bootstrap") or {}).get("ci") or {}).items():
            if not key.startswith("predictions"):
                out[f"isoflop/{family}/ci/{key}/lo"], out[f"isoflop/{family}/ci/{key}/hi"] = lo, hi
    return {k: v for k, v in out.items() if v is not None and math.isfinite(v)}


def log_to_wandb(result, images, out_dir, project="dit", group=None, mode=None):
    """Log the figures, the runs table and the exponents to one summary W&B run kept in out_dir (in `group`;
    offline without an API key; a re-run continues it). Returns the logged scalars."""
    import wandb

    from utils.logger import RunLogger
    scalars = summary_scalars(result)
    logger = RunLogger(out_dir, {"isoflop": {"metric": result.get("metric"), "families": result["families"],
                                             "runs": len(result["records"])}},
                       backend="wandb", project=project, group=group, tags=["isoflop"],
                       name=f"isoflop_{Path(out_dir).parent.name}", mode=mode)
    for key, path in images.items():
        logger.log_image(key, path, 0)
    columns = ["run", "family", "model", "width", "params", "gflops", "flops", "seed", "steps", "D", "loss",
               "loss_se", "fd"]
    table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in result["records"]])
    logger.wandb.log({"isoflop_table": table, "step": 0, **scalars})
    logger.finish()
    return scalars


#################################################################################
#                                 Command line                                  #
#################################################################################

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m evaluation.scaling isoflop", description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", help="run folders, or folders searched recursively for metrics.jsonl")
    p.add_argument("--out", default=None, help="output folder (default: <common folder of the runs>/isoflop)")
    p.add_argument("--metric", default="eval_loss", choices=METRICS, help="the final evaluation loss to fit")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: no intervals)")
    p.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed")
    p.add_argument("--holdout", action=argparse.BooleanOptionalAction, default=None,
                   help="predict the largest budget from the others (default: for families with >= 3 budgets)")
    p.add_argument("--fd-draws", type=int, default=0,
                   help="score every run's final checkpoint K times (sample.py seed=k), instead of its fid rows")
    p.add_argument("--fd-samples", type=int, default=1000, help="--fd-draws: samples per draw")
    p.add_argument("--features", default="digits", choices=("inception", "digits", "dinov2"),
                   help="--fd-draws: the feature network (default digits)")
    p.add_argument("--ref", default=None, help="--fd-draws: reference statistics (digits: the train split)")
    p.add_argument("--weights", default=None, help="--fd-draws: the feature network's weights file")
    p.add_argument("--sample-args", nargs="*", default=[], help="--fd-draws: extra sample.py overrides")
    p.add_argument("--wandb", action="store_true", help="also log the figures, table and exponents to W&B")
    p.add_argument("--project", default="dit", help="W&B project")
    p.add_argument("--group", default=None, help="W&B group (e.g. the sweep's logger.group)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.bootstrap < 0 or args.fd_draws < 0:
        raise ConfigError("--bootstrap and --fd-draws count resamples and draws: give 0 or more")
    records, left_out = load_isoflop_runs(args.paths, args.metric)
    if args.fd_draws:
        for record in tqdm(records, desc=f"FD x {args.fd_draws} draws", unit="run"):
            score_fd_draws(record, args.fd_draws, args.fd_samples, args.features, args.ref, args.weights,
                           args.sample_args)
    result = fit_isoflop(records, bootstrap=args.bootstrap, seed=args.seed, holdout=args.holdout)
    result.update(metric=args.metric, left_out=left_out)
    if args.out is None:
        paths = [Path(p).resolve() for p in args.paths]
        out_dir = (paths[0] if len(paths) == 1 else Path(os.path.commonpath(paths))) / "isoflop"
    else:
        out_dir = Path(args.out)
    images = write_report(result, out_dir)
    if args.wandb:
        log_to_wandb(result, images, out_dir, project=args.project, group=args.group)
    print(result["markdown"])
    print(f"wrote {', '.join(p.name for p in images.values())}, isoflop.md, isoflop.json to {out_dir}")
    result.update(images=images, out_dir=out_dir)
    return result


if __name__ == "__main__":
    from utils.errors import report_user_errors
    report_user_errors(main)()
