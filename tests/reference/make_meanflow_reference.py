"""Record what the official PyTorch MeanFlow (Gsunshine/py-meanflow) computes, for tests/test_meanflow.py.

Regenerate (from the repository root, with the project's environment active; CPU only, seconds):

    git clone https://github.com/Gsunshine/py-meanflow /path/to/py-meanflow   # the commit recorded in the file is used
    python tests/reference/make_meanflow_reference.py --official /path/to/py-meanflow

It writes tests/data/meanflow_reference.pt (loads with torch.load(weights_only=True)). Nothing of py-meanflow is copied
into this repository: its `MeanFlow` module (meanflow/models/meanflow.py, with its time sampler and EMA helpers) is
imported from the checkout under private names, and only its outputs are stored, with the SHA-256 of those files.

What is stored, for a fixed small network (`FixedNet`, defined here: a conv, the two times and a nonlinearity, with
parameters so the gradients can be compared) and fixed data, for each case of CASES (time sampler, ratio of r != t,
adaptive weight), with torch's global RNG seeded just before the call (py-meanflow draws its noise, t, r and the r = t
mask from it; ours draws the same numbers in the same order from a generator with the same seed):
  loss    MeanFlow.forward_with_loss: the batch mean of the adaptively weighted loss
  grads   the gradient of that loss for every parameter of the network
  after   the next draw of the RNG after the call (how many numbers it consumed)
py-meanflow is unconditional (CIFAR-10), so guidance (omega, kappa) is not part of the comparison; tests/test_meanflow.py
checks it against its formula. `load_official` and `make_reference` are imported by the tests, which also run them
live when MEANFLOW_OFFICIAL_PATH points to a checkout.
"""

import argparse
import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO_ROOT / "tests" / "data" / "meanflow_reference.pt"
FILES = ("meanflow/models/meanflow.py", "meanflow/models/time_sampler.py", "meanflow/models/ema.py")
SHAPE = (6, 2, 4, 4)   # (N, C, H, W)
SEED = 0
# name: (P_mean, P_std, ratio of r != t, norm_p, norm_eps); "paper" is MeanFlow's ImageNet recipe.
CASES = {
    "paper": (-0.4, 1.0, 0.25, 1.0, 0.01),
    "all_r_neq_t_no_weight": (0.0, 1.2, 1.0, 0.0, 0.01),
    "half_p05": (0.3, 0.8, 0.5, 0.5, 1e-3),
}


class FixedNet(nn.Module):
    """A stand-in network u(z, t, y, dt): smooth in z, t and dt, with a few parameters (fixed by a seed)."""

    def __init__(self, channels=SHAPE[1]):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.scale = nn.Parameter(torch.randn(channels, generator=g) * 0.5)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
            self.conv.bias.copy_(torch.randn(channels, generator=g) * 0.1)

    def forward(self, z, t, y=None, dt=None):
        t, h = t.view(-1, 1, 1, 1), dt.view(-1, 1, 1, 1)
        a = self.conv(z) * (1 + t) + self.scale.view(1, -1, 1, 1) * torch.sin(3 * h + z)
        return torch.tanh(a) - 0.5 * z * (1 - h) + 0.3 * t * h


class OfficialArch(nn.Module):
    """FixedNet behind py-meanflow's network call net(z, (t, h), aug_cond)."""

    def __init__(self):
        super().__init__()
        self.inner = FixedNet()

    def forward(self, z, time_steps, aug_cond=None):
        t, h = time_steps
        return self.inner(z, t, None, dt=h)


def inputs():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234))


def official_args(case):
    p_mean, p_std, ratio, norm_p, norm_eps = CASES[case]
    return SimpleNamespace(tr_sampler="v0", P_mean_t=p_mean, P_std_t=p_std, P_mean_r=p_mean, P_std_r=p_std,
                           ratio=ratio, norm_p=norm_p, norm_eps=norm_eps, ema_decay=0.9999, ema_decays=[])


def our_config(case):
    p_mean, p_std, ratio, norm_p, norm_eps = CASES[case]
    return dict(objective="meanflow", time_sampling="logit_normal", time_mean=p_mean, time_std=p_std,
                ratio_r_neq_t=ratio, norm_p=norm_p, norm_eps=norm_eps)


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_official(path):
    """py-meanflow's MeanFlow class, imported from a checkout (its `models.*` imports served from private copies, so
    this repository's `models` package is untouched); (MeanFlow, file hashes, commit)."""
    root = Path(path)
    helpers = {"models.time_sampler": root / FILES[1], "models.ema": root / FILES[2]}
    saved = {name: sys.modules.get(name) for name in helpers}
    try:
        for name, file in helpers.items():
            sys.modules[name] = _load(f"py_meanflow_{name.split('.')[1]}", file)
        module = _load("py_meanflow_meanflow", root / FILES[0])
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    hashes = {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in FILES}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        commit = "unknown (not a git checkout)"
    return module.MeanFlow, hashes, commit


def make_reference(official_meanflow, hashes, commit):
    x = inputs()
    ref = {"files": hashes, "commit": commit, "cases": {}}
    for case in CASES:
        mf = official_meanflow(OfficialArch, official_args(case), {})
        torch.manual_seed(SEED)
        loss = mf.forward_with_loss(x, aug_cond=None)
        after = torch.rand(1)
        loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in mf.net.inner.named_parameters()}
        ref["cases"][case] = {"loss": loss.detach(), "grads": grads, "after": after}
    return ref


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", required=True, help="a checkout of Gsunshine/py-meanflow")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args()
    ref = make_reference(*load_official(args.official))
    torch.save(ref, args.output)
    print(f"wrote {args.output} ({len(ref['cases'])} cases, py-meanflow {ref['commit']})")


if __name__ == "__main__":
    main()
