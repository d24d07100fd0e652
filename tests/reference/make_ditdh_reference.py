"""Record what the official DiT^DH network (RAE's DiTwDDTHead) computes, for tests/test_ditdh.py to compare against.

Regenerate (from the repository root, with the project's environment active; CPU only, seconds):

    git clone https://github.com/bytetriper/RAE /path/to/RAE          # or any checkout / `git archive` of it
    pip install einops transformers                                   # the official model files import them
    python tests/reference/make_ditdh_reference.py --official /path/to/RAE --commit <the checkout's commit>

(or set RAE_OFFICIAL_PATH instead of --official). It writes tests/data/ditdh_reference.pt (about 0.5 MB; loads with
torch.load(weights_only=True)). Nothing of the official code is copied into this repository: its src/stage2 package
is imported from the checkout, and only what it computes is stored, with the SHA-256 of the official files used.
`transformers` (DDT.py imports SwinModel, never used) and `regex` (one unused name) are stubbed only if missing:
neither touches the numbers.

For each option set in CONFIGS a small official DiTwDDTHead (trunk and head of width 32 / 48, 4x4x8 input, 5 classes)
is built with a fixed seed, every parameter except the fixed Fourier frequencies W is refilled with seeded values
rounded to fp16 (so the stored fp16 copies are exact), and it is run in eval mode on fixed inputs (t in [0, 1], labels
including the null class). Stored per config: the official constructor arguments, the official state_dict (fp16 where
exact, else fp32), the official output; plus the inputs, and for the real sizes S and XL (meta device) the official
key -> shape map, parameter count and forward Gflops at 768x16x16.
"""

import argparse
import hashlib
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
DEFAULT_OUTPUT = REPO_ROOT / "tests" / "data" / "ditdh_reference.pt"
OFFICIAL_FILES = ("src/stage2/__init__.py", "src/stage2/models/__init__.py", "src/stage2/models/DDT.py",
                  "src/stage2/models/lightningDiT.py", "src/stage2/models/model_utils.py",
                  "configs/stage2/training/ImageNet256/DiTDH-S_DINOv2-B.yaml",
                  "configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml")

SMALL = dict(input_size=4, patch_size=1, in_channels=8, num_classes=5, mlp_ratio=4.0, class_dropout_prob=0.1)
SHIPPED = dict(use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False, use_pos_embed=True)
# Official constructor arguments of each small model (beyond SMALL).
CONFIGS = {
    "shipped": dict(hidden_size=[32, 48], depth=[2, 2], num_heads=[2, 3], **SHIPPED),      # the released options
    "same_width": dict(hidden_size=[32, 32], depth=[2, 1], num_heads=[2, 2], **SHIPPED),   # s_projector = Identity
    # (wo_shift=True is not in the comparison: the official DDTModulate fails on its missing shift.)
    "qknorm": dict(hidden_size=[32, 48], depth=[2, 2], num_heads=[2, 3], **{**SHIPPED, "use_qknorm": True}),
    "layernorm_gelu_nopos": dict(hidden_size=[32, 48], depth=[1, 2], num_heads=[2, 3],
                                 **{**SHIPPED, "use_rmsnorm": False, "use_swiglu": False, "use_pos_embed": False}),
}
# The official stage-2 configs' model arguments (configs/stage2/training/ImageNet256/DiTDH-{S,XL}_DINOv2-B.yaml).
REAL = {
    "DiTDH-S/1": dict(hidden_size=[384, 2048], depth=[12, 2], num_heads=[6, 16]),
    "DiTDH-XL/1": dict(hidden_size=[1152, 2048], depth=[28, 2], num_heads=[16, 16]),
}
REAL_COMMON = dict(input_size=16, patch_size=1, in_channels=768, mlp_ratio=4.0, class_dropout_prob=0.1,
                   num_classes=1000, **SHIPPED)
SEED = 0


def ours_kwargs(official):
    """Our DiTDH's constructor arguments for the official DiTwDDTHead's."""
    renamed = dict(norm="rmsnorm" if official["use_rmsnorm"] else "layernorm",
                   mlp="swiglu" if official["use_swiglu"] else "gelu", rope=official["use_rope"],
                   qk_norm=official["use_qknorm"], wo_shift=official["wo_shift"], use_pos_embed=official["use_pos_embed"])
    kept = {k: v for k, v in official.items() if k in ("input_size", "patch_size", "in_channels", "num_classes",
                                                        "mlp_ratio", "hidden_size", "depth", "num_heads")}
    return {**kept, **renamed, "learn_sigma": False}


def inputs(seed=SEED):
    g = torch.Generator().manual_seed(seed + 2)
    size = SMALL["input_size"]
    x = torch.randn(4, SMALL["in_channels"], size, size, generator=g)
    t = torch.tensor([0.0, 0.25, 0.6, 1.0])
    y = torch.tensor([0, 3, 4, SMALL["num_classes"]])   # the last is the null class
    return x, t, y


def fill_seeded_(model, seed=SEED):
    """Every parameter but the Fourier frequencies <- seeded N(0, 1/fan_in) (vectors: 1 + N(0, 0.1^2) for norm
    weights, N(0, 0.1^2) otherwise), rounded to fp16 values; adaLN and the output layer are no longer zero."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("t_embedder.W", "pos_embed"):
                continue
            std = p[0].numel() ** -0.5 if p.ndim > 1 else 0.1
            value = torch.randn(p.shape, generator=g) * std
            if p.ndim == 1 and "norm" in name:
                value = value + 1
            p.copy_(value.half().float())
    return model


def compact(state):
    """A state_dict with each tensor stored as fp16 where that is exact (the filled weights), else as it is."""
    return {k: v.half() if v.is_floating_point() and torch.equal(v.half().float(), v) else v.clone()
            for k, v in state.items()}


def _stub_if_missing(name, **attributes):
    if importlib.util.find_spec(name) is None:
        module = types.ModuleType(name)
        for key, value in attributes.items():
            setattr(module, key, value)
        sys.modules[name] = module
        return [name]
    return []


def load_official(official):
    """The official stage2.models.DDT module, imported from a checkout (its src/ on sys.path while importing)."""
    src = Path(official).resolve() / "src"
    if not (src / "stage2" / "models" / "DDT.py").is_file():
        raise FileNotFoundError(f"{official} is not a bytetriper/RAE checkout (no src/stage2/models/DDT.py)")
    if "stage2.models.DDT" in sys.modules:
        return sys.modules["stage2.models.DDT"]
    stubbed = _stub_if_missing("transformers", SwinModel=object) + _stub_if_missing("regex", B=None)
    sys.path.insert(0, str(src))
    try:
        module = importlib.import_module("stage2.models.DDT")
    finally:
        sys.path.remove(str(src))
    module.STUBBED = stubbed
    return module


def _fingerprint(official):
    official = Path(official).resolve()
    return {f: hashlib.sha256((official / f).read_bytes()).hexdigest() for f in OFFICIAL_FILES}


def _gflops(model, shape):
    """Forward multiply-accumulates per sample, as models.forward_gflops counts them, on the meta device (the
    official W is drawn by torch.normal, which ignores the meta device context: moved there too)."""
    model = model.to("meta")
    x, t, y = torch.zeros(1, *shape, device="meta"), torch.zeros(1, device="meta"), torch.zeros(1, dtype=torch.long,
                                                                                                  device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, y)
    return counter.get_total_flops() / 2 / 1e9


def make_reference(official_module):
    """Every reference quantity, computed with the official code."""
    x, t, y = inputs()
    out = {"inputs": {"x": x, "t": t, "y": y}, "configs": {}, "real": {}}
    for name, config in CONFIGS.items():
        kwargs = {**SMALL, **config}
        torch.manual_seed(SEED)
        official = fill_seeded_(official_module.DiTwDDTHead(**kwargs)).eval()
        with torch.no_grad():
            output = official(x, t, y)
        assert output.abs().mean() > 0.05, "the filled model should not output (near) zero"
        out["configs"][name] = {"official_kwargs": kwargs, "state_dict": compact(official.state_dict()),
                                "output": output}
    for name, config in REAL.items():
        with torch.device("meta"):
            official = official_module.DiTwDDTHead(**REAL_COMMON, **config).eval()
        out["real"][name] = {"official_kwargs": {**REAL_COMMON, **config},
                             "shapes": {k: list(v.shape) for k, v in official.state_dict().items()},
                             "params": sum(p.numel() for p in official.parameters()),
                             "gflops": _gflops(official, (768, 16, 16))}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", default=os.environ.get("RAE_OFFICIAL_PATH"),
                        help="path to a bytetriper/RAE checkout (default: $RAE_OFFICIAL_PATH)")
    parser.add_argument("--commit", default=None, help="the checkout's commit, recorded in the reference")
    parser.add_argument("--out", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args()
    if not args.official:
        parser.error("give --official or set RAE_OFFICIAL_PATH")
    module = load_official(args.official)
    reference = make_reference(module)
    reference["official_files_sha256"] = _fingerprint(args.official)
    reference["official_commit"] = args.commit
    reference["stubbed_modules"] = module.STUBBED
    reference["torch_version"] = str(torch.__version__)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference, args.out)
    sizes = ", ".join(f"{k} {v['params'] / 1e6:.2f}M {v['gflops']:.2f} Gflops" for k, v in reference["real"].items())
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB): {len(reference['configs'])} configs; {sizes}")


if __name__ == "__main__":
    main()
