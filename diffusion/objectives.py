"""The training objectives behind one small interface, so train.py never asks which one it trains.

    objective = build_objective(cfg.diffusion)          # {"objective": "ddpm" | "flow" | "meanflow" | "shortcut", ...}
    t, noise = objective.draw(generator, global_batch, shape, device)   # this step's draws for the global batch
    terms = objective.losses(model, x, t, noise, dict(y=y))             # {"loss": (N,), ...logged terms}

`ddpm` is the Gaussian diffusion of DiT (create_diffusion's arguments); `flow` is a SiT transport (path,
prediction, loss weight) plus the choices of the trainers built on it: how t is drawn (uniform, as SiT, or
logit-normal, as SD3 and LightningDiT, then SD3's / RAE's time shift toward noise), LightningDiT's
velocity-direction cosine loss, and the scale of the network's time input. Samplers read the same config
(diffusion.sampling.sample): a flow's sampling grid follows its time shift unless told otherwise. `meanflow` and
`shortcut` are the one-step objectives (diffusion/meanflow.py, diffusion/shortcut.py; docs/onestep.md): their t is a
(N, 2) tensor of two times, their network is built with a second time (network_kwargs), and shortcut models build
their targets with the run's EMA network (attach_ema). `meanflow` with `variant: imf` is improved MeanFlow
(diffusion/imeanflow.py): its t is (N, 5), the two times and the guidance scale and interval the network is told.
"""

import torch
import torch.nn.functional as F

from . import create_diffusion
from .losses import mean_flat
from .imeanflow import ImprovedMeanFlowObjective, fill_variant_defaults, meanflow_class
from .shortcut import ShortcutObjective
from .transport import JIT_T_EPS, ModelType, create_transport, resolve_time_shift, shift_time
from utils.errors import ConfigError

OBJECTIVES = ("ddpm", "flow", "meanflow", "shortcut")
TIME_SAMPLING = ("uniform", "logit_normal")


def objective_name(diffusion_cfg):
    """The objective a diffusion config (or a checkpoint's recorded one) describes; configs from before flows
    existed have no `objective` key and are DDPM."""
    name = (diffusion_cfg or {}).get("objective", "ddpm")
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown diffusion.objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return name


def canonical_config(diffusion_cfg):
    """A diffusion config with its objective named (configs from before flows name none: DDPM) and, for flows, the
    time shift of configs from before it existed (1: none), so two configs of the same objective compare equal
    however old they are."""
    config = {**dict(diffusion_cfg or {}), "objective": objective_name(diffusion_cfg)}
    if config["objective"] == "flow":
        config.setdefault("time_shift", 1.0)
    if config["objective"] == "meanflow":   # MeanFlow from before iMF: variant mf, iMF's keys at their defaults
        config = fill_variant_defaults(config)
    return config


def build_objective(diffusion_cfg):
    """DDPMObjective or FlowObjective from a diffusion config (a dict or DictConfig); the objective keeps the
    config as `config` (what samplers and checkpoints read)."""
    config = canonical_config(diffusion_cfg)
    kwargs = {k: v for k, v in config.items() if k != "objective"}
    name = config["objective"]
    if name == "meanflow":   # MeanFlow or improved MeanFlow, by diffusion.variant (diffusion/imeanflow.py)
        cls, kwargs = meanflow_class(kwargs)
    else:
        cls = {"ddpm": DDPMObjective, "flow": FlowObjective, "shortcut": ShortcutObjective}[name]
    try:
        objective = cls(**kwargs)
    except TypeError as error:  # an unknown key: name the valid ones
        keys = ImprovedMeanFlowObjective.KEYS if name == "meanflow" else cls.KEYS   # iMF's: all of meanflow's
        raise ConfigError(f"diffusion (objective={name}): {error}; valid keys: {', '.join(keys)}") from None
    objective.config = config
    return objective


def network_kwargs(objective):
    """What the network must be built with for an objective (train.py merges it into the checkpoint's model_args):
    its output width (learn_sigma) and, for the one-step objectives, the second time they condition on."""
    return {"learn_sigma": objective.learn_sigma, **getattr(objective, "network_kwargs", {})}


def attach_ema(objective, ema):
    """Hand the run's EMA network to an objective that builds targets with it (shortcut models' self-consistency
    targets); returns ema, for train.py's setup line."""
    if hasattr(objective, "attach_ema"):
        objective.attach_ema(ema)
    return ema


class DDPMObjective:
    """The DiT paper's objective: t uniform on {0, ..., T-1}, L_simple (+ L_vb with a learned variance)."""

    name = "ddpm"
    KEYS = ("noise_schedule", "diffusion_steps", "learn_sigma", "sigma_small", "predict_xstart", "use_kl",
            "rescale_learned_sigmas")

    def __init__(self, **create_diffusion_kwargs):
        self.diffusion = create_diffusion(timestep_respacing="", **create_diffusion_kwargs)
        self.learn_sigma = create_diffusion_kwargs.get("learn_sigma", True)

    def draw(self, generator, n, shape, device):
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), generator=generator, device=device)
        noise = torch.randn((n, *shape), generator=generator, device=device)
        return t, noise

    def losses(self, model, x, t, noise, model_kwargs):
        return self.diffusion.training_losses(model, x, t, model_kwargs, noise=noise)


class FlowObjective:
    """An interpolant objective (SiT) trained with flow matching: x_t = alpha_t x + sigma_t eps, t = 0 noise.

    time_sampling: "uniform" on [t0, t1] (SiT) or "logit_normal": t = sigmoid(n), n ~ N(time_mean, time_std^2)
        (SD3, 2403.03206 eq. 19; LightningDiT uses mean 0, std 1), mapped into [t0, t1].
    time_shift: SD3's / RAE's shift s of that draw toward noise (1 = none; > 1 toward noise; "auto" = RAE's
        sqrt(C*H*W / 4096) from the shape of the data drawn for). On SiT time the drawn u becomes
        t = t0 + (t1 - t0) shift_time(u, 1 / s) (transport.py, "time shift"); samplers follow it by default.
    cosine_loss: add LightningDiT's 1 - cos(v_pred, u_t), the cosine over channels at each position, weight 1
        (velocity models only).
    time_scale: the network sees t * time_scale (SiT feeds t in [0, 1]; 1000 puts it on DDPM's 0..999 scale).
    t_eps: prediction=x only (JiT): the floor of sigma_t in the x -> velocity conversion (create_transport).
    """

    name = "flow"
    KEYS = ("path_type", "prediction", "loss_weight", "train_eps", "sample_eps", "time_sampling", "time_mean",
            "time_std", "cosine_loss", "time_scale", "time_shift", "t_eps")
    learn_sigma = False  # a flow model predicts one value per input value

    def __init__(self, path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None,
                 time_sampling="uniform", time_mean=0.0, time_std=1.0, cosine_loss=False, time_scale=1.0,
                 time_shift=1.0, t_eps=JIT_T_EPS):
        if time_sampling not in TIME_SAMPLING:
            raise ConfigError(f"unknown diffusion.time_sampling {time_sampling!r}; choose one of "
                             f"{', '.join(TIME_SAMPLING)}")
        if time_std <= 0 or time_scale <= 0:
            raise ConfigError(f"diffusion.time_std={time_std} and diffusion.time_scale={time_scale} must be positive")
        self.transport = create_transport(path_type, prediction, loss_weight, train_eps, sample_eps, t_eps)
        if cosine_loss and self.transport.model_type != ModelType.VELOCITY:
            raise ConfigError("diffusion.cosine_loss compares predicted and target velocities; it needs "
                             "prediction=velocity")
        self.time_sampling, self.time_mean, self.time_std = time_sampling, time_mean, time_std
        self.cosine_loss, self.time_scale = cosine_loss, time_scale
        if time_shift != "auto":
            resolve_time_shift(time_shift)   # a bad value stops here, not at the first step
        self.time_shift = time_shift

    def shift(self, shape):
        """The noise-side time shift s (1 = none) for data of `shape` (C, H, W): the number given, or for "auto"
        RAE's sqrt(C*H*W / 4096). Its sampling grid shift (sample.time_shift's parametrisation) is 1 / s."""
        return resolve_time_shift(self.time_shift, shape)

    def network(self, model):
        """model(x, t, **kw) with t in [0, 1] -> the network called with t * time_scale."""
        if self.time_scale == 1:
            return model
        return lambda x, t, **kwargs: model(x, t * self.time_scale, **kwargs)

    def draw(self, generator, n, shape, device):
        t0, t1 = self.transport.check_interval(self.transport.train_eps, self.transport.sample_eps)
        if self.time_sampling == "uniform":
            u = torch.rand(n, generator=generator, device=device)
        else:
            u = torch.sigmoid(torch.randn(n, generator=generator, device=device) * self.time_std + self.time_mean)
        u = shift_time(u, 1 / self.shift(shape))   # s = 1: u itself, so unshifted runs draw what they always drew
        noise = torch.randn((n, *shape), generator=generator, device=device)
        return u * (t1 - t0) + t0, noise

    def losses(self, model, x, t, noise, model_kwargs):
        terms = self.transport.training_losses(self.network(model), x, model_kwargs, t=t, x0=noise)
        if not self.cosine_loss:
            return {"loss": terms["loss"]}
        if x.shape[1] < 2:  # measured on the digits: training collapses (docs/benchmarks.md)
            raise ConfigError(f"diffusion.cosine_loss takes the cosine over the {x.shape[1]} channel(s) of each "
                             f"position: with one channel it is the sign (+-1), and at a zero prediction its "
                             f"gradient is 1/eps; use it on latents (4+ channels) or set diffusion.cosine_loss=false")
        _, _, target = self.transport.path_sampler.plan(t, noise, x)
        cos = mean_flat(1 - F.cosine_similarity(terms["pred"], target, dim=1, eps=1e-8))
        return {"loss": terms["loss"] + cos, "mse": terms["loss"], "cos": cos}
