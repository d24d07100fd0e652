"""The objectives and their samplers.

- Gaussian diffusion: `create_diffusion` takes the official DiT arguments and returns a `GaussianDiffusion`.
- Flows / stochastic interpolants: `create_transport` and `Sampler` take SiT's arguments (diffusion/transport.py).
- train.py's view of both: `build_objective` (diffusion/objectives.py); sampling: `diffusion.sampling.sample`.
"""

import numpy as np

from .gaussian_diffusion import GaussianDiffusion
from .guidance import classifier_free_guidance
from .schedules import SCHEDULES, get_named_beta_schedule, space_timesteps
from utils.errors import ConfigError

__all__ = ["GaussianDiffusion", "ModelType", "PathType", "SCHEDULES", "Sampler", "Transport", "WeightType",
           "build_objective", "classifier_free_guidance", "create_diffusion", "create_transport",
           "get_named_beta_schedule", "space_timesteps"]


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    predict_xstart=False,
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=1000,
):
    """The official DiT factory: a `diffusion_steps`-step process, respaced to `timestep_respacing`.

    timestep_respacing: "" or None for all steps, "250", "ddim50", "10,10,10" or an int (see space_timesteps).
    The default (learned sigma, linear schedule, MSE + vb) is the paper's training setup.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    kept = sorted(space_timesteps(diffusion_steps, timestep_respacing))
    if kept == [0] and diffusion_steps > 1:
        raise ConfigError(f"timestep_respacing={timestep_respacing!r} keeps only t=0 of {diffusion_steps} steps (evenly "
                         f"spaced steps start at 0), so sampling would return the noise; use 2 steps or more")
    # Respaced betas keep alpha_bar at the kept steps: beta_i = 1 - alpha_bar_{k_i} / alpha_bar_{k_{i-1}}.
    # The full process goes through this too, which is what the reference code does (so numbers agree).
    alphas_cumprod = np.cumprod(1.0 - betas)[kept]
    new_betas = 1 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
    if learn_sigma:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if sigma_small else "fixed_large"
    if use_kl:
        loss_type = "rescaled_kl"
    else:
        loss_type = "rescaled_mse" if rescale_learned_sigmas else "mse"
    return GaussianDiffusion(
        betas=new_betas,
        model_mean_type="start_x" if predict_xstart else "epsilon",
        model_var_type=var_type,
        loss_type=loss_type,
        timestep_map=kept,
    )


# Imported after create_diffusion, which the DDPM objective builds on.
from .objectives import build_objective  # noqa: E402
from .transport import ModelType, PathType, Sampler, Transport, WeightType, create_transport  # noqa: E402
