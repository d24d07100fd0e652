"""Record what the official improved MeanFlow code (Lyy-iiis/imeanflow, JAX/Flax, `imf.py`) computes, for
tests/test_imf.py to compare diffusion/imeanflow.py against.

Regenerate (from the repository root; CPU only, seconds). The official code needs JAX and Flax, which this project does
not: install them beside it for this script only (the tests read the JSON file and need neither).

    pip install "jax[cpu]" flax                            # the file was made with jax 0.10.2 and flax 0.12.8
    git clone https://github.com/Lyy-iiis/imeanflow /path/to/imeanflow          # branch main
    git -C /path/to/imeanflow checkout bf60cd7cb653f6628e59d48034b333c5eba445e2  # the commit read
    python tests/reference/make_imf_reference.py --official /path/to/imeanflow

The commit is taken from the checkout's git, or from `--commit` for an export without .git. It writes
tests/data/imf_reference.json (JSON, about 50 kB). Nothing of the official code is copied into this repository: its
`imf.py` is imported from the checkout (with its own `models` package, served under private module names so this
repository's `models` stays untouched), and only numbers are stored, with the SHA-256 of the official files read.

What runs: the official `iMeanFlow.forward(images, labels)` (the whole training loss: the draws of t, r, noise,
guidance scale and interval, the guided velocity, the JVP, the v-loss with its adaptive weight and the auxiliary
v-term) under `jax.value_and_grad` over the network's parameters, as its train step does, with the official network
replaced by `TinyNet` (defined here, in JAX and in PyTorch with the same numbers): a few parameters, smooth in every
input, returning (u, v) as the official network does, v being the same function at h = t - r = 0 (the boundary
condition diffusion/imeanflow.py uses for v_theta). A subclass of `iMeanFlow` swaps the network in (its `setup`) and
records, through flax's `sow`, every random draw of the loss as the official methods return it (sample_tr,
sample_cfg_interval, sample_cfg_scale and the U(0, 1) numbers it maps, the noise from guidance_fn's v_t = e - x).

Recorded for each case of CASES: the inputs (x in NHWC, labels), the draws, the loss, its two logged terms (loss_u,
loss_v: plain mean squared errors) and the gradient of every TinyNet parameter. Label dropout is off
(class_dropout_prob = 0): the official code drops labels inside the loss and keeps the conditional velocity of the
dropped label as their JVP tangent, while here train.py drops them before the objective sees them (docs/onestep.md).
"""

import argparse
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO_ROOT / "tests" / "data" / "imf_reference.json"
COMMIT_READ = "bf60cd7cb653f6628e59d48034b333c5eba445e2"
OFFICIAL_FILES = ("imf.py", "models/imfDiT.py", "models/embedder.py", "models/torch_models.py")

SHAPE = (32, 2, 2, 3)   # official layout (N, H, W, C); ours is (N, C, H, W)
NUM_CLASSES = 4         # labels 0..3; 4 is the null class
SEED = 0
# name: (norm_p, norm_eps, data_proportion (the official share of r = t), cfg_beta); "recipe" is iMF-B/2's.
CASES = {
    "recipe": (1.0, 0.01, 0.5, 1.0),
    "no_weight_beta2": (0.0, 0.01, 0.25, 2.0),
    "all_r_neq_t_p05": (0.5, 1e-3, 0.0, 0.5),
}


def tiny_params():
    """TinyNet's parameters (numpy float32), fixed by a seed: both frameworks use these numbers."""
    rng = np.random.default_rng(7)
    c = SHAPE[3]
    f32 = lambda a: np.asarray(a, dtype=np.float32)
    return {"W": f32(rng.normal(size=(c, c)) * 0.4), "bias": f32(rng.normal(size=c) * 0.1),
            "E": f32(rng.normal(size=(NUM_CLASSES + 1, c)) * 0.5), "c": f32(rng.normal(size=c) * 0.7),
            "d": f32(rng.normal(size=c) * 0.3), "k": f32(rng.normal(size=5) * 0.8)}


def inputs():
    """(x in NHWC, labels) as numpy arrays, no null labels."""
    rng = np.random.default_rng(1234)
    return (np.asarray(rng.normal(size=SHAPE), dtype=np.float32),
            np.asarray(rng.integers(0, NUM_CLASSES, size=SHAPE[0]), dtype=np.int32))


def tiny_u(P, x, t, h, g, t_min, t_max, y, np_):
    """The stand-in network's output on channels-last x (N, H, W, C), in either framework (np_: jax.numpy or a
    torch shim): tanh(x W + bias + E[y] + s c) (1 + g / 2) + d sin(3h + x) - x (1 - h) / 2 + 0.3 t h, with
    s = k . (t, h, g, t_min, t_max) and g = 1 - 1/omega."""
    col = lambda a: a.reshape(-1, 1, 1, 1)
    s = P["k"][0] * t + P["k"][1] * h + P["k"][2] * g + P["k"][3] * t_min + P["k"][4] * t_max
    pre = np_.matmul(x, P["W"]) + P["bias"] + P["E"][y][:, None, None, :] + col(s) * P["c"]
    return (np_.tanh(pre) * (1 + 0.5 * col(g)) + P["d"] * np_.sin(3 * col(h) + x) - 0.5 * x * (1 - col(h))
            + 0.3 * col(t * h))


class TorchTinyNet(torch.nn.Module):
    """TinyNet in PyTorch behind this repository's network call model(z, t, y, dt, guidance), z in NCHW; guidance
    (N, 3) = (1 - 1/omega, t_min, t_max) as diffusion/imeanflow.py hands it."""

    num_classes = NUM_CLASSES

    def __init__(self):
        super().__init__()
        self.p = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.from_numpy(v.copy()))
                                         for k, v in tiny_params().items()})

    def forward(self, z, t, y=None, dt=None, guidance=None):
        y = torch.full((len(z),), NUM_CLASSES, dtype=torch.long) if y is None else y
        g, t_min, t_max = guidance.unbind(1)
        out = tiny_u(self.p, z.permute(0, 2, 3, 1), t, dt, g, t_min, t_max, y, torch)
        return out.permute(0, 3, 1, 2)


# ---- the official side (JAX) ----------------------------------------------------------------------------------

def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_official(path):
    """The official imf.py module, imported from a checkout: its `from models import imfDiT` is served by the
    checkout's models/ files loaded under private names, and this repository's `models` modules are put back after.
    Returns (module, file hashes)."""
    root = Path(path).resolve()
    if not all((root / f).is_file() for f in OFFICIAL_FILES):
        raise FileNotFoundError(f"{root} is not a Lyy-iiis/imeanflow checkout (needs {', '.join(OFFICIAL_FILES)})")
    names = ("models", "models.torch_models", "models.embedder", "models.imfDiT")
    saved = {name: sys.modules.pop(name, None) for name in names}
    try:
        package = importlib.util.module_from_spec(importlib.util.spec_from_loader("models", loader=None,
                                                                                 is_package=True))
        package.__path__ = []
        sys.modules["models"] = package
        for name in names[1:]:
            module = _load(name, root / (name.replace(".", "/") + ".py"))
            setattr(package, name.split(".")[1], module)
        imf = _load("official_imeanflow_imf", root / "imf.py")
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    hashes = {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in OFFICIAL_FILES}
    return imf, hashes


def make_reference(imf, hashes, commit):
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    params = tiny_params()

    class TinyNet(nn.Module):
        """The official network's call net(x, t, h, w, t_min, t_max, y) -> (u, v) on TinyNet's numbers."""

        def setup(self):
            self.P = {k: self.param(k, lambda rng, v=v: jnp.asarray(v)) for k, v in params.items()}

        def __call__(self, x, t, h, w, t_min, t_max, y):
            P, g = self.P, 1 - 1 / w
            return (tiny_u(P, x, t, h, g, t_min, t_max, y, jnp),
                    tiny_u(P, x, t, jnp.zeros_like(h), g, t_min, t_max, y, jnp))

    class Probe(imf.iMeanFlow):
        """The official loss with TinyNet as its network, every random draw recorded."""

        def setup(self):
            self.net = TinyNet()

        def sample_tr(self, bz):
            t, r, fm_mask = super().sample_tr(bz)
            self.sow("intermediates", "t", t.reshape(bz))
            self.sow("intermediates", "r", r.reshape(bz))
            return t, r, fm_mask

        def sample_cfg_interval(self, bz, fm_mask=None):
            t_min, t_max = super().sample_cfg_interval(bz, fm_mask)
            self.sow("intermediates", "t_min", t_min.reshape(bz))
            self.sow("intermediates", "t_max", t_max.reshape(bz))
            return t_min, t_max

        def sample_cfg_scale(self, bz, s_max=7.0):
            uniform = jax.random.uniform
            seen = []
            def recording(*args, **kwargs):   # the one U(0, 1) draw the official map turns into omega
                seen.append(uniform(*args, **kwargs))
                return seen[-1]
            jax.random.uniform = recording
            try:
                omega = super().sample_cfg_scale(bz, s_max)
            finally:
                jax.random.uniform = uniform
            self.sow("intermediates", "omega_uniform", seen[0].reshape(bz))
            self.sow("intermediates", "omega", omega.reshape(bz))
            return omega

        def guidance_fn(self, v_t, z_t, t, r, y, fm_mask, w, t_min, t_max):
            self.sow("intermediates", "v_t", v_t)
            return super().guidance_fn(v_t, z_t, t, r, y, fm_mask, w, t_min, t_max)

    x_np, y_np = inputs()
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    ref = {"files": hashes, "commit": commit, "versions": {"jax": jax.__version__},
           "shape": list(SHAPE), "num_classes": NUM_CLASSES, "params": {k: v.tolist() for k, v in params.items()},
           "x": x_np.tolist(), "labels": y_np.tolist(), "cases": {}}
    for case, (norm_p, norm_eps, data_proportion, cfg_beta) in CASES.items():
        model = Probe(model_str="unused", num_classes=NUM_CLASSES, data_proportion=data_proportion, cfg_beta=cfg_beta,
                      class_dropout_prob=0.0, norm_p=norm_p, norm_eps=norm_eps)
        key = jax.random.PRNGKey(SEED)
        variables = model.init({"params": key, "gen": key}, x, jnp.ones(SHAPE[0]), y)

        def loss_fn(p):
            (loss, terms), state = model.apply({"params": p}, images=x, labels=y, rngs={"gen": key},
                                               method=Probe.forward, mutable=["intermediates"])
            return loss, (terms, state["intermediates"])

        (loss, (terms, seen)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        seen = {k: np.asarray(v[0]) for k, v in seen.items()}
        draws = {k: seen[k].tolist() for k in ("t", "r", "omega", "omega_uniform", "t_min", "t_max")}
        draws["noise"] = (seen["v_t"] + x_np).tolist()   # v_t = e - x
        ref["cases"][case] = {
            "config": dict(norm_p=norm_p, norm_eps=norm_eps, data_proportion=data_proportion, cfg_beta=cfg_beta),
            "draws": draws, "loss": float(loss), "loss_u": float(terms["loss_u"]), "loss_v": float(terms["loss_v"]),
            "grads": {k: np.asarray(v).tolist() for k, v in grads["net"].items()}}
    return ref


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", required=True, help="a checkout of Lyy-iiis/imeanflow")
    parser.add_argument("--commit", help="the commit of an export without .git")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args()
    imf, hashes = load_official(args.official)
    commit = args.commit
    if commit is None:
        try:
            commit = subprocess.run(["git", "-C", args.official, "rev-parse", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (subprocess.CalledProcessError, FileNotFoundError):
            raise SystemExit("not a git checkout: give the commit it was exported from with --commit") from None
    ref = make_reference(imf, hashes, commit)
    Path(args.output).write_text(json.dumps(ref))
    print(f"wrote {args.output} ({len(ref['cases'])} cases, imeanflow {commit})")


if __name__ == "__main__":
    main()
