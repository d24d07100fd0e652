"""Improved MeanFlow (iMF; Geng, Lu, Wu, Shechtman, Kolter & He 2025, arXiv 2512.02012): MeanFlow's network and
sampler, trained with a loss on the instantaneous velocity, and with its guidance scale and interval made inputs of the
network instead of constants of the training target. `diffusion=meanflow diffusion.variant=imf`; docs/onestep.md.

Conventions are MeanFlow's (diffusion/meanflow.py): t = 1 is noise, t = 0 data, z_t = (1 - t) x + t eps, v = eps - x,
and the network is called as model(z, t * time_scale, y, dt=(t - r) * time_scale, guidance=...).

What changes against MeanFlow (the official JAX code, Lyy-iiis/imeanflow `imf.py`, in brackets):

1. The v-loss (the paper's reformulated objective). The network's average velocity u forms a prediction of the
   instantaneous velocity,
       V(z_t, r, t) = u(z_t, r, t) + (t - r) sg(du/dt),      du/dt = v_theta . d_z u + d_t u  (one JVP),
   regressed onto the (guided) velocity of the sample: L_u = ||V - v_g||^2, adaptively weighted as MeanFlow's loss
   [`V`, `loss_u`]. The JVP's tangent in z is the network's own velocity v_theta(z_t, t), a function of z_t alone,
   where MeanFlow uses the sample's eps - x: its target moved with the draw through the tangent as well. The gradient
   with respect to u is MeanFlow's form (V - v_g = u - (v_g - (t - r) du/dt)); what changes is the tangent.
   v_theta is the network at r = t: the boundary condition u(z, t, t) = v(z, t). [The official network has an
   auxiliary velocity head (8 transformer blocks of its own on iMF-B/2) and reads v_theta from it.] `v_loss` adds the
   official second term L_v = ||v_theta - v_g||^2 (adaptively weighted) [`loss_v`], here on u(z_t, t, t) with its
   gradient: one more forward and backward pass of the batch. With it the loss of a sample is L_u + L_v, as official.
2. Guidance as conditions (the paper's flexible guidance). Each sample draws a guidance scale omega in [1, omega_max]
   with density proportional to omega^-omega_beta (omega_beta = 1: log-uniform) [`sample_cfg_scale`, s_max = 7:
   omega_max = 8] and an interval [t_min, t_max], t_min ~ U(t_min_range), t_max ~ U(t_max_range)
   [`sample_cfg_interval`: U(0, 0.5), U(0.5, 1)], no interval (t_min = 0, t_max = 1) for the samples with r = t.
   The network sees (1 - 1/omega, t_min, t_max) through embedders of its own (models/dit.py `guidance_cond`)
   [`omega_embedder(1 - 1/w)`, in-context tokens].
   The guided velocity, no gradient [`guidance_fn`]:
       v_g = v + (1 - 1/w) (v_theta(z_t, t | y, w) - v_theta(z_t, t | null, 1)),
       w = omega inside [t_min, t_max], else 1
   (the two network terms at r = t with the interval [0, 1]). Its fixed point is classifier-free guidance at scale w:
   v_theta(. | y, w) = w v(. | y) + (1 - w) v(. | null). The JVP's tangent is v_theta(z_t, t | y, w), the velocity of
   the guided field the average is taken over. Samples whose label was dropped (train.class_dropout) keep v_g = v
   [`cond_drop`] and take v_theta(z_t, t | null, 1) as their tangent.
3. Sampling: the jumps of MeanFlow (eq. 12) with sample.cfg_scale as omega and [guidance_low, guidance_high] as
   [t_min, t_max] given to the network: one evaluation per jump, no classifier-free guidance around it.

Times: t, r and the share with r = t as MeanFlow's (`ratio_r_neq_t`: 0.5 in iMF's recipe [`data_proportion`]).
draw() returns the times and conditions of each sample as one (N, 5) tensor [t, r, omega, t_min, t_max].
"""

import math
from collections.abc import Sequence

import torch

from .meanflow import MeanFlowObjective, expand_like, jvp, null_class_of
from utils.errors import ConfigError

VARIANTS = ("mf", "imf")
# MeanFlow's guidance folded into the target, at the values that switch it off (variant=imf draws its own instead).
MF_ONLY = {"omega": 1.0, "kappa": 0.0, "guidance_interval": [0.0, 1.0]}
# iMF's keys and their defaults (the official recipe; variant=mf reads none of them).
IMF_ONLY = {"omega_max": 8.0, "omega_beta": 1.0, "t_min_range": [0.0, 0.5], "t_max_range": [0.5, 1.0], "v_loss": True}


def _same(a, b):
    """Config values equal, lists, tuples and OmegaConf's lists alike."""
    is_list = lambda v: isinstance(v, Sequence) and not isinstance(v, str)
    if is_list(a) or is_list(b):
        return is_list(a) and is_list(b) and len(a) == len(b) and all(float(p) == float(q) for p, q in zip(a, b))
    return a == b


def meanflow_class(kwargs):
    """(objective class, its keyword arguments) for diffusion=meanflow's keys: MeanFlowObjective for variant=mf, with
    iMF's keys at their defaults (else refused: they would be ignored), ImprovedMeanFlowObjective for variant=imf."""
    kwargs = dict(kwargs)
    variant = kwargs.pop("variant", "mf")
    if variant not in VARIANTS:
        raise ConfigError(f"unknown diffusion.variant {variant!r}; choose mf (MeanFlow, 2505.13447) or imf (improved "
                          f"MeanFlow, 2512.02012)")
    if variant == "imf":
        return ImprovedMeanFlowObjective, kwargs
    for key, default in IMF_ONLY.items():
        if key in kwargs and not _same(kwargs[key], default):
            raise ConfigError(f"diffusion.{key}={kwargs[key]} is read by improved MeanFlow only: set "
                              f"diffusion.variant=imf, or leave diffusion.{key} at {default} for MeanFlow (variant=mf)")
        kwargs.pop(key, None)
    return MeanFlowObjective, kwargs


def fill_variant_defaults(config):
    """A meanflow config with the keys added with iMF at the values that reproduce runs from before them (variant mf,
    iMF's keys at their defaults), so old and new configs of one run compare equal (objectives.canonical_config)."""
    return {"variant": "mf", **IMF_ONLY, **config}


def _check_range(key, value, low, high):
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or not low <= pair[0] <= pair[1] <= high:
        raise ConfigError(f"diffusion.{key}={list(value)}: give [low, high] with {low} <= low <= high <= {high} "
                          f"(MeanFlow's time, t = 1 noise)")
    return pair


class ImprovedMeanFlowObjective(MeanFlowObjective):
    """Improved MeanFlow behind train.py's objective interface; see the module docstring.

    time_sampling, time_mean, time_std, ratio_r_neq_t, norm_p, norm_eps, time_scale: as MeanFlow's.
    omega_max, omega_beta: the guidance scale's distribution, density ~ omega^-omega_beta on [1, omega_max].
    t_min_range, t_max_range: the uniform ranges of the guidance interval's start and end.
    v_loss: add the second term ||v_theta - v_g||^2 on u(z_t, t, t) (official: on its auxiliary velocity head).
    omega, kappa, guidance_interval: MeanFlow's fixed guidance; accepted only at the values that switch it off.
    """

    name = "meanflow"
    KEYS = ("variant", "time_sampling", "time_mean", "time_std", "ratio_r_neq_t", "norm_p", "norm_eps", "time_scale",
            *IMF_ONLY, *MF_ONLY)
    # The network embeds t - r beside t and the three guidance conditions (models/dit.py, models/unet.py).
    network_kwargs = {"second_time": True, "guidance_cond": True}
    guidance_conditions = True   # diffusion.sampling hands the sampler's scale and interval to sample()

    def __init__(self, time_sampling="logit_normal", time_mean=-0.4, time_std=1.0, ratio_r_neq_t=0.5, norm_p=1.0,
                 norm_eps=0.01, time_scale=1.0, omega_max=8.0, omega_beta=1.0, t_min_range=(0.0, 0.5),
                 t_max_range=(0.5, 1.0), v_loss=True, omega=1.0, kappa=0.0, guidance_interval=(0.0, 1.0)):
        fixed = dict(omega=omega, kappa=kappa, guidance_interval=guidance_interval)
        for key, off in MF_ONLY.items():
            if not _same(fixed[key], off):
                raise ConfigError(
                    f"diffusion.{key}={fixed[key]} is MeanFlow's guidance fixed in the training target; improved "
                    f"MeanFlow (variant=imf) draws a scale and interval per sample instead (diffusion.omega_max, "
                    f"omega_beta, t_min_range, t_max_range) and takes them at sampling (sample.cfg_scale, "
                    f"sample.guidance_low, sample.guidance_high): set diffusion.omega=1.0 diffusion.kappa=0.0 "
                    f"diffusion.guidance_interval=[0.0,1.0], or diffusion.variant=mf")
        super().__init__(time_sampling=time_sampling, time_mean=time_mean, time_std=time_std,
                         ratio_r_neq_t=ratio_r_neq_t, norm_p=norm_p, norm_eps=norm_eps, time_scale=time_scale)
        if not omega_max >= 1:
            raise ConfigError(f"diffusion.omega_max={omega_max}: the guidance scales drawn lie in [1, omega_max] "
                              f"(1 = no guidance; the official recipe: 8)")
        if not isinstance(v_loss, bool):
            raise ConfigError(f"diffusion.v_loss={v_loss!r}: true or false")
        self.omega_max, self.omega_beta, self.v_loss = float(omega_max), float(omega_beta), v_loss
        self.t_min_range = _check_range("t_min_range", t_min_range, 0.0, 1.0)
        self.t_max_range = _check_range("t_max_range", t_max_range, 0.0, 1.0)

    # ---- the network as a function of (z, t, r) and the guidance conditions -----------------------------------

    def network(self, model):
        """u(z, t, r, y, omega, t_min, t_max): the network with every scalar condition times time_scale, the scale
        as 1 - 1/omega (official: omega_embedder(1 - 1 / w); 0 for no guidance)."""
        s = self.time_scale

        def u(z, t, r, y, omega, t_min, t_max):
            guidance = torch.stack([1 - 1 / omega, t_min, t_max], dim=1).to(t.dtype)   # (N, 3)
            return model(z, t * s, y, dt=(t - r) * s, guidance=guidance * s)
        return u

    # ---- training --------------------------------------------------------------------------------------------

    def guidance_scale(self, uniform):
        """omega from a U(0, 1) draw: the inverse CDF of density ~ omega^-omega_beta on [1, omega_max] (official
        sample_cfg_scale, its s_max = omega_max - 1)."""
        b, log_max = self.omega_beta, math.log(self.omega_max)
        if b == 1.0:
            return torch.exp(uniform * log_max)
        return torch.exp(torch.log1p(uniform * math.expm1((1 - b) * log_max)) / (1 - b))

    def draw(self, generator, n, shape, device):
        """((N, 5) [t, r, omega, t_min, t_max], noise (N, *shape)): MeanFlow's draws (noise, t, r, which samples keep
        r != t), then the guidance scale and interval; samples with r = t get the interval [0, 1]."""
        tr, noise = super().draw(generator, n, shape, device)
        omega = self.guidance_scale(torch.rand(n, generator=generator, device=device))
        (a, b), (c, d) = self.t_min_range, self.t_max_range
        t_min = a + (b - a) * torch.rand(n, generator=generator, device=device)
        t_max = c + (d - c) * torch.rand(n, generator=generator, device=device)
        flow_matching = tr[:, 0] == tr[:, 1]
        t_min, t_max = torch.where(flow_matching, 0.0, t_min), torch.where(flow_matching, 1.0, t_max)
        return torch.cat([tr, torch.stack([omega, t_min, t_max], dim=1)], dim=1), noise

    @torch.no_grad()
    def guided_velocity(self, u, z, t, v, y, omega, t_min, t_max, null):
        """(v_g, the JVP's tangent) of the module docstring: v + (1 - 1/w) (v_theta(y, w) - v_theta(null, 1)) with
        w = omega inside [t_min, t_max], else 1, and v_theta(y, w); for samples of the null class (their label was
        dropped) v and v_theta(null, 1). Both network terms at r = t, interval [0, 1], in one batch of 2N."""
        w = torch.where((t >= t_min) & (t <= t_max), omega, torch.ones_like(omega))
        zeros, ones, y_null = torch.zeros_like(t), torch.ones_like(t), torch.full_like(y, null)
        v_cond, v_uncond = u(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, y_null]),
                             torch.cat([w, ones]), torch.cat([zeros, zeros]), torch.cat([ones, ones])).chunk(2)
        v_g = v + expand_like(1 - 1 / w, z).to(v.dtype) * (v_cond - v_uncond).to(v.dtype)
        dropped = expand_like(y == null, z)
        return torch.where(dropped, v, v_g), torch.where(dropped, v_uncond, v_cond)

    def losses(self, model, x, t, noise, model_kwargs):
        """{"loss": (N,) L_u (+ L_v), adaptively weighted, "mse": (N,) the mean of (V - v_g)^2, "mse_v": (N,) that of
        (v_theta - v_g)^2 (with v_loss)}; t is the (N, 5) [t, r, omega, t_min, t_max] of draw()."""
        t, r, omega, t_min, t_max = t.unbind(1)
        model_kwargs = dict(model_kwargs)
        y = model_kwargs.pop("y", None)
        if model_kwargs:
            raise ConfigError(f"iMF's network takes (z, t, y, dt, guidance); got the extra inputs "
                              f"{sorted(model_kwargs)}")
        net = self.network(model)
        z = (1 - expand_like(t, x)) * x + expand_like(t, x) * noise          # z_t, t = 1 noise
        v = noise - x                                                        # the conditional velocity
        if y is None:   # an unconditional network: nothing to guide; its velocity at w = 1 is the tangent
            omega, t_min, t_max = torch.ones_like(t), torch.zeros_like(t), torch.ones_like(t)
            with torch.no_grad():
                v_g, tangent = v, net(z, t, t, None, omega, t_min, t_max)
        else:
            v_g, tangent = self.guided_velocity(net, z, t, v, y, omega, t_min, t_max, null_class_of(model))
        # du/dt along the guided trajectory: tangents dz/dt = v_theta, dt/dt = 1, dr/dt = 0
        u, dudt = jvp(lambda z_, t_, r_: net(z_, t_, r_, y, omega, t_min, t_max), (z, t, r),
                      (tangent, torch.ones_like(t), torch.zeros_like(r)))
        dtype = torch.promote_types(u.dtype, torch.float32)   # the loss in at least fp32, whatever the autocast
        v_g = v_g.to(dtype).detach()
        V = u.to(dtype) + expand_like((t - r).clamp(0, 1), x).to(dtype) * dudt.to(dtype).detach()
        err = ((V - v_g) ** 2).flatten(1)
        terms = {"loss": self.weighted(err.sum(1)), "mse": err.mean(1).detach()}
        if self.v_loss:   # the official auxiliary head's term, on the network at r = t
            err_v = ((net(z, t, t, y, omega, t_min, t_max).to(dtype) - v_g) ** 2).flatten(1)
            terms["loss"] = terms["loss"] + self.weighted(err_v.sum(1))
            terms["mse_v"] = err_v.mean(1).detach()
        return terms

    def weighted(self, sq):
        """MeanFlow's adaptive weight: sq / sg((sq + norm_eps)^norm_p)."""
        return sq / (sq.detach() + self.norm_eps) ** self.norm_p

    # ---- sampling --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, model, noise, labels, steps, guide=None, progress=False, cfg_scale=1.0, interval=(None, None),
               null_class=None):
        """z_0 from noise in `steps` MeanFlow jumps, the network told the guidance scale cfg_scale and the interval
        [t_min, t_max] = interval (None: 0 and 1) as conditions; samples of the null class get scale 1."""
        if guide is not None:
            raise ConfigError("an iMF network takes its guidance as conditions; it is not guided from outside "
                              "(sample.cfg_scale and guidance_low/high are handed to it)")
        if steps < 1:
            raise ConfigError(f"steps={steps}: iMF samples in 1 or more jumps")
        if not cfg_scale >= 1:
            raise ConfigError(f"cfg_scale={cfg_scale}: an iMF network was trained on guidance scales in [1, "
                              f"diffusion.omega_max] (1 = no guidance); choose one >= 1")
        low, high = (0.0 if interval[0] is None else float(interval[0]), 1.0 if interval[1] is None else
                     float(interval[1]))
        if not 0 <= low <= high <= 1:
            raise ConfigError(f"guidance_low={interval[0]}, guidance_high={interval[1]}: an iMF network takes its "
                              f"guidance interval as conditions in [0, 1], MeanFlow's time (t = 1 noise); give "
                              f"0 <= guidance_low <= guidance_high <= 1 (null: 0 and 1)")
        null = null_class if null_class is not None else null_class_of(model)
        net, z = self.network(model), noise
        full = lambda value: torch.full((len(z),), value, device=z.device, dtype=z.dtype)
        omega = torch.where(labels == null, full(1.0), full(cfg_scale)) if labels is not None else full(1.0)
        grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
        for t, r in zip(grid[:-1], grid[1:]):
            u = net(z, full(t), full(r), labels, omega, full(low), full(high))
            z = z - (t - r) * u.to(z.dtype)
        return z
