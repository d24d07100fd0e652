"""One entry point for every sampler: noise + labels -> x_0, with classifier-free guidance as a closure."""

import torch
from diffusers import DPMSolverMultistepScheduler
from tqdm.auto import tqdm

from . import create_diffusion
from .guidance import classifier_free_guidance

SAMPLERS = ("ddpm", "ddim", "dpm-solver++")


def sample(model, noise, labels, *, null_class, sampler="ddpm", steps=250, cfg_scale=1.0, cfg_channels=None,
           eta=0.0, clip_denoised=False, diffusion_kwargs=None, progress=False):
    """Draw x_0 from x_T = noise with `steps` evenly respaced steps of the training process.

    model: model(x, t, y); labels: (N,) class ids (null_class for unconditional samples).
    diffusion_kwargs: the create_diffusion arguments the model was trained with (noise_schedule, learn_sigma, ...).
    clip_denoised: clamp the x_0 prediction to [-1, 1] (right for pixels, wrong for VAE latents).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    model_fn = classifier_free_guidance(model, cfg_scale, null_class, cfg_channels)
    if sampler == "dpm-solver++":
        return dpm_solver_sample(model_fn, noise, labels, steps, diffusion_kwargs, clip_denoised, progress)
    diffusion = create_diffusion(str(steps), **(diffusion_kwargs or {}))
    kwargs = dict(noise=noise, clip_denoised=clip_denoised, model_kwargs=dict(y=labels), progress=progress)
    if sampler == "ddpm":
        return diffusion.p_sample_loop(model_fn, tuple(noise.shape), **kwargs)
    return diffusion.ddim_sample_loop(model_fn, tuple(noise.shape), eta=eta, **kwargs)


@torch.no_grad()
def dpm_solver_sample(model_fn, noise, labels, steps, diffusion_kwargs=None, clip_denoised=False, progress=False):
    """DPM-Solver++ (Lu et al. 2022, 2211.01095), 2nd-order multistep, driven by diffusers' scheduler.

    The scheduler gets the training betas, so it integrates the probability-flow ODE of the trained process.
    Only the epsilon (or x0) half of a learned-sigma output is passed: the ODE needs no variance, and diffusers'
    own learned-range handling assumes 3 channels.
    """
    kwargs = dict(diffusion_kwargs or {})
    train = create_diffusion("", **kwargs)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=train.num_timesteps, trained_betas=train.betas, algorithm_type="dpmsolver++",
        solver_order=2, prediction_type="sample" if kwargs.get("predict_xstart") else "epsilon",
        thresholding=False, final_sigmas_type="zero")
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    channels = noise.shape[1]
    for t in tqdm(scheduler.timesteps, desc="sampling", leave=False) if progress else scheduler.timesteps:
        out = model_fn(x, t.expand(len(x)).to(noise.device), labels)[:, :channels]
        x = scheduler.step(out, t, x).prev_sample
    return x.clamp(-1, 1) if clip_denoised else x
