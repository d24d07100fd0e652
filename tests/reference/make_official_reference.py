"""Record what the official facebookresearch/DiT code computes, for tests/test_parity.py to compare against.

Regenerate (from the repository root, with the project's environment active; CPU only, a few seconds):

    git clone https://github.com/facebookresearch/DiT /path/to/DiT     # or any existing checkout
    python tests/reference/make_official_reference.py --official /path/to/DiT

It writes tests/data/official_reference.pt (about 0.7 MB; loads with torch.load(weights_only=True)).
Nothing of the official code is copied into this repository: it is imported from the checkout, and only
its outputs are stored, together with the SHA-256 of the official files that produced them.

What is stored:
  model      a small DiT (depth 2, hidden 64, 4 heads, patch 2, 8x8x4 input, 10 classes, learned sigma) built
             with *our* code, every parameter filled with seeded random values (stored exactly, as fp16
             values), loaded into the official DiT with strict=True; the official outputs for fixed x, integer
             and fractional t, y including the null class, and forward_with_cfg; the official model's own
             sin-cos pos_embed (from its initialisation, before loading ours).
  xl2_shapes the state_dict key -> shape map of the official DiT-XL/2 (1000 classes, 32x32 latents), built on
             the meta device.
  diffusion  for several create_diffusion(...) configurations: timestep_map and alphas_cumprod; q_sample,
             q_posterior_mean_variance, p_mean_variance (clip on/off) and training_losses with fixed inputs,
             fixed noise and a fixed model function (`fixed_model`, below); for short processes also
             p_sample_loop and ddim_sample_loop (eta 0 and 0.5) with a seed set just before the loop, and
             the next draw of the global RNG after each loop (how many numbers the loop consumed).

`load_official` and `make_reference` are imported by tests/test_parity.py, which also runs them directly
(instead of reading the file) when the environment variable DIT_OFFICIAL_PATH points to a checkout.
"""

import argparse
import hashlib
import importlib.util
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO_ROOT / "tests" / "data" / "official_reference.pt"

SMALL_DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                 num_classes=10, learn_sigma=True)
CFG_SCALE = 4.0
SEED = 0

# create_diffusion(...) arguments; the name is the key in the reference file.
DIFFUSION_CONFIGS = {
    "default": dict(timestep_respacing=""),
    "fixed_large": dict(timestep_respacing="", learn_sigma=False),
    "fixed_small": dict(timestep_respacing="", learn_sigma=False, sigma_small=True),
    "predict_xstart": dict(timestep_respacing="", predict_xstart=True),
    "cosine": dict(timestep_respacing="", noise_schedule="squaredcos_cap_v2"),
    "kl": dict(timestep_respacing="", use_kl=True),
    "kl_25": dict(timestep_respacing="25", use_kl=True),
    "rescaled_mse_25": dict(timestep_respacing="25", rescale_learned_sigmas=True),
    "respace_25": dict(timestep_respacing="25"),
    "ddim10": dict(timestep_respacing="ddim10"),
    "sections_5_5": dict(timestep_respacing="5,5"),
    "fixed_small_5_5": dict(timestep_respacing="5,5", learn_sigma=False, sigma_small=True),
    "fixed_large_cosine_ddim10": dict(timestep_respacing="ddim10", learn_sigma=False,
                                      noise_schedule="squaredcos_cap_v2"),
}
MAX_LOOP_STEPS = 25   # the sampling loops are recorded only for processes this short
DDIM_ETA = 0.5
SHAPE = (4, 2, 4, 4)  # (N, C, H, W) of the diffusion inputs


def fixed_model(learn_sigma):
    """A deterministic stand-in for a network, model(x, t, y): smooth in x, and dependent on the timestep it
    receives (so a wrong respacing map changes the output) and on y. With learn_sigma it also returns
    v in (-1, 1), the variance interpolation."""
    def model(x, t, y):
        s = (t.float() / 1000).view(-1, 1, 1, 1)
        c = (y.float() / 10).view(-1, 1, 1, 1)
        out = torch.tanh(0.7 * x + 2 * s - c) + 0.3 * torch.sin(3 * x * (1 + s))
        if not learn_sigma:
            return out
        return torch.cat([out, torch.tanh(0.5 * x - s + c)], dim=1)
    return model


def fill_seeded_(model, seed=SEED):
    """Replace every parameter by seeded N(0, 1/fan_in) values (biases N(0, 0.1^2)), rounded to fp16 values
    so they can be stored exactly in half the space. The fixed pos_embed buffer is left as it is."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1
            if p.ndim == 4:  # the patch-embedding conv: fan_in = C * p * p
                std = p[0].numel() ** -0.5
            p.copy_((torch.randn(p.shape, generator=g) * std).half().float())
    return model


def diffusion_inputs(seed=SEED):
    """Fixed inputs for the diffusion quantities: x0 on the 256-level grid of [-1, 1] (with both ends, where
    the decoder likelihood takes its tail branches), noise, an independent x_t and class labels."""
    g = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randint(0, 256, SHAPE, generator=g).float() / 127.5 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])
    return dict(x0=x0, noise=torch.randn(SHAPE, generator=g), x_t=torch.randn(SHAPE, generator=g),
                y=torch.tensor([0, 3, 9, 10]))


def timesteps_for(num_timesteps):
    """Indices 0 (decoder NLL), 1, the middle and the last step of a process with num_timesteps steps."""
    return torch.tensor([0, 1, num_timesteps // 2, num_timesteps - 1])


def compute_diffusion_quantities(create_diffusion, kwargs, inputs):
    """Everything recorded for one configuration; `create_diffusion` is the official factory or ours, so the
    same function computes the reference and the values under test."""
    diffusion = create_diffusion(**kwargs)
    learn_sigma = kwargs.get("learn_sigma", True)
    model = fixed_model(learn_sigma)
    x0, noise, x_t, y = inputs["x0"], inputs["noise"], inputs["x_t"], inputs["y"]
    t = timesteps_for(diffusion.num_timesteps)
    out = {"timestep_map": [int(i) for i in diffusion.timestep_map],
           "alphas_cumprod": torch.from_numpy(diffusion.alphas_cumprod.copy()),
           "t": t}
    out["q_sample"] = diffusion.q_sample(x0, t, noise=noise)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t, t)
    out["q_posterior"] = {"mean": mean, "variance": var, "log_variance": log_var}
    for clip in (True, False):
        pmv = diffusion.p_mean_variance(model, x_t, t, clip_denoised=clip, model_kwargs=dict(y=y))
        out[f"p_mean_variance_clip_{clip}"] = {k: pmv[k] for k in ("mean", "variance", "log_variance", "pred_xstart")}
    losses = diffusion.training_losses(model, x0, t, model_kwargs=dict(y=y), noise=noise)
    out["training_losses"] = {k: v.detach() for k, v in losses.items()}
    if diffusion.num_timesteps <= MAX_LOOP_STEPS:
        shape = tuple(x0.shape)
        kw = dict(model_kwargs=dict(y=y), device="cpu")
        loops = {
            "p_sample_loop": (diffusion.p_sample_loop, dict(noise=noise)),
            # No initial noise given: the loop draws x_T first, then one draw per step.
            "p_sample_loop_fresh_noise": (diffusion.p_sample_loop, dict()),
            "p_sample_loop_no_clip": (diffusion.p_sample_loop, dict(noise=noise, clip_denoised=False)),
            "ddim_eta_0": (diffusion.ddim_sample_loop, dict(noise=noise)),
            f"ddim_eta_{DDIM_ETA}": (diffusion.ddim_sample_loop, dict(noise=noise, eta=DDIM_ETA)),
        }
        out["rng_after"] = {}
        for name, (loop, loop_kwargs) in loops.items():
            torch.manual_seed(SEED)
            out[name] = loop(model, shape, **loop_kwargs, **kw)
            # The next draw after the loop shows how many numbers the loop consumed.
            out["rng_after"][name] = torch.randn(3)
    return out


def _import_path(name, path, package_dir=None):
    """Import a file (or a package, given its folder) under a name of our choosing."""
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(package_dir)] if package_dir else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_official(official):
    """The official `models` module and `diffusion` package from a checkout, imported as `official_dit_models`
    and `official_dit_diffusion`: their own names would collide with this repository's models/ and diffusion/."""
    official = Path(official).resolve()
    if not (official / "models.py").is_file() or not (official / "diffusion" / "__init__.py").is_file():
        raise FileNotFoundError(f"{official} is not a facebookresearch/DiT checkout (no models.py / diffusion/)")
    models_module = (sys.modules.get("official_dit_models")
                     or _import_path("official_dit_models", official / "models.py"))
    diffusion_package = (sys.modules.get("official_dit_diffusion")
                         or _import_path("official_dit_diffusion", official / "diffusion" / "__init__.py",
                                         official / "diffusion"))
    return models_module, diffusion_package


def _fingerprint(official):
    official = Path(official).resolve()
    files = [official / "models.py", *sorted((official / "diffusion").glob("*.py"))]
    return {str(f.relative_to(official)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def make_reference(official_models, official_diffusion):
    """Compute every reference quantity with the official code (a dict of tensors, lists, strings and numbers)."""
    from models import DiT  # ours, only to build the weights both models share

    torch.manual_seed(SEED)
    ours = fill_seeded_(DiT(**SMALL_DIT)).eval()
    state = ours.state_dict()
    official = official_models.DiT(**SMALL_DIT).eval()  # eval(): no label dropout
    official_pos_embed = official.pos_embed.detach().clone()
    official.load_state_dict(state, strict=True)

    g = torch.Generator().manual_seed(SEED + 2)
    n, size = 4, SMALL_DIT["input_size"]
    x = torch.randn(n, SMALL_DIT["in_channels"], size, size, generator=g)
    t_int = torch.tensor([0, 17, 500, 999])
    t_frac = torch.tensor([0.5, 3.25, 250.75, 998.9])
    y = torch.tensor([0, 3, 9, SMALL_DIT["num_classes"]])  # the last is the null class
    with torch.no_grad():
        out_int, out_frac = official(x, t_int, y), official(x, t_frac, y)
        y_cfg = torch.cat([y, torch.full_like(y, SMALL_DIT["num_classes"])])
        out_cfg = official.forward_with_cfg(torch.cat([x, x]), torch.cat([t_int, t_int]), y_cfg, CFG_SCALE)
    assert out_int.abs().mean() > 0.1, "the filled model should not output (near) zero"

    with torch.device("meta"):
        xl2 = official_models.DiT_models["DiT-XL/2"](input_size=32, num_classes=1000)
    xl2_shapes = {k: list(v.shape) for k, v in xl2.state_dict().items()}

    inputs = diffusion_inputs()
    diffusion = {name: compute_diffusion_quantities(official_diffusion.create_diffusion, kwargs, inputs)
                 for name, kwargs in DIFFUSION_CONFIGS.items()}
    return {
        "model": {
            "config": dict(SMALL_DIT),
            # fp16 holds the filled values exactly (see fill_seeded_), at half the size.
            "state_dict": {k: v.half() if k != "pos_embed" else v for k, v in state.items()},
            "official_pos_embed": official_pos_embed,
            "x": x, "t_int": t_int, "t_frac": t_frac, "y": y, "cfg_scale": CFG_SCALE,
            "out_int": out_int, "out_frac": out_frac, "out_cfg": out_cfg,
        },
        "xl2_shapes": xl2_shapes,
        "diffusion_configs": {k: dict(v) for k, v in DIFFUSION_CONFIGS.items()},
        "diffusion_inputs": inputs,
        "diffusion": diffusion,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="path to a facebookresearch/DiT checkout")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))  # our models/ for the shared weights
    reference = make_reference(*load_official(args.official))
    reference["meta"] = {"official_sha256": _fingerprint(args.official), "torch": str(torch.__version__)}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference, args.output)
    torch.load(args.output, weights_only=True)  # must stay loadable without unpickling code
    print(f"wrote {args.output} ({Path(args.output).stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
