"""Record what the official sihyun-yu/REPA code computes for the alignment term, for tests/test_repa.py.

Regenerate (from the repository root, with the project's environment active; CPU only, a second):

    git clone https://github.com/sihyun-yu/REPA /path/to/REPA        # or any existing checkout
    python tests/reference/make_repa_reference.py --official /path/to/REPA

It writes tests/data/repa_reference.pt (a few kB). Nothing of the official code is copied: its `loss.py` (SILoss)
and `models/sit.py` (build_mlp) are imported from the checkout and only their outputs are stored, with the SHA-256 of
the two files. Our projector (diffusion/repa.py, seeded) is loaded into REPA's build_mlp with strict=True; for fixed
hidden tokens h and encoder features z, the reference holds REPA's projector output and its `proj_loss` (SILoss's
mean over tokens, batch and encoders of -cos), computed by calling SILoss with a stand-in model that returns zero
velocities and the projected tokens.
"""

import argparse
import hashlib
import importlib.util
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
DEFAULT_OUTPUT = REPO_ROOT / "tests" / "data" / "repa_reference.pt"
HIDDEN, PROJECTOR, Z_DIM, N, T, SEED = 32, 64, 24, 3, 16, 0


def _import(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_official(official):
    official = Path(official).resolve()
    if not (official / "loss.py").is_file() or not (official / "models" / "sit.py").is_file():
        raise FileNotFoundError(f"{official} is not a sihyun-yu/REPA checkout (no loss.py / models/sit.py)")
    return _import("official_repa_loss", official / "loss.py"), _import("official_repa_sit", official / "models" / "sit.py")


def inputs():
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(N, T, HIDDEN, generator=g), torch.randn(N, T, Z_DIM, generator=g)


def make_reference(loss_module, sit_module):
    from diffusion.repa import projector
    ours = projector(HIDDEN, PROJECTOR, Z_DIM, seed=SEED)
    official = sit_module.build_mlp(HIDDEN, PROJECTOR, Z_DIM)
    official.load_state_dict(ours.state_dict(), strict=True)
    h, z = inputs()
    with torch.no_grad():
        projected = official(h)
        images = torch.zeros(N, 4, 2, 2)
        model = lambda x, t, **kwargs: (torch.zeros_like(x), [projected])
        _, proj_loss = loss_module.SILoss()(model, images, zs=[z])
    return {"projected": projected, "proj_loss": proj_loss.reshape(()), "h": h, "z": z}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, help="path to a sihyun-yu/REPA checkout")
    parser.add_argument("--out", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args()
    reference = make_reference(*load_official(args.official))
    official = Path(args.official).resolve()
    reference["official_files_sha256"] = {f: hashlib.sha256((official / f).read_bytes()).hexdigest()
                                          for f in ("loss.py", "models/sit.py")}
    torch.save(reference, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
