"""Record what the official willisma/SiT `transport` package computes, for tests/test_transport_parity.py.

Regenerate (from the repository root, with the project's environment active; CPU only, under a minute):

    git clone https://github.com/willisma/SiT /path/to/SiT      # the commit recorded in the file is the one used
    python tests/reference/make_sit_reference.py --official /path/to/SiT

It writes tests/data/sit_reference.pt (loads with torch.load(weights_only=True)). Nothing of SiT is copied into
this repository: its `transport` package is imported from the checkout, and only its outputs are stored, with the
SHA-256 of the files that produced them.

What is stored, for a fixed smooth model function (`fixed_model`) and fixed data, each with the torch seed set just
before the call and the next draw of the global RNG after it (how many numbers the call consumed):
  losses      training_losses for every path x prediction x loss weight (27 cases): loss and pred
  ode         sample_ode for every path x prediction with the fixed-grid methods euler, midpoint, rk4 and the
              adaptive dopri5, forward, and reverse=True for the Linear velocity case: the whole trajectory
  sde         sample_sde for every path x prediction, Euler and Heun, the diffusion forms sigma, linear, decreasing,
              SBDM (score/noise models) and the last steps Mean, Tweedie, Euler and None: the whole trajectory;
              plus SBDM with a velocity model, which SiT returns as NaN (sbdm_velocity_nan), and the same run with
              sample_eps=1e-3, the start this repository uses instead
  likelihood  sample_ode_likelihood (Hutchinson probes) with euler and dopri5: logp and the latent
`load_official` and `make_reference` are imported by the tests, which also run them live when the environment
variable SIT_OFFICIAL_PATH points to a checkout.
"""

import argparse
import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO_ROOT / "tests" / "data" / "sit_reference.pt"
FILES = ("transport/__init__.py", "transport/transport.py", "transport/path.py", "transport/integrators.py",
         "transport/utils.py")

PATHS = ("Linear", "GVP", "VP")
PREDICTIONS = ("velocity", "score", "noise")
WEIGHTS = (None, "velocity", "likelihood")
ODE_METHODS = ("euler", "midpoint", "rk4", "dopri5")
ODE_STEPS = 6
SDE_STEPS = 6
# dopri5 underflows (torchdiffeq: "underflow in dt") on this stand-in model read as VP noise: -eps / sigma_t is stiff
# as sigma_t -> 0 at the data end. Not a parity question; left out.
ODE_UNSOLVABLE = {("VP", "noise", "dopri5")}
SDE_CASES = (  # (sampling_method, diffusion_form, last_step, last_step_size)
    ("Euler", "sigma", "Mean", 0.04),
    ("Heun", "sigma", "Mean", 0.04),
    ("Euler", "linear", "Tweedie", 0.04),
    ("Euler", "decreasing", "Euler", 0.1),
    ("Euler", "inccreasing-decreasing", None, 0.04),  # (Heun would evaluate the score at t = 1: infinite)
)
SHAPE = (3, 2, 4, 4)  # (N, C, H, W)
SEED = 0


def fixed_model(x, t, y):
    """A deterministic stand-in for a network: smooth in x, dependent on the raw time t in [0, 1] and on y."""
    s = t.float().view(-1, 1, 1, 1)
    c = (y.float() / 10).view(-1, 1, 1, 1)
    return torch.tanh(0.8 * x - s + c) - 0.5 * x * (1 + s) + 0.2 * torch.sin(3 * s + x)


def inputs():
    g = torch.Generator().manual_seed(1234)
    return torch.randn(SHAPE, generator=g), torch.tensor([0, 3, 7])


def load_official(path):
    """SiT's `transport` package, imported from a checkout under a private name; (module, file hashes, commit)."""
    root = Path(path)
    spec = importlib.util.spec_from_file_location("sit_transport", root / "transport" / "__init__.py",
                                                  submodule_search_locations=[str(root / "transport")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["sit_transport"] = module
    spec.loader.exec_module(module)
    hashes = {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in FILES}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        commit = "unknown (not a git checkout)"
    return module, hashes, commit


def seeded(fn):
    """fn() with torch's global RNG seeded just before; (result, the next draw after it)."""
    torch.manual_seed(SEED)
    out = fn()
    return out, torch.rand(1)


def make_reference(sit, hashes, commit):
    x, y = inputs()
    kwargs = dict(y=y)
    ref = {"files": hashes, "commit": commit, "losses": {}, "ode": {}, "sde": {}, "likelihood": {}}

    for path in PATHS:
        for prediction in PREDICTIONS:
            for weight in WEIGHTS:
                transport = sit.create_transport(path, prediction, weight)
                terms, after = seeded(lambda: transport.training_losses(fixed_model, x, kwargs))
                ref["losses"][f"{path}/{prediction}/{weight}"] = {"loss": terms["loss"], "pred": terms["pred"],
                                                                   "after": after}

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
    for path in PATHS:
        for prediction in PREDICTIONS:
            sampler = sit.Sampler(sit.create_transport(path, prediction))
            for method in ODE_METHODS:
                if (path, prediction, method) in ODE_UNSOLVABLE:
                    continue
                fn = sampler.sample_ode(sampling_method=method, num_steps=ODE_STEPS)
                traj, after = seeded(lambda: fn(noise, fixed_model, **kwargs))
                ref["ode"][f"{path}/{prediction}/{method}"] = {"traj": traj, "after": after}
            forms = SDE_CASES + ((("Euler", "SBDM", "Mean", 0.04),) if prediction != "velocity" else ())
            for method, form, last, size in forms:
                fn = sampler.sample_sde(sampling_method=method, diffusion_form=form, last_step=last,
                                        last_step_size=size, num_steps=SDE_STEPS)
                traj, after = seeded(lambda: torch.stack(fn(noise, fixed_model, **kwargs)))
                ref["sde"][f"{path}/{prediction}/{method}/{form}/{last}/{size}"] = {"traj": traj, "after": after}
    reverse = sit.Sampler(sit.create_transport("Linear", "velocity")).sample_ode(sampling_method="rk4",
                                                                                 num_steps=ODE_STEPS, reverse=True)
    traj, after = seeded(lambda: reverse(x, fixed_model, **kwargs))
    ref["ode"]["Linear/velocity/rk4/reverse"] = {"traj": traj, "after": after}

    # SBDM with a velocity model: SiT starts at t = 0 where D(t) = (1 - t) / t is infinite.
    for path in ("Linear", "GVP"):
        fn = sit.Sampler(sit.create_transport(path, "velocity")).sample_sde(diffusion_form="SBDM", num_steps=SDE_STEPS)
        traj, _ = seeded(lambda: torch.stack(fn(noise, fixed_model, **kwargs)))
        ref["sde"][f"{path}/velocity/SBDM_nan"] = torch.tensor(bool(torch.isnan(traj[-1]).any()))
        fixed = sit.create_transport(path, "velocity")
        fixed.sample_eps = 1e-3  # the start this repository uses (SBDM_T0)
        fn = sit.Sampler(fixed).sample_sde(diffusion_form="SBDM", num_steps=SDE_STEPS)
        traj, after = seeded(lambda: torch.stack(fn(noise, fixed_model, **kwargs)))
        ref["sde"][f"{path}/velocity/SBDM_t0=1e-3"] = {"traj": traj, "after": after}

    for path, prediction in (("Linear", "velocity"), ("GVP", "noise"), ("VP", "score")):
        sampler = sit.Sampler(sit.create_transport(path, prediction))
        for method in ("euler", "dopri5"):
            fn = sampler.sample_ode_likelihood(sampling_method=method, num_steps=ODE_STEPS)
            with torch.no_grad():  # as SiT's sample.py runs it (torch.set_grad_enabled(False))
                (logp, z), after = seeded(lambda: fn(x, fixed_model, **kwargs))
            ref["likelihood"][f"{path}/{prediction}/{method}"] = {"logp": logp.detach(), "z": z.detach(),
                                                                 "after": after}
    return ref


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, help="a checkout of https://github.com/willisma/SiT")
    parser.add_argument("--out", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args()
    ref = make_reference(*load_official(args.official))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref, args.out)
    print(f"wrote {args.out}: {len(ref['losses'])} losses, {len(ref['ode'])} ODE, {len(ref['sde'])} SDE and "
          f"{len(ref['likelihood'])} likelihood cases from SiT {ref['commit']}")


if __name__ == "__main__":
    main()
