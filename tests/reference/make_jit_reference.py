"""Record what the official LTH14/JiT code computes (network, loss, samplers), for tests/test_jit.py and
tests/test_xpred.py to compare against.

Regenerate (from the repository root, with the project's environment active; CPU only, seconds):

    git clone https://github.com/LTH14/JiT /path/to/JiT           # or any checkout of it; recorded: OFFICIAL_COMMIT
    python tests/reference/make_jit_reference.py --official /path/to/JiT     # or JIT_OFFICIAL_PATH=/path/to/JiT

It writes tests/data/jit_reference.pt (about 0.5 MB; loads with torch.load(weights_only=True)). Nothing of the official
code is copied into this repository: its model_jit.py and denoiser.py are imported from the checkout and only their
outputs are stored, with the SHA-256 of the official files that produced them. The official code is CUDA-only and
compiled; to run it eagerly on a CPU, while it is imported and run here `torch.compile` is the identity and
`Tensor.cuda()` returns the tensor itself (its rotary tables and attention bias call .cuda(); nothing else changes).

Stored, for each network config in CONFIGS (a small JiT on 3x32x32 images, patch 8: 192-value patches, a
bottleneck of 16, hidden 64, 4 blocks, 10 classes), our models.jit.JiT filled with seeded random values
(`fill_seeded_`, reproducible, so the weights are not stored) and loaded into the official JiT with strict=True but
keeping the official pos_embed: the official output for fixed x, t in [0, 1], labels with the null class; the
official pos_embed and rotary tables; a weights checksum. For the first config, the official Denoiser (the whole
JiT objective) on that network: the loss for a fixed batch and seed (with the t and noise its RNG drew, replayed),
and the Euler and Heun samplers with CFG on an interval from a fixed seed (with the noise they drew). And the
official JiT-{B,L,H}/16 key -> shape maps (meta device).
"""

import argparse
import contextlib
import hashlib
import importlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
DEFAULT_OUTPUT = REPO_ROOT / "tests" / "data" / "jit_reference.pt"
# The LTH14/JiT commit the stored reference was made from ("include pretrained ckpts", 2025-12-07; the network,
# loss and samplers are those of the first release 869190a, which differs only in README.md and a blank line).
OFFICIAL_COMMIT = "cbc743a2ada5e9762697da2c83f8c4f8379e8c17"
OFFICIAL_FILES = ("model_jit.py", "denoiser.py", "util/model_util.py")

SMALL = dict(input_size=32, patch_size=8, in_channels=3, hidden_size=64, depth=4, num_heads=4, num_classes=10,
             bottleneck_dim=16)
CONFIGS = {
    "in_context": dict(in_context_len=3, in_context_start=2),      # the class tokens join before block 2
    "at_start": dict(in_context_len=2, in_context_start=0),        # ... before the first block
    "none": dict(in_context_len=0, in_context_start=0),            # no class tokens
}
REAL = ("JiT-B/16", "JiT-L/16", "JiT-H/16")
# The official Denoiser's settings for the loss and sampler references (its argparse names; JiT's defaults except
# the number of steps and the guidance, chosen to exercise the interval: grid 0, .2, .4, .6, .8, 1).
DENOISER = dict(P_mean=-0.8, P_std=0.8, t_eps=0.05, noise_scale=1.0, steps=5, cfg=2.0, interval_min=0.3,
                interval_max=0.9)
SEED = 0


def fill_seeded_(model, seed=SEED):
    """Every parameter <- seeded N(0, 1/fan_in) (vectors: 1 + N(0, 0.1^2) for norm weights, N(0, 0.1^2) otherwise),
    rounded to fp16 values. The fixed pos_embed is left as it is."""
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
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    y = torch.tensor([0, 3, 9, SMALL["num_classes"]])   # the last is the null class
    return x, t, y


def ours_for(options):
    from models import JiT
    return fill_seeded_(JiT(**SMALL, **options, learn_sigma=False)).eval()


@contextlib.contextmanager
def eager_on_cpu():
    """While the official code is imported and run: torch.compile is the identity, Tensor.cuda() a no-op."""
    compile_, cuda = torch.compile, torch.Tensor.cuda
    torch.compile = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.compile, torch.Tensor.cuda = compile_, cuda


def load_official(official):
    """The official (model_jit, denoiser) modules, imported from a checkout."""
    official = Path(official).resolve()
    if not all((official / f).is_file() for f in OFFICIAL_FILES):
        raise FileNotFoundError(f"{official} is not an LTH14/JiT checkout (needs {', '.join(OFFICIAL_FILES)})")
    if "model_jit" in sys.modules and "denoiser" in sys.modules:
        return sys.modules["model_jit"], sys.modules["denoiser"]
    sys.path.insert(0, str(official))
    try:
        with eager_on_cpu():
            model_jit = importlib.import_module("model_jit")
            denoiser = importlib.import_module("denoiser")
    finally:
        sys.path.remove(str(official))
    return model_jit, denoiser


def fingerprint(official):
    official = Path(official).resolve()
    return {f: hashlib.sha256((official / f).read_bytes()).hexdigest() for f in OFFICIAL_FILES}


def official_network(model_jit, options):
    """The official JiT of a config, holding our seeded weights (its own pos_embed kept)."""
    ours = ours_for(options)
    with eager_on_cpu():
        net = model_jit.JiT(**{k: v for k, v in SMALL.items()}, **options).eval()
    state = {k: v for k, v in ours.state_dict().items() if k != "pos_embed"}
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert missing == ["pos_embed"] and not unexpected, (missing, unexpected)
    assert sorted(net.state_dict()) == sorted(ours.state_dict()), "the key names differ"
    return net, state


def denoiser_for(denoiser_module, model_jit, net, method):
    """The official Denoiser (loss, EMA, samplers) around `net`."""
    d = DENOISER
    name = "small-reference"
    model_jit.JiT_models[name] = lambda **kwargs: net   # denoiser.py's JiT_models is this dict
    args = SimpleNamespace(model=name, img_size=SMALL["input_size"], class_num=SMALL["num_classes"], attn_dropout=0.0,
                           proj_dropout=0.0, label_drop_prob=0.1, P_mean=d["P_mean"], P_std=d["P_std"],
                           t_eps=d["t_eps"], noise_scale=d["noise_scale"], ema_decay1=0.9999, ema_decay2=0.9996,
                           sampling_method=method, num_sampling_steps=d["steps"], cfg=d["cfg"],
                           interval_min=d["interval_min"], interval_max=d["interval_max"])
    with eager_on_cpu():
        return denoiser_module.Denoiser(args).eval()


def objective_reference(denoiser_module, model_jit, net):
    """The official loss (eval mode: no label dropout) for a fixed batch and seed, and both samplers."""
    x, _, _ = inputs()
    labels = torch.tensor([1, 2, 5, 7])
    out = {"x": x, "labels": labels, "settings": dict(DENOISER)}
    d = DENOISER
    with eager_on_cpu(), torch.no_grad():
        den = denoiser_for(denoiser_module, model_jit, net, "euler")
        torch.manual_seed(SEED + 5)
        out["loss"] = den(x, labels)
        torch.manual_seed(SEED + 5)   # replay the draws of Denoiser.forward: t (N,), then the noise like x
        out["t"] = torch.sigmoid(torch.randn(x.shape[0]) * d["P_std"] + d["P_mean"])
        out["noise"] = torch.randn_like(x) * d["noise_scale"]
        for method in ("euler", "heun"):
            den = denoiser_for(denoiser_module, model_jit, net, method)
            torch.manual_seed(SEED + 6)
            out[f"samples_{method}"] = den.generate(labels)
        torch.manual_seed(SEED + 6)   # replay generate's draw
        out["sample_noise"] = d["noise_scale"] * torch.randn(labels.shape[0], 3, SMALL["input_size"],
                                                             SMALL["input_size"])
    return out


def make_reference(modules):
    """Every reference quantity, computed with the official code."""
    model_jit, denoiser_module = modules
    x, t, y = inputs()
    out = {"inputs": {"x": x, "t": t, "y": y}, "configs": {}}
    for name, options in CONFIGS.items():
        net, state = official_network(model_jit, options)
        with eager_on_cpu(), torch.no_grad():
            output = net(x, t, y)
        assert output.abs().mean() > 0.05, "the filled model should not output (near) zero"
        tables = {"pos_embed": net.pos_embed.detach().clone()}
        for rope in ("feat_rope", "feat_rope_incontext"):
            for part in ("freqs_cos", "freqs_sin"):
                tables[f"{rope}.{part}"] = getattr(getattr(net, rope), part).detach().clone()
        out["configs"][name] = {"options": options, "output": output, "tables": tables,
                                "weights_checksum": float(sum(v.double().sum() for v in state.values()))}
        if name == "in_context":
            out["objective"] = objective_reference(denoiser_module, model_jit, net)
    out["real"] = {}
    for name in REAL:
        with eager_on_cpu(), torch.device("meta"):
            net = model_jit.JiT_models[name](input_size=256, in_channels=3, num_classes=1000)
        out["real"][name] = {k: list(v.shape) for k, v in net.state_dict().items()}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", default=os.environ.get("JIT_OFFICIAL_PATH"),
                        help="path to an LTH14/JiT checkout (default: $JIT_OFFICIAL_PATH)")
    parser.add_argument("--out", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args()
    if not args.official:
        parser.error("give --official /path/to/JiT or set JIT_OFFICIAL_PATH")
    reference = make_reference(load_official(args.official))
    reference["official_files_sha256"] = fingerprint(args.official)
    reference["official_commit"] = OFFICIAL_COMMIT
    reference["torch_version"] = str(torch.__version__)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference, args.out)
    print(f"wrote {args.out}: {len(reference['configs'])} network configs, loss {reference['objective']['loss']:.6f}")


if __name__ == "__main__":
    main()
