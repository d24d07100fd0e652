"""EDM2's post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
2312.02696, Sec. 3 and App. C): the math, and power-function EMAs to track during training.

A power-function EMA at training time t (counted in training images) averages the raw weights theta(tau), tau in
[0, t], with the profile p_t(tau) = (gamma + 1) / t * (tau / t)^gamma. Its length is the relative standard deviation
sigma_rel = std(p_t) / t = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))), which does not depend on t. Snapshots
of a few such EMAs (EDM2: sigma_rel 0.05 and 0.10) stored during training let any other profile be reconstructed
after training as their least-squares combination: its coefficients solve A x = b with A the Gram matrix of the
stored profiles' inner products and b their inner products with the target, both in closed form.

In training (`ema.posthoc=true`): train.py tracks `ema.stds` with PowerEMA and every `ema.snapshot_every` images
writes each as run_dir/phema/phema-<images>-<sigma_rel>.pt (fp32, atomically); the tracker's state is in every
checkpoint, so a resumed run continues it exactly. After training:

    python -m utils.phema RUN_DIR --sigma-rel 0.05 0.08 0.12 [--images N]

writes run_dir/phema/reconstructed-<images>-<sigma_rel>.pt for each, a checkpoint sample.py reads
(`sample.py ckpt=<that file>`), from the snapshots up to N images (default: the newest snapshot). With --sweep it also
samples each, scores it (digits features on digits runs, Inception elsewhere with --ref) and plots FD against
sigma_rel with the best marked (run_dir/phema/phema_sweep.png and .json).
"""

import argparse
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from utils.errors import ConfigError

SIGMA_REL_MAX = 1 / math.sqrt(12)   # gamma -> 0: the uniform average over all of training


def gamma_to_sigma_rel(gamma):
    """The relative standard deviation of a power-function profile with exponent gamma (> 0)."""
    gamma = np.asarray(gamma, dtype=np.float64)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel):
    """The exponent of the profile with this sigma_rel: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0, i.e. (gamma + 2)^2 (gamma + 3) = s^-2 (gamma + 1)."""
    s = float(sigma_rel)
    if not 0 < s < SIGMA_REL_MAX:
        raise ConfigError(f"sigma_rel={s} is outside (0, 1/sqrt(12) = {SIGMA_REL_MAX:.5f}): a power-function EMA "
                         f"cannot be longer than the uniform average of the whole run")
    roots = np.roots([1.0, 7.0, 16.0 - s ** -2, 12.0 - s ** -2])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_beta(gamma, t_next, t_delta):
    """The decay of one update that advances the EMA from t_next - t_delta to t_next images: (1 - dt/t)^(gamma+1)."""
    return (1 - t_delta / t_next) ** (gamma + 1)


def profile_inner(t_a, gamma_a, t_b, gamma_b):
    """<p_a, p_b> = integral of the product of two power-function profiles (ending at t_a and t_b), float64,
    broadcasting over arrays."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    # The product is nonzero on [0, min(t_a, t_b)]; integrated, and written with a ratio <= 1 (no overflow):
    # (g_a+1)(g_b+1) / ((g_a+g_b+1) max(t_a, t_b)) * (min/max)^g, g the exponent of the profile that ends later.
    ratio = np.where(t_a < t_b, (t_a / t_b) ** gamma_b, (t_b / t_a) ** gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b)) * ratio


def solve_coefficients(times, gammas, target_time, target_gamma):
    """Coefficients x (N,) with sum 1 such that sum_i x_i p_i is the least-squares fit of the target profile, for
    stored profiles i ending at times[i] with exponents gammas[i]."""
    times, gammas = np.asarray(times, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    if np.any(times > target_time) or np.any(times <= 0):
        raise ConfigError("post-hoc EMA: use snapshots taken after the start and no later than the target time")
    gram = profile_inner(times[:, None], gammas[:, None], times[None, :], gammas[None, :])
    rhs = profile_inner(times, gammas, target_time, target_gamma)
    x = np.linalg.solve(gram, rhs)
    return x / x.sum()


class PowerEMA:
    """Power-function EMAs of a module's parameters for several sigma_rel, advanced by images seen (EDM2's
    PowerFunctionEMA): update(model, t_next, t_delta) after each step; the first update copies the network."""

    def __init__(self, model, sigma_rels=(0.05, 0.10)):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.emas = [[p.detach().clone().float() for p in model.parameters()] for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, model, t_next, t_delta):
        params = [p.detach().float() for p in model.parameters()]
        for gamma, ema in zip(self.gammas, self.emas):
            beta = power_beta(gamma, t_next, t_delta)
            torch._foreach_lerp_(ema, params, 1 - beta)

    def state_dict(self):
        return {"sigma_rels": list(self.sigma_rels), "emas": [[t.clone() for t in ema] for ema in self.emas]}

    def load_state_dict(self, state):
        if list(state["sigma_rels"]) != list(self.sigma_rels):
            raise ConfigError(f"the saved post-hoc EMAs track sigma_rel {state['sigma_rels']}, the config "
                             f"{list(self.sigma_rels)}")
        self.emas = [[t.clone() for t in ema] for ema in state["emas"]]

    def snapshot_states(self, model):
        """{sigma_rel: state_dict of `model` with that EMA's parameters (fp32) and the model's buffers}."""
        names = [name for name, _ in model.named_parameters()]
        states = {}
        for sigma_rel, ema in zip(self.sigma_rels, self.emas):
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            state.update({name: value.clone() for name, value in zip(names, ema)})
            states[sigma_rel] = state
        return states


SNAPSHOT = re.compile(r"phema-(\d+)-(\d+\.\d+)\.pt$")


def snapshot_path(folder, images, sigma_rel):
    return Path(folder) / f"phema-{int(images):010d}-{sigma_rel:.3f}.pt"


def write_snapshots(folder, tracker, model, images, extra):
    """One file per tracked sigma_rel at `images` images seen (temporary file + rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for sigma_rel, state in tracker.snapshot_states(model).items():
        path = snapshot_path(folder, images, sigma_rel)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save({"ema": state, "images": int(images), "sigma_rel": sigma_rel,
                    "gamma": sigma_rel_to_gamma(sigma_rel), **extra}, tmp)
        os.replace(tmp, path)


def list_snapshots(folder):
    """[(images, sigma_rel, path)] of the snapshots in a folder, by images then sigma_rel."""
    found = [(int(m.group(1)), float(m.group(2)), p) for p in Path(folder).glob("phema-*.pt")
             if (m := SNAPSHOT.search(p.name))]
    return sorted(found)


def reconstruct(folder, sigma_rel, images=None, sources=None):
    """(state_dict, info) of the EMA with `sigma_rel` at `images` images seen (default: the newest snapshot),
    the least-squares combination of the snapshots taken up to then (only those of the sigma_rels in `sources`,
    when given)."""
    snapshots = [s for s in list_snapshots(folder)
                 if sources is None or any(abs(s[1] - float(v)) < 5e-4 for v in sources)]
    if not snapshots:
        raise ConfigError(f"no post-hoc EMA snapshots in {folder}; train with ema.posthoc=true (and "
                         f"ema.snapshot_every=<images>) to write them")
    images = snapshots[-1][0] if images is None else int(images)
    used = [s for s in snapshots if 0 < s[0] <= images]
    if images not in {s[0] for s in used}:
        raise ConfigError(f"--images {images} is no snapshot time in {folder}; choose one of "
                         f"{sorted({s[0] for s in snapshots})}")
    x = solve_coefficients([s[0] for s in used], [sigma_rel_to_gamma(s[1]) for s in used], images,
                           sigma_rel_to_gamma(sigma_rel))
    total, last = None, None
    for coefficient, (_, _, path) in zip(x, used):
        last = torch.load(path, map_location="cpu", weights_only=True)
        weighted = {k: v.double() * float(coefficient) for k, v in last["ema"].items() if v.is_floating_point()}
        total = weighted if total is None else {k: total[k] + weighted[k] for k in total}
    state = {k: (total[k].float() if k in total else v) for k, v in last["ema"].items()}
    return state, {"images": images, "sigma_rel": sigma_rel, "snapshots": len(used),
                   "coefficients": [float(c) for c in x], "last": last}


def sweep(written, sigma_rels, out, sample_args=(), features=None, reference=None, weights=None):
    """Score each reconstruction: sample.py's samples, FID (FD) on `features` against `reference` (default: the
    digits network and the digits' train split for digits runs), plotted against sigma_rel with the best marked."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaluation import ImageSource, digits_reference, evaluate
    import sample as sample_script
    from hydra import compose, initialize_config_dir
    config_dir = str(Path(__file__).resolve().parents[1] / "conf")
    rows = []
    for path, sigma_rel in zip(written, sigma_rels):
        data = torch.load(path, map_location="cpu", weights_only=True)["config"]["data"]["name"]
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose("sample", overrides=[f"ckpt={path}", f"out={Path(out) / f'samples-{sigma_rel:.3f}'}",
                                               *sample_args])
        samples = sample_script.run(cfg) / "samples.npz"
        arrays = np.load(samples)
        net = features or ("digits" if data == "digits" else "inception")
        ref = reference or (digits_reference() if net == "digits" else None)
        if ref is None:
            raise ConfigError(f"the sweep scores with {net} features: give --ref <statistics npz made with them>")
        result = evaluate(ImageSource.from_array(arrays["arr_0"], labels=arrays["arr_1"]), ref, features=net,
                          weights=weights, progress=False)
        rows.append({"sigma_rel": sigma_rel, "fid": float(result["fid"]), "features": net,
                     **({"class_accuracy": float(result["class_accuracy"])} if "class_accuracy" in result else {})})
        print(f"sigma_rel {sigma_rel:.3f}: FD ({net}) {rows[-1]['fid']:.4f}")
    best = min(rows, key=lambda r: r["fid"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["sigma_rel"] for r in rows], [r["fid"] for r in rows], "o-")
    ax.plot([best["sigma_rel"]], [best["fid"]], "r*", markersize=14, label=f"best: sigma_rel {best['sigma_rel']:.3f}")
    ax.set_xlabel("EMA length sigma_rel (post-hoc)")
    ax.set_ylabel(f"FD ({best['features']} features)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(out) / "phema_sweep.png", dpi=130)
    (Path(out) / "phema_sweep.json").write_text(json.dumps({"rows": rows, "best": best}, indent=1))
    print(f"best sigma_rel {best['sigma_rel']:.3f} (FD {best['fid']:.4f}); plot {Path(out) / 'phema_sweep.png'}")
    return rows, best


def main(argv=None):
    parser = argparse.ArgumentParser(description="Reconstruct post-hoc EMAs of a run (EDM2) as sample.py checkpoints, "
                                                 "and with --sweep score each and plot FD against sigma_rel")
    parser.add_argument("run_dir")
    parser.add_argument("--sigma-rel", type=float, nargs="+", required=True)
    parser.add_argument("--images", type=int, default=None, help="a snapshot time (default: the newest)")
    parser.add_argument("--sweep", action="store_true", help="sample and score each reconstruction")
    parser.add_argument("--sample-args", nargs="*", default=["num_samples=1000", "batch_size=500"],
                        help="sample.py overrides for the sweep (e.g. steps=25 device=cuda)")
    parser.add_argument("--features", default=None, help="default: digits for digits runs, else inception")
    parser.add_argument("--ref", default=None, help="reference statistics (default for digits: the train split)")
    parser.add_argument("--weights", default=None, help="the feature network's weights file")
    args = parser.parse_args(argv)
    folder = Path(args.run_dir) / "phema"
    written = []
    for sigma_rel in args.sigma_rel:
        state, info = reconstruct(folder, sigma_rel, args.images)
        last = info["last"]
        out = folder / f"reconstructed-{info['images']:010d}-{sigma_rel:.3f}.pt"
        torch.save({"model": state, "ema": state, "step": last["step"], "config": last["config"],
                    "model_args": last["model_args"], "phema": {k: v for k, v in info.items() if k != "last"}}, out)
        written.append(out)
        print(f"sigma_rel {sigma_rel:.3f} at {info['images']} images from {info['snapshots']} snapshots: {out}")
    if args.sweep:
        sweep(written, args.sigma_rel, folder, args.sample_args, args.features, args.ref, args.weights)
    return written


if __name__ == "__main__":
    from utils.errors import report_user_errors
    report_user_errors(main)()
