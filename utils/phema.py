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
(`sample.py ckpt=<that file>`), from the snapshots up to N images (default: the newest snapshot).
`python -m benchmarks.phema_sweep RUN_DIR --sigma-rel ...` also samples each, scores it and plots FD against
sigma_rel (benchmarks/phema_sweep.py: sampling and scoring are above utils/).
"""

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

from utils.errors import ConfigError, report_user_errors
from utils.files import atomic_write

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
        # Copied onto the device of the tracked parameters (checkpoints are loaded on the CPU).
        self.emas = [[t.to(own.device, torch.float32, copy=True) for t, own in zip(ema, mine)]
                     for ema, mine in zip(state["emas"], self.emas)]

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
        atomic_write(path, lambda tmp: torch.save({"ema": state, "images": int(images), "sigma_rel": sigma_rel,
                                                   "gamma": sigma_rel_to_gamma(sigma_rel), **extra}, tmp))


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


def write_reconstructions(run_dir, sigma_rels, images=None):
    """Reconstruct each sigma_rel at `images` images (default: the newest snapshot) from run_dir/phema and write it
    as a checkpoint sample.py reads, run_dir/phema/reconstructed-<images>-<sigma_rel>.pt; returns their paths."""
    folder = Path(run_dir) / "phema"
    written = []
    for sigma_rel in sigma_rels:
        state, info = reconstruct(folder, sigma_rel, images)
        last = info["last"]
        out = folder / f"reconstructed-{info['images']:010d}-{sigma_rel:.3f}.pt"
        payload = {"model": state, "ema": state, "step": last["step"], "config": last["config"],
                   "model_args": last["model_args"], "phema": {k: v for k, v in info.items() if k != "last"}}
        atomic_write(out, lambda tmp: torch.save(payload, tmp))   # sample.py never reads half a file
        written.append(out)
        print(f"sigma_rel {sigma_rel:.3f} at {info['images']} images from {info['snapshots']} snapshots: {out}")
    return written


def add_arguments(parser):
    """The reconstruction's command-line arguments (benchmarks/phema_sweep.py takes them too)."""
    parser.add_argument("run_dir")
    parser.add_argument("--sigma-rel", type=float, nargs="+", required=True)
    parser.add_argument("--images", type=int, default=None, help="a snapshot time (default: the newest)")
    return parser


SWEEP_MOVED = ("--sweep moved to its own command, which reconstructs, samples and scores each sigma_rel: "
               "python -m benchmarks.phema_sweep RUN_DIR --sigma-rel ... [--sample-args ...] [--features ...] "
               "[--ref ...]")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--sweep" in argv:   # the sweep samples and scores: it lives above utils/, in benchmarks/
        raise ConfigError(SWEEP_MOVED)
    parser = argparse.ArgumentParser(description="Reconstruct post-hoc EMAs of a run (EDM2) as sample.py checkpoints "
                                                 "(to score them too: python -m benchmarks.phema_sweep)")
    args = add_arguments(parser).parse_args(argv)
    return write_reconstructions(args.run_dir, args.sigma_rel, args.images)


if __name__ == "__main__":
    report_user_errors(main)()
