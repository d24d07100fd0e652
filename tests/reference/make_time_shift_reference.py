"""Record what the official RAE code (bytetriper/RAE, "Diffusion Transformers with Representation Autoencoders",
2510.11690) computes for its dimension-dependent time shift, for tests/test_time_shift.py.

Regenerate (from the repository root, with the project's environment active; CPU only, a second):

    git clone https://github.com/bytetriper/RAE /path/to/RAE                        # or any existing checkout
    python tests/reference/make_time_shift_reference.py --official /path/to/RAE    # or RAE_OFFICIAL_PATH=/path/to/RAE

The stored file was made from commit a4d18c4db766419cbe7cb8c02cd9f7ceb0ec9041 (20 Jan 2026). It writes
tests/data/time_shift_reference.json (about 60 kB). Nothing of the official code is copied: its package
`src/stage2/transport` is imported from the checkout (under a name of its own) and only its outputs are stored, with
the SHA-256 of its files.

Where the official code shifts (RAE's time runs the other way: alpha_t = 1 - t, sigma_t = t, t = 1 is noise):
- training: `Transport.sample` draws t on [t0, t1] (uniform, or logit-normal truncated to [t0, t1]), then
  t <- s t / (1 + (s - 1) t) (src/stage2/transport/transport.py);
- sampling: `integrators.ode` and `integrators.sde` build the grid 1 - linspace(t0, t1, N) and shift it the same way
  (src/stage2/transport/integrators.py);
- s = sqrt(time_dist_shift_dim / time_dist_shift_base), the dimension defaulting to C*H*W of `misc.latent_size` and
  the base to 4096 (src/train.py, src/sample_ddp.py; src/sample.py defaults the dimension to 768*16*16). This is three
  lines of a training script, not a function, so the reference records every shipped config's values instead.

What is recorded, for the shifts in SHIFTS:
- `ode_grids` / `sde_grids`: the official integrators' grids `.t` for the intervals in ODE_INTERVALS / SDE_INTERVALS;
- `ode_sampler_grids`: the grid of `Sampler(create_transport("Linear", "velocity", time_dist_shift=s)).sample_ode(
  num_steps=N)` (its own interval: t0 = 0, t1 = 0.999);
- `draws`: `Transport.sample` of a Linear velocity transport (uniform and logit-normal(0, 1) time) after
  torch.manual_seed(SEED): t with time_dist_shift=s and, from the same seed, with time_dist_shift=1 (the unshifted u);
- `configs`: each shipped stage-2 config's latent_size, time_dist_shift_dim / _base and the s they give.
"""

import argparse
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO_ROOT / "tests" / "data" / "time_shift_reference.json"
ENV = "RAE_OFFICIAL_PATH"
PACKAGE = Path("src") / "stage2" / "transport"
FILES = tuple(str(PACKAGE / f) for f in ("__init__.py", "transport.py", "integrators.py", "path.py", "utils.py"))
SHIFTS = (1.0, 0.5, 2.0, 3.0, math.sqrt(196608 / 4096), math.sqrt(786432 / 4096))   # RAE at 256 and 512 px
ODE_INTERVALS = ((0.0, 1.0, 11), (0.0, 1.0, 50), (0.0, 0.999, 50))
SDE_INTERVALS = ((0.0, 0.96, 11), (1e-3, 0.96, 25))
DRAW_SHAPE, SEED = (64, 2, 2, 2), 0
TIME_DISTS = ("uniform", "logit-normal_0_1")


def load_official(official):
    """The official package src/stage2/transport, imported as `official_rae_transport` (its relative imports stay
    inside it). Returns (package, integrators module, checkout path)."""
    official = Path(official).resolve()
    if not all((official / f).is_file() for f in FILES):
        raise FileNotFoundError(f"{official} is not a bytetriper/RAE checkout (no {', '.join(FILES)})")
    name = "official_rae_transport"
    spec = importlib.util.spec_from_file_location(name, official / PACKAGE / "__init__.py",
                                                  submodule_search_locations=[str(official / PACKAGE)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package, sys.modules[f"{name}.integrators"], official


def shipped_configs(official):
    """{config path: latent_size, dim, base, s} of the stage-2 configs, s as src/train.py computes it."""
    from omegaconf import OmegaConf
    out = {}
    for path in sorted((official / "configs" / "stage2").rglob("*.yaml")):
        misc = OmegaConf.to_container(OmegaConf.load(path)).get("misc") or {}
        latent = [int(d) for d in misc.get("latent_size", (768, 16, 16))]
        dim, base = misc.get("time_dist_shift_dim", math.prod(latent)), misc.get("time_dist_shift_base", 4096)
        out[str(path.relative_to(official))] = {"latent_size": latent, "dim": dim, "base": base,
                                                "s": math.sqrt(dim / base)}
    return out


def make_reference(package, integrators, official):
    ref = {"shifts": list(SHIFTS), "ode_grids": [], "sde_grids": [], "ode_sampler_grids": [], "draws": []}
    for s in SHIFTS:
        for t0, t1, n in ODE_INTERVALS:
            ode = integrators.ode(None, t0=t0, t1=t1, sampler_type="euler", num_steps=n, atol=1e-6, rtol=1e-3,
                                  time_dist_shift=s)
            ref["ode_grids"].append({"s": s, "t0": t0, "t1": t1, "n": n, "t": ode.t.tolist()})
        for t0, t1, n in SDE_INTERVALS:
            sde = integrators.sde(None, None, t0=t0, t1=t1, num_steps=n, sampler_type="euler", time_dist_shift=s)
            ref["sde_grids"].append({"s": s, "t0": t0, "t1": t1, "n": n, "t": sde.t.tolist()})
        if s >= 1:   # the official Transport refuses s < 1
            sample = package.Sampler(package.create_transport("Linear", "velocity", time_dist_shift=s)).sample_ode(
                sampling_method="euler", num_steps=50)
            ref["ode_sampler_grids"].append({"s": s, "n": 50, "t": sample.__self__.t.tolist()})
            for dist in TIME_DISTS:
                draws = {}
                for key, shift in (("u", 1.0), ("t", s)):
                    transport = package.create_transport("Linear", "velocity", time_dist_type=dist,
                                                         time_dist_shift=shift)
                    torch.manual_seed(SEED)
                    draws[key] = transport.sample(torch.zeros(DRAW_SHAPE))[0].tolist()
                ref["draws"].append({"s": s, "time_dist": dist, **draws})
    ref["configs"] = shipped_configs(official)
    return ref


def checkout_commit(official):
    try:
        return subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", default=os.environ.get(ENV),
                        help=f"path to a bytetriper/RAE checkout (default: ${ENV})")
    parser.add_argument("--commit", default=None, help="the checkout's commit, when it is not a git work tree")
    parser.add_argument("--out", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args()
    if not args.official:
        parser.error(f"give --official PATH or set {ENV}")
    package, integrators, official = load_official(args.official)
    reference = make_reference(package, integrators, official)
    reference["meta"] = {"repository": "bytetriper/RAE", "commit": args.commit or checkout_commit(official),
                         "torch": torch.__version__,
                         "files_sha256": {f: hashlib.sha256((official / f).read_bytes()).hexdigest() for f in FILES}}
    Path(args.out).write_text(json.dumps(reference) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
