"""Record what the official μP-DiT code (ML-GSAI/Scaling-Diffusion-Transformers-muP) does with learning rates,
width multipliers, initialisation and the readout, for tests/test_mup_reference.py to compare models/mup.py against.

Regenerate (from the repository root, with the project's environment active, which has `mup` 1.0.0 and `timm`;
CPU only, a few seconds):

    git clone https://github.com/ML-GSAI/Scaling-Diffusion-Transformers-muP /path/to/muP-DiT   # or any checkout
    git -C /path/to/muP-DiT checkout 6d1583d56e77094caa6370546002c53567053125                 # the commit read
    python tests/reference/make_mup_reference.py --official /path/to/muP-DiT

`--official` is the repository root (or its DiT/ folder); MUP_DIT_OFFICIAL_PATH is read when it is not given. The
commit is taken from the checkout's git, or from `--commit` for an export without .git. The file in this repository
was made from commit 6d1583d56e77094caa6370546002c53567053125 with torch 2.14, mup 1.0.0 and timm 1.0.31.

It writes tests/data/mup_reference.json (about 80 kB, JSON). Nothing of the official code is copied into this
repository: DiT/models_mup.py is imported from the checkout (under the name `official_mup_dit_models`; it imports
timm's PatchEmbed/Attention/Mlp and mup's MuReadout, both real, nothing stubbed), and only numbers are stored,
with the SHA-256 of the official files that produced them.

What is recorded, following DiT/train_mup.py (`--mup` branch and `--save_base_shapes` branch):
  widths     official μP DiTs (depth 2, patch 2, 8x8x4 input, 10 classes, learned sigma, output_mult 1 = their
             default --logstd 0) with head size 16 fixed and num_heads 2 / 4 / 8 (widths 32 / 64 / 128). As
             train_mup.py does, the base shapes come from a base model (2 heads) and a delta model (3 heads) through
             mup.get_shapes + mup.make_base_shapes (a temporary .bsh file), then each model is built under a seed
             (its constructor is the whole of their initialisation) and mup.set_base_shapes(model, bsh) is called
             (rescale_params=True, their default). For every parameter: its shape, infshape (base dims, null =
             finite), number of width dims, width_mult, requires_grad, the role it plays (hidden = two width dims;
             output = MuReadout; input = other matrices; vector = 1-d; frozen = requires_grad False), its lr under
             MuAdamW(model.parameters(), lr=2**-10, weight_decay=0) (their call) as lr and lr / base lr, the
             weight-decay factor MuAdamW applies (from a second MuAdamW with weight_decay=WD_PROBE), and its init RMS
             pooled over SEEDS (every init in their code is zero-mean, so RMS = std). For the readout: the scalar
             by which MuReadout's output differs from a plain linear map with the same weight (seeded random weight,
             zero bias, fixed input), next to MuReadout's width_mult() and output_mult.
  xl2        the official DiT-XL/2 (depth 28, 16 heads of 72, 32x32 latents, 1000 classes) with their shipped
             DiT/width288_d28.bsh (base 288 = 4 heads) on the meta device: every parameter's infshape and its
             MuAdamW lr / base lr (width 1152, m = 4), i.e. the setting of their DiT-XL-2-μP run.

`load_official` and `make_reference` are imported by tests/test_mup_reference.py, which also runs them directly
(and compares with the file) when MUP_DIT_OFFICIAL_PATH points to a checkout.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO_ROOT / "tests" / "data" / "mup_reference.json"
ENV = "MUP_DIT_OFFICIAL_PATH"
COMMIT_READ = "6d1583d56e77094caa6370546002c53567053125"

# The official constructor's arguments (DiT_mup in DiT/models_mup.py), as train_mup.py passes them.
SMALL = dict(depth=2, patch_size=2, input_size=8, in_channels=4, num_classes=10, learn_sigma=True)
DIM_HEADS = 16          # train_mup.py: hidden_size = dim_heads * num_heads (their default head size is 72)
BASE_HEADS, DELTA_HEADS = 2, 3
HEADS = (2, 4, 8)       # base, 2x and 4x width, as their HP search's --num_heads {2, 4, 8}
OUTPUT_MULT = 1.0       # 2 ** --logstd, default 0
BASE_LR = 2.0 ** -10    # their best base learning rate
WD_PROBE = 0.1          # only to read MuAdamW's weight-decay factor; their runs use weight_decay=0
SEEDS = tuple(range(8))
XL2 = dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16, input_size=32, num_classes=1000)
OFFICIAL_FILES = ("DiT/models_mup.py", "DiT/train_mup.py", "DiT/width288_d28.bsh")


def official_root(path):
    """The repository root of a checkout given its root or its DiT/ folder."""
    path = Path(path).resolve()
    if (path / "models_mup.py").is_file() and path.name == "DiT":
        path = path.parent
    if not (path / "DiT" / "models_mup.py").is_file():
        raise FileNotFoundError(f"{path} is not an ML-GSAI/Scaling-Diffusion-Transformers-muP checkout "
                                f"(no DiT/models_mup.py)")
    return path


def load_official(official):
    """The official DiT/models_mup.py, imported as `official_mup_dit_models` (its own name, and the `models` it sits
    beside, would collide with this repository's models/)."""
    root = official_root(official)
    if "official_mup_dit_models" in sys.modules:
        return sys.modules["official_mup_dit_models"]
    spec = importlib.util.spec_from_file_location("official_mup_dit_models", root / "DiT" / "models_mup.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["official_mup_dit_models"] = module
    spec.loader.exec_module(module)
    return module


def official_model(models_mup, num_heads, **overrides):
    """DiT_mup as train_mup.py builds it (class_dropout_prob keeps its default 0.1: num_classes + 1 label rows)."""
    config = {**SMALL, "hidden_size": DIM_HEADS * num_heads, "num_heads": num_heads, "output_mult": OUTPUT_MULT,
              **overrides}
    return models_mup.DiT_mup(**config)


def _role(name, p, readouts):
    if not p.requires_grad:
        return "frozen"
    if p.ndim < 2:
        return "vector"
    if p.infshape.ninf() == 2:
        return "hidden"
    return "output" if name.rsplit(".", 1)[0] in readouts else "input"


def _lr_table(model, lr, weight_decay):
    """{parameter name: (lr, weight_decay)} of MuAdamW(model.parameters(), lr, weight_decay)."""
    import mup
    names = {id(p): n for n, p in model.named_parameters()}
    opt = mup.MuAdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    table = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert table.keys() == set(names.values())   # every parameter is in exactly one group
    return table


def _readout_multiplier(linear, seed):
    """The factor between MuReadout(x) and a plain linear map with the same (seeded, random) weight, zero bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g))
        linear.bias.zero_()
        x = torch.randn(5, linear.in_features, generator=g)
        out, plain = linear(x).double(), F.linear(x, linear.weight).double()
    multiplier = float((out * plain).sum() / (plain * plain).sum())
    residual = float((out - multiplier * plain).abs().max() / plain.abs().max())
    return multiplier, residual


def make_reference(models_mup):
    """Every recorded quantity, computed with the official model code and the mup package (a JSON-able dict)."""
    import mup

    with tempfile.TemporaryDirectory() as tmp:
        # train_mup.py --save_base_shapes: base and delta models -> make_base_shapes -> a .bsh file.
        bsh = str(Path(tmp) / "base.bsh")
        mup.make_base_shapes(mup.get_shapes(official_model(models_mup, BASE_HEADS)),
                             mup.get_shapes(official_model(models_mup, DELTA_HEADS)), savefile=bsh)
        widths = {}
        for heads in HEADS:
            sums, counts, params = {}, {}, None
            for seed in SEEDS:
                torch.manual_seed(seed)   # train_mup.py: seed_torch(seed), then the constructor initialises
                model = mup.set_base_shapes(official_model(models_mup, heads), bsh)   # rescale_params=True
                for name, p in model.named_parameters():
                    sums[name] = sums.get(name, 0.0) + float(p.detach().double().pow(2).sum())
                    counts[name] = counts.get(name, 0) + p.numel()
                if params is None:
                    readouts = {n for n, m in model.named_modules() if isinstance(m, mup.MuReadout)}
                    lrs = _lr_table(model, BASE_LR, 0.0)
                    wds = _lr_table(model, BASE_LR, WD_PROBE)
                    params = {}
                    for name, p in model.named_parameters():
                        params[name] = {
                            "shape": list(p.shape),
                            "infshape": [d.base_dim for d in p.infshape],
                            "ninf": p.infshape.ninf(),
                            "width_mult": float(p.infshape.width_mult()),
                            "requires_grad": p.requires_grad,
                            "role": _role(name, p, readouts),
                            "lr": lrs[name][0],
                            "lr_mult": lrs[name][0] / BASE_LR,
                            "wd_mult": wds[name][1] / WD_PROBE,
                        }
                    (readout_name,) = readouts
                    readout = model.get_submodule(readout_name)
                    width_mult, output_mult = float(readout.width_mult()), float(readout.output_mult)
                    multiplier, residual = _readout_multiplier(readout, seed=1000 + heads)
            for name in params:
                params[name]["init_rms"] = (sums[name] / counts[name]) ** 0.5
                params[name]["init_count"] = counts[name]
            widths[str(DIM_HEADS * heads)] = {
                "num_heads": heads, "params": params,
                "readout": {"name": readout_name, "width_mult": width_mult, "output_mult": output_mult,
                            "multiplier": multiplier, "residual": residual},
            }

    # Their DiT-XL/2 with their shipped base shapes, on the meta device (no memory, no values).
    root = official_root(Path(models_mup.__file__).parent)
    with torch.device("meta"):
        xl2 = models_mup.DiT_mup(**XL2)
    mup.set_base_shapes(xl2, str(root / "DiT" / "width288_d28.bsh"))
    xl2_lrs = _lr_table(xl2, BASE_LR, 0.0)
    xl2_params = {name: {"shape": list(p.shape), "infshape": [d.base_dim for d in p.infshape],
                         "requires_grad": p.requires_grad, "lr_mult": xl2_lrs[name][0] / BASE_LR}
                  for name, p in xl2.named_parameters()}
    return {
        "config": {"small": dict(SMALL), "dim_heads": DIM_HEADS, "base_heads": BASE_HEADS, "delta_heads": DELTA_HEADS,
                   "heads": list(HEADS), "base_width": DIM_HEADS * BASE_HEADS, "output_mult": OUTPUT_MULT,
                   "base_lr": BASE_LR, "wd_probe": WD_PROBE, "seeds": list(SEEDS)},
        "widths": widths,
        "xl2": {"config": dict(XL2), "base_width": 288, "bsh": "DiT/width288_d28.bsh", "params": xl2_params},
    }


def _commit(root, given):
    if given:
        return given
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", default=os.environ.get(ENV),
                        help=f"path to an ML-GSAI/Scaling-Diffusion-Transformers-muP checkout (default: ${ENV})")
    parser.add_argument("--commit", default=None, help="the checkout's commit, for an export without .git")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args()
    if not args.official:
        parser.error(f"give --official or set {ENV}")
    import importlib.metadata
    import timm
    root = official_root(args.official)
    reference = make_reference(load_official(root))
    reference["meta"] = {
        "official": "https://github.com/ML-GSAI/Scaling-Diffusion-Transformers-muP",
        "commit": _commit(root, args.commit),
        "official_sha256": {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in OFFICIAL_FILES},
        "torch": str(torch.__version__), "mup": importlib.metadata.version("mup"), "timm": timm.__version__,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.output} ({Path(args.output).stat().st_size / 1e3:.1f} kB)")


if __name__ == "__main__":
    main()
