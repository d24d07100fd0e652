"""Record what the official iREPA code (End2End-Diffusion/iREPA, latent-diffusion part `ldm/`) computes for its
conv projector, its spatial normalisation and its alignment loss, for tests/test_repa.py.

Regenerate (from the repository root, with the project's environment active; CPU only, a second):

    git clone https://github.com/End2End-Diffusion/iREPA /path/to/iREPA      # or any existing checkout
    python tests/reference/make_irepa_reference.py --official /path/to/iREPA   # or IREPA_OFFICIAL_PATH=/path/to/iREPA

The stored file was made from commit 99ad4ac234efe8de52ce157120f72856e836d09f (12 Dec 2025). It writes
tests/data/irepa_reference.pt (about 50 kB). Nothing of the official code is copied: `ldm/models/sit.py`
(ProjectionLayer), `ldm/utils.py` (SpatialNormalization), `ldm/projection_loss.py` and `ldm/loss.py` (SILoss) are
imported from the checkout and only their outputs are stored, with the SHA-256 of the four files.

What is recorded, for fixed hidden tokens h on a 4x4 grid and encoder features z (with a per-channel offset, so that
the mean removal matters):
- `weights`: the official conv ProjectionLayer (kernel 3) as built after torch.manual_seed(SEED), i.e. PyTorch's
  default Conv2d init, which iREPA keeps;
- `projected`: its output for h;
- `z_normalized`: SpatialNormalization("zscore") of z with zscore_alpha = GAMMA (ldm/train.py's default 0.6);
- `proj_loss` / `proj_loss_raw`: SILoss's projection term (proj_coeff 1.0, cosine) for the projected tokens against
  the normalised / the raw z, computed by calling SILoss with a stand-in model that returns zero velocities, the
  projected tokens and h.
"""

import argparse
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
DEFAULT_OUTPUT = REPO_ROOT / "tests" / "data" / "irepa_reference.pt"
HIDDEN, Z_DIM, N, GRID, KERNEL, GAMMA, SEED = 32, 24, 3, (4, 4), 3, 0.6, 0
FILES = ("ldm/models/sit.py", "ldm/utils.py", "ldm/projection_loss.py", "ldm/loss.py")


def _import(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_official(official):
    """The official modules (sit, utils, loss), imported under names of their own: ldm/utils.py would shadow our
    utils package. ldm/loss.py imports `projection_loss`, which is registered for that import only."""
    official = Path(official).resolve()
    if not all((official / f).is_file() for f in FILES):
        raise FileNotFoundError(f"{official} is not an End2End-Diffusion/iREPA checkout (no {', '.join(FILES)})")
    sit = _import("official_irepa_sit", official / "ldm" / "models" / "sit.py")
    utils = _import("official_irepa_utils", official / "ldm" / "utils.py")
    saved = sys.modules.get("projection_loss")
    sys.modules["projection_loss"] = _import("projection_loss", official / "ldm" / "projection_loss.py")
    try:
        loss = _import("official_irepa_loss", official / "ldm" / "loss.py")
    finally:
        if saved is None:
            sys.modules.pop("projection_loss")
        else:
            sys.modules["projection_loss"] = saved
    return sit, utils, loss


def inputs():
    g = torch.Generator().manual_seed(SEED + 1)
    tokens = GRID[0] * GRID[1]
    h = torch.randn(N, tokens, HIDDEN, generator=g)
    z = torch.randn(N, tokens, Z_DIM, generator=g) + 2 * torch.randn(N, 1, Z_DIM, generator=g)
    return h, z


def make_reference(sit, utils, loss):
    torch.manual_seed(SEED)
    official = sit.ProjectionLayer("conv", hidden_size=HIDDEN, z_dim=Z_DIM, projector_dim=64,
                                   proj_kwargs_kernel_size=KERNEL)
    h, z = inputs()
    with torch.no_grad():
        projected = official(h)
        z_normalized = utils.SpatialNormalization("zscore")(z, zscore_alpha=GAMMA)
        model = lambda x, t, **kwargs: (torch.zeros_like(x), [projected], [h])
        images = torch.zeros(N, 4, 2, 2)
        si_loss = loss.SILoss(proj_coeff="1.0")
        _, proj_loss, _ = si_loss(model, images, zs=[z_normalized])
        _, proj_loss_raw, _ = si_loss(model, images, zs=[z])
    return {"weights": {k: v.clone() for k, v in official.state_dict().items()}, "h": h, "z": z,
            "projected": projected, "z_normalized": z_normalized, "proj_loss": proj_loss.reshape(()),
            "proj_loss_raw": proj_loss_raw.reshape(())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", default=os.environ.get("IREPA_OFFICIAL_PATH"),
                        help="path to an End2End-Diffusion/iREPA checkout (default: $IREPA_OFFICIAL_PATH)")
    parser.add_argument("--out", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args()
    if not args.official:
        parser.error("give --official PATH or set IREPA_OFFICIAL_PATH")
    reference = make_reference(*load_official(args.official))
    official = Path(args.official).resolve()
    reference["official_files_sha256"] = {f: hashlib.sha256((official / f).read_bytes()).hexdigest() for f in FILES}
    torch.save(reference, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
