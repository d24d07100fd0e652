"""Record what the official hustvl/LightningDiT network computes, for tests/test_lightningdit.py to compare against.

Regenerate (from the repository root, with the project's environment active; CPU only, seconds):

    git clone https://github.com/hustvl/LightningDiT /path/to/LightningDiT    # or any existing checkout
    pip install einops                                                       # the official pos_embed.py imports it
    python tests/reference/make_lightningdit_reference.py --official /path/to/LightningDiT

It writes tests/data/lightningdit_reference.pt (a few kB; loads with torch.load(weights_only=True)). Nothing of the
official code is copied into this repository: its models/ package is imported from the checkout (with its
@torch.compile decorators made no-ops and the fairscale import its rmsnorm.py makes but never uses stubbed out),
and only its outputs are stored, with the SHA-256 of the official files that produced them.

For each option set in CONFIGS, a small model (depth 2, hidden 64, 4 heads, patch 2, 8x8x4 input, 10 classes) is
built with *our* models.DiT, every parameter filled with seeded random values (`fill_seeded_`, reproducible from
the seed, so the weights are not stored), and loaded into the official LightningDiT with strict=True but keeping the
official model's own pos_embed and rotary tables, so the official output also checks our tables. Stored: the
official outputs for fixed x, t in [0, 1] and labels including the null class; the official rotary tables and
pos_embed; a checksum of the weights; and the official LightningDiT-XL/1 key -> shape map (meta device).
"""

import argparse
import hashlib
import importlib.util
import sys
import types
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
DEFAULT_OUTPUT = REPO_ROOT / "tests" / "data" / "lightningdit_reference.pt"

SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10,
             learn_sigma=False)
# Our option names -> the official constructor's.
CONFIGS = {
    "shipped": dict(norm="rmsnorm", mlp="swiglu", rope=True),             # LightningDiT's released config
    "all": dict(norm="rmsnorm", mlp="swiglu", rope=True, qk_norm=True, wo_shift=True),
    "qk_layernorm": dict(qk_norm=True),                                   # QK-norm without RMSNorm: affine LayerNorm
    "rope": dict(rope=True),
    "swiglu": dict(mlp="swiglu"),
    "rmsnorm": dict(norm="rmsnorm"),
    "wo_shift": dict(wo_shift=True),
    "none": dict(),                                                       # every option off: the DiT block
}
SEED = 0


def official_kwargs(options):
    return dict(use_rmsnorm=options.get("norm") == "rmsnorm", use_swiglu=options.get("mlp") == "swiglu",
                use_rope=options.get("rope", False), use_qknorm=options.get("qk_norm", False),
                wo_shift=options.get("wo_shift", False))


def fill_seeded_(model, seed=SEED):
    """Every parameter <- seeded N(0, 1/fan_in) (vectors: 1 + N(0, 0.1^2) for norm weights, N(0, 0.1^2) otherwise),
    rounded to fp16 values. The fixed pos_embed and rotary buffers are left as they are."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = p[0].numel() ** -0.5 if p.ndim > 1 else 0.1
            value = torch.randn(p.shape, generator=g) * std
            if p.ndim == 1 and "norm" in name:
                value = value + 1
            p.copy_(value.half().float())
    return model


def inputs(seed=SEED):
    g = torch.Generator().manual_seed(seed + 2)
    n, size = 4, SMALL["input_size"]
    x = torch.randn(n, SMALL["in_channels"], size, size, generator=g)
    t = torch.tensor([0.0, 0.25, 0.6, 1.0])
    y = torch.tensor([0, 3, 9, SMALL["num_classes"]])   # the last is the null class
    return x, t, y


def load_official(official):
    """The official models/lightningdit.py, imported from a checkout as `official_lightningdit`."""
    official = Path(official).resolve()
    source = official / "models" / "lightningdit.py"
    if not source.is_file():
        raise FileNotFoundError(f"{official} is not a hustvl/LightningDiT checkout (no models/lightningdit.py)")
    if "official_lightningdit" in sys.modules:
        return sys.modules["official_lightningdit"]
    # rmsnorm.py imports fairscale's model-parallel layers for a Llama class it defines but LightningDiT never uses.
    fairscale = types.ModuleType("fairscale")
    for sub in ("fairscale.nn", "fairscale.nn.model_parallel", "fairscale.nn.model_parallel.initialize",
                "fairscale.nn.model_parallel.layers"):
        sys.modules.setdefault(sub, types.ModuleType(sub))
    layers = sys.modules["fairscale.nn.model_parallel.layers"]
    layers.ColumnParallelLinear = layers.ParallelEmbedding = layers.RowParallelLinear = object
    sys.modules.setdefault("fairscale", fairscale)
    compile_ = torch.compile
    torch.compile = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)   # eager, as the reference
    saved_models = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "models" or k.startswith("models.")}
    sys.path.insert(0, str(official))
    try:
        spec = importlib.util.spec_from_file_location("official_lightningdit", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)     # its `from models.x import ...` resolve to the checkout's models/
    finally:
        sys.path.remove(str(official))
        for k in [k for k in sys.modules if k == "models" or k.startswith("models.")]:
            sys.modules[f"official_lightningdit_{k}"] = sys.modules.pop(k)
        sys.modules.update(saved_models)
        torch.compile = compile_
    sys.modules["official_lightningdit"] = module
    return module


def _fingerprint(official):
    official = Path(official).resolve()
    files = [official / "models" / f for f in ("lightningdit.py", "pos_embed.py", "rmsnorm.py", "swiglu_ffn.py")]
    return {str(f.relative_to(official)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def ours_for(options):
    from models import DiT
    torch.manual_seed(SEED)
    return fill_seeded_(DiT(**SMALL, **options)).eval()


def make_reference(official_module):
    """Every reference quantity, computed with the official code."""
    x, t, y = inputs()
    out = {"inputs": {"x": x, "t": t, "y": y}, "configs": {}}
    for name, options in CONFIGS.items():
        ours = ours_for(options)
        official = official_module.LightningDiT(**SMALL, class_dropout_prob=0.1, **official_kwargs(options)).eval()
        tables = {k: v.detach().clone() for k, v in official.state_dict().items()
                  if k == "pos_embed" or k.startswith("feat_rope.")}
        state = {k: v for k, v in ours.state_dict().items() if k not in tables}
        missing, unexpected = official.load_state_dict(state, strict=False)
        assert sorted(missing) == sorted(tables) and not unexpected, (missing, unexpected)
        assert sorted(official.state_dict()) == sorted(ours.state_dict()), "the key names differ"
        with torch.no_grad():
            output = official(x, t, y)
        assert output.abs().mean() > 0.05, "the filled model should not output (near) zero"
        out["configs"][name] = {"options": options, "output": output, "tables": tables,
                                "weights_checksum": float(sum(v.double().sum() for v in state.values()))}
    with torch.device("meta"):
        xl1 = official_module.LightningDiT_models["LightningDiT-XL/1"](
            input_size=16, in_channels=32, use_rmsnorm=True, use_swiglu=True, use_rope=True)
    out["xl1_shapes"] = {k: list(v.shape) for k, v in xl1.state_dict().items()}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, help="path to a hustvl/LightningDiT checkout")
    parser.add_argument("--out", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args()
    reference = make_reference(load_official(args.official))
    reference["official_files_sha256"] = _fingerprint(args.official)
    reference["torch_version"] = str(torch.__version__)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference, args.out)
    print(f"wrote {args.out}: {len(reference['configs'])} option sets")


if __name__ == "__main__":
    main()
