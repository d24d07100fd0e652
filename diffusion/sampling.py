"""One entry point for every sampler of both objectives: noise + labels -> x_0, guidance as a closure.

    x = sample(model, noise, labels, null_class=10, diffusion_kwargs=ckpt["config"]["diffusion"], sampler="ode")

The diffusion config recorded with a model says which objective trained it (DDPM, flow or a one-step objective);
the sampler must fit it: ddpm / ddim / dpm-solver++ for DDPM models, ode / sde for flow models, meanflow (`steps`
jumps, 1 by default) for MeanFlow models (improved MeanFlow ones take cfg_scale and the guidance interval as inputs),
shortcut (`steps` = 2^k Euler steps of the step size the model was told, 1 by default) for shortcut models
(docs/onestep.md).
"""

import math
from contextlib import contextmanager, nullcontext

import torch
from tqdm.auto import tqdm

from . import create_diffusion
from .guidance import autoguidance, classifier_free_guidance
from .objectives import build_objective, objective_name
from .transport import Sampler
from utils.errors import ConfigError
from utils.images import to_uint8

SAMPLERS = {"ddpm": ("ddpm", "ddim", "dpm-solver++"), "flow": ("ode", "sde"), "meanflow": ("meanflow",),
            "shortcut": ("shortcut",)}
# The one-step objectives sample with their own few-step samplers (objective.sample): jumps, not an integrator.
FEW_STEP = ("meanflow", "shortcut")
# Steps when none are given: DiT's DDPM-250, DDIM-50, DPM-Solver++ 20; SiT's ODE (50 grid points) and SDE-250.
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm-solver++": 20, "ode": 50, "sde": 250, "meanflow": 1, "shortcut": 1}
# What sampler="auto" picks for each objective.
DEFAULT_SAMPLER = {"ddpm": "ddpm", "flow": "ode", "meanflow": "meanflow", "shortcut": "shortcut"}
ODE_METHOD_ALIASES = {"heun": "heun2"}  # torchdiffeq's name for Heun's 2nd-order method
ODE_DEFAULTS = dict(method="heun", atol=1e-6, rtol=1e-3)
SDE_DEFAULTS = dict(method="Euler", diffusion_form="sigma", diffusion_norm=1.0, last_step="Mean", last_step_size=0.04)


def resolve_sampler(diffusion_kwargs, sampler="auto", steps=None):
    """(sampler, steps) for a model trained with `diffusion_kwargs`: "auto" and steps=None take the defaults;
    a sampler of the other objective is refused with the ones that fit."""
    objective = objective_name(diffusion_kwargs)
    sampler = DEFAULT_SAMPLER[objective] if sampler in (None, "auto") else sampler
    if sampler not in SAMPLERS[objective]:
        known = [s for names in SAMPLERS.values() for s in names]
        if sampler not in known:
            raise ConfigError(f"unknown sampler {sampler!r}; choose one of {', '.join(known)} (or auto)")
        why = {"flow": "a flow model has no discrete DDPM process to run",
               "ddpm": "a DDPM model's probability-flow ODE is what ddim (eta=0) and dpm-solver++ integrate"}.get(
            objective, "a one-step model predicts jumps between two times, not a velocity or noise to integrate")
        if sampler in FEW_STEP:
            why = f"sampler={sampler} takes the jumps of a network trained with diffusion={sampler}"
        raise ConfigError(f"sampler={sampler} does not fit a model trained with diffusion.objective={objective} ({why}); "
                         f"use sampler={' | '.join(SAMPLERS[objective])} or sampler=auto")
    return sampler, DEFAULT_STEPS[sampler] if steps is None else int(steps)


def initial_noise(seed, indices, shape, device="cpu"):
    """The starting noise of samples `indices` (N, *shape): sample i's from a generator seeded by (seed, i), so it
    depends on neither the batch nor the number of processes. sample.py and train.py's in-loop FID both draw
    here, so a checkpoint's samples are the same in the loop and offline."""
    noise = [torch.randn(*shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i))) for i in indices]
    return torch.stack(noise).to(device) if noise else torch.zeros(0, *shape, device=device)


@contextmanager
def seeded_rng(seed, device):
    """Run a sampler's own draws (DDPM's per-step noise, the SDE's) from torch's global RNG seeded by `seed`, and
    restore the global RNG afterwards: the samples depend on the seed only, not on what ran before."""
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=torch.device(device).type):
        torch.manual_seed(seed)
        yield


def sample_images(model, indices, labels, *, seed, shape, device, decoder=None, context=nullcontext, rng_seed=None,
                  **sample_kwargs):
    """uint8 images (N, C, H, W) of samples `indices` of class `labels`: their starting noise initial_noise(seed, i),
    a sampler's own draws from torch's RNG seeded by rng_seed (None: the global RNG as it stands), the network
    under context() (the run's autocast), and `decoder` (a VAE, fp32) turning latents into images in [-1, 1].
    sample_kwargs go to sample() (null_class, the sampler and guidance settings, objective or diffusion_kwargs)."""
    noise = initial_noise(seed, indices, shape, device)
    labels = torch.as_tensor(labels, device=device)
    with torch.no_grad(), seeded_rng(rng_seed, device) if rng_seed is not None else nullcontext(), context():
        x = sample(model, noise, labels, clip_denoised=decoder is None, **sample_kwargs)  # latents are not in [-1, 1]
    x = x.float()  # sampled under bf16 autocast the outputs may be bf16; images and the VAE are fp32
    return to_uint8(x if decoder is None else decoder.decode(x))


def sample(model, noise, labels, *, null_class, sampler="auto", steps=None, cfg_scale=1.0, cfg_channels=None,
           guidance_low=None, guidance_high=None, eta=0.0, clip_denoised=False, diffusion_kwargs=None, time_shift=None,
           ode=None, sde=None, generator=None, progress=False, guidance="cfg", guide_model=None, objective=None):
    """Draw x_0 (DDPM) or x_1 (flow) from the given starting noise, conditioned on `labels`.

    model: model(x, t, y); labels: (N,) class ids (null_class for unconditional samples).
    diffusion_kwargs: the diffusion config the model was trained with (its `objective`, schedule or path, ...);
        or `objective`: the objective that trained it (diffusion.build_objective's), when it is at hand.
    sampler / steps: see resolve_sampler. DDPM samplers respace the training process to `steps`; for flows,
        `steps` is SiT's num_steps (grid points: euler takes steps - 1 updates, the SDE steps - 1 plus a last step).
    guidance_low / guidance_high: guide only while the model time is inside [low, high] (None: unbounded), in the
        sampler's own time: DDPM step indices 0..T-1 (T-1 = noise), flow t in [0, 1] (1 = data), MeanFlow's t of
        each jump's start (1 = noise), a shortcut model's t (1 = data); see classifier_free_guidance. An improved
        MeanFlow model (diffusion.variant=imf) is not guided from outside: cfg_scale and [guidance_low,
        guidance_high] (MeanFlow's time, None: 0 and 1) are the conditions it is called with, one evaluation a jump.
    clip_denoised: clamp to [-1, 1] (right for pixels, wrong for VAE latents).
    time_shift: flows only, the sampling grid's shift a in LightningDiT's parametrisation (transport.shift_time on
        SiT time: a < 1 toward noise, 1 = none; LightningDiT samples with 0.3). None: the shift the model was trained
        with, a = 1 / s for the objective's diffusion.time_shift s (SD3's / RAE's parametrisation; "auto" from the
        noise's shape), so a model trained with no shift samples on an unshifted grid.
    ode: dict(method, atol, rtol) for sampler="ode"; sde: dict(method, diffusion_form, diffusion_norm, last_step,
        last_step_size) for sampler="sde"; missing keys take ODE_DEFAULTS / SDE_DEFAULTS.
    generator: a torch.Generator for the SDE's noise (flows; default: torch's global RNG).
    guidance: "cfg" (classifier-free, weight cfg_scale) or "auto" (autoguidance by `guide_model`, a weaker network
        of the same objective and data, weight cfg_scale); the interval and cfg_channels apply to both.
    """
    if objective is not None:
        diffusion_kwargs = objective.config
    sampler, steps = resolve_sampler(diffusion_kwargs, sampler, steps)
    interval = (-math.inf if guidance_low is None else guidance_low, math.inf if guidance_high is None else guidance_high)
    if guidance not in ("cfg", "auto") or (guidance == "auto") != (guide_model is not None):
        raise ConfigError(f"guidance={guidance!r}: use guidance=cfg, or guidance=auto with a guide model (guide_ckpt=...)")
    if sampler in FEW_STEP:   # the objective's own jumps; classifier-free guidance on each jump's network output
        if guidance == "auto":
            raise ConfigError(f"guidance=auto is not implemented for sampler={sampler}; use guidance=cfg")
        objective = objective if objective is not None else build_objective(diffusion_kwargs)
        if getattr(objective, "guidance_conditions", False):   # iMF: the scale and interval are the network's inputs
            if cfg_channels is not None:
                raise ConfigError(f"cfg_channels={cfg_channels}: an iMF network is guided through its conditions, on "
                                  f"every channel; leave cfg_channels=null")
            x = objective.sample(model, noise, labels, steps, cfg_scale=cfg_scale, null_class=null_class,
                                 interval=(guidance_low, guidance_high), progress=progress)
            return x.clamp(-1, 1) if clip_denoised else x
        x = objective.sample(model, noise, labels, steps, guide=lambda fn: classifier_free_guidance(
            fn, cfg_scale, null_class, cfg_channels, interval), progress=progress)
        return x.clamp(-1, 1) if clip_denoised else x
    if sampler not in SAMPLERS["flow"]:
        objective = None
    elif objective is None:
        objective = build_objective(diffusion_kwargs)
    as_fn = objective.network if objective else (lambda network: network)   # flows: the network sees t * time_scale
    if guidance == "auto":
        guide = lambda network: autoguidance(network, as_fn(guide_model), cfg_scale, cfg_channels, interval)
    else:
        guide = lambda network: classifier_free_guidance(network, cfg_scale, null_class, cfg_channels, interval)
    if objective is not None:
        fn = guide(as_fn(model))   # guidance sees SiT time
        if time_shift is None:   # follow training: the same map, its grid parametrisation (transport.py)
            time_shift = 1 / objective.shift(tuple(noise.shape[1:]))
        x = flow_sample(objective.transport, fn, noise, labels, sampler, steps, time_shift, ode, sde, generator,
                        progress)
        return x.clamp(-1, 1) if clip_denoised else x
    kwargs = {k: v for k, v in dict(diffusion_kwargs or {}).items() if k != "objective"}
    if sampler == "dpm-solver++":
        return dpm_solver_sample(guide(model), noise, labels, steps, kwargs, clip_denoised, progress)
    diffusion = create_diffusion(str(steps), **kwargs)
    loop_kwargs = dict(noise=noise, clip_denoised=clip_denoised, model_kwargs=dict(y=labels), progress=progress)
    if sampler == "ddpm":
        return diffusion.p_sample_loop(guide(model), tuple(noise.shape), **loop_kwargs)
    return diffusion.ddim_sample_loop(guide(model), tuple(noise.shape), eta=eta, **loop_kwargs)


def flow_sample(transport, model_fn, noise, labels, sampler, steps, time_shift=1.0, ode=None, sde=None,
                generator=None, progress=False):
    """The final state of SiT's ODE or SDE sampler from `noise` (t = 0) to data; time_shift: the grid's shift a
    (transport.shift_interval; 1 = none)."""
    model_fn = _with_progress(model_fn, progress)
    if sampler == "ode":
        options = {**ODE_DEFAULTS, **(ode or {})}
        method = ODE_METHOD_ALIASES.get(options["method"], options["method"])
        fn = Sampler(transport).sample_ode(sampling_method=method, num_steps=steps, atol=options["atol"],
                                           rtol=options["rtol"], time_shift=time_shift)
        with torch.no_grad():
            return fn(noise, model_fn, y=labels)[-1]
    options = {**SDE_DEFAULTS, **(sde or {})}
    fn = Sampler(transport).sample_sde(sampling_method=options["method"], diffusion_form=options["diffusion_form"],
                                       diffusion_norm=options["diffusion_norm"], last_step=options["last_step"],
                                       last_step_size=options["last_step_size"], num_steps=steps,
                                       time_shift=time_shift, generator=generator)
    return fn(noise, model_fn, y=labels)[-1]


def _with_progress(model_fn, progress):
    """model_fn that ticks a progress bar per network evaluation (adaptive solvers have no step count up front)."""
    if not progress:
        return model_fn
    bar = tqdm(desc="sampling (network calls)", leave=False)

    def counted(x, t, y):
        bar.update(1)
        return model_fn(x, t, y)
    return counted


@torch.no_grad()
def dpm_solver_sample(model_fn, noise, labels, steps, diffusion_kwargs=None, clip_denoised=False, progress=False):
    """DPM-Solver++ (Lu et al. 2022, 2211.01095), 2nd-order multistep, driven by diffusers' scheduler.

    The scheduler gets the training betas, so it integrates the probability-flow ODE of the trained process.
    Only the epsilon (or x0) half of a learned-sigma output is passed: the ODE needs no variance, and diffusers'
    own learned-range handling assumes 3 channels.
    """
    from diffusers import DPMSolverMultistepScheduler   # here: diffusers costs seconds at start-up
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
