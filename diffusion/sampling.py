"""One entry point for every sampler: noise + labels -> x_0, with classifier-free guidance as a closure."""

from . import create_diffusion
from .guidance import classifier_free_guidance

SAMPLERS = ("ddpm", "ddim")


def sample(model, noise, labels, *, null_class, sampler="ddpm", steps=250, cfg_scale=1.0, cfg_channels=None,
           eta=0.0, clip_denoised=False, diffusion_kwargs=None, progress=False):
    """Draw x_0 from x_T = noise with `steps` evenly respaced steps of the training process.

    model: model(x, t, y); labels: (N,) class ids (null_class for unconditional samples).
    diffusion_kwargs: the create_diffusion arguments the model was trained with (noise_schedule, learn_sigma, ...).
    clip_denoised: clamp the x_0 prediction to [-1, 1] (right for pixels, wrong for VAE latents).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    diffusion = create_diffusion(str(steps), **(diffusion_kwargs or {}))
    model_fn = classifier_free_guidance(model, cfg_scale, null_class, cfg_channels)
    kwargs = dict(noise=noise, clip_denoised=clip_denoised, model_kwargs=dict(y=labels), progress=progress)
    if sampler == "ddpm":
        return diffusion.p_sample_loop(model_fn, tuple(noise.shape), **kwargs)
    return diffusion.ddim_sample_loop(model_fn, tuple(noise.shape), eta=eta, **kwargs)
