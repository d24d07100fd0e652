"""Shortcut models (Frans, Hafner, Levine & Abbeel 2024, arXiv 2410.12557; official JAX code kvfrans/shortcut-models):
one network conditioned on the noise level t and the step size d, trained by flow matching at the smallest step and
by self-consistency for larger ones, a step of 2d being two steps of d. No JVP.

Conventions are the official code's, which are SiT's (the flows here): t = 0 noise, t = 1 data,

    x_t = (1 - (1 - 1e-5) t) x_0 + t x_1,   v = x_1 - (1 - 1e-5) x_0     (x_0 noise, x_1 data)

and the step size enters the network as its level dt = log2(1 / d) (the official `dt_base`: 0 is one step over the
whole interval, log2(M) the flow-matching step 1/M, M = denoise_timesteps = 128): model(x, t * time_scale, y, dt=level).

Training (paper Sec. 3, Alg. 1; the official targets_shortcut.py):
- Every `bootstrap_every`-th sample of the global batch (1/8) is a self-consistency sample: a level k uniform in
  {0, ..., log2 M - 1} (the official code gives each level an equal count per batch instead), t on that level's grid
  {0, d, ..., 1 - d}, d = 2^-k, and the target (v1 + v2) / 2 of two steps of d/2 by the target network:
  v1 = s(x_t, t, d/2), x' = clip(x_t + d/2 v1, -4, 4), v2 = s(x', t + d/2, d/2), target clipped to [-4, 4].
  The target network is the run's EMA (`ema.decay`; the official target_update_rate is 0.999) with bootstrap_ema, else
  the weights being trained (no gradient either way). With target_cfg_scale != 1, targets at the finest bootstrapped
  level (whose two half steps are flow-matching steps) use classifier-free guidance at that scale, as the official
  bootstrap_cfg does; samples of the null class are never guided.
- Every other sample is flow matching at level log2 M, with t on the grid {0, 1/M, ..., 1 - 1/M} and target v.
- The loss is the mean squared error over a sample's values; the batch mean is the official loss.
Label dropout is train.py's for every sample (the official code drops labels of the flow-matching samples only).

Sampling: `steps` = 2^k Euler steps of d = 1 / steps from noise, x += d s(x, t, d), at level log2(steps).
"""

import math

import torch

from .losses import mean_flat
from .meanflow import expand_like, null_class_of
from utils.errors import ConfigError

PATH_EPS = 1e-5   # the official path's x_0 weight at t = 1


class ShortcutObjective:
    """Shortcut models behind train.py's objective interface (diffusion/objectives.py); see the module docstring.

    denoise_timesteps: M, the number of steps of the finest (flow-matching) level; a power of 2 (official: 128).
    bootstrap_every: one self-consistency sample in every this many (official: 8).
    bootstrap_ema: build the self-consistency targets with the run's EMA network (official: true).
    target_cfg_scale: classifier-free guidance of the finest self-consistency targets (official ImageNet: 1.5 with
        bootstrap_cfg; 1 = none).
    time_scale: the network sees t * time_scale (official: 1, t in [0, 1]).
    """

    name = "shortcut"
    KEYS = ("denoise_timesteps", "bootstrap_every", "bootstrap_ema", "target_cfg_scale", "time_scale")
    learn_sigma = False
    network_kwargs = {"second_time": True}   # the network embeds the step size's level beside t

    def __init__(self, denoise_timesteps=128, bootstrap_every=8, bootstrap_ema=True, target_cfg_scale=1.0,
                 time_scale=1.0):
        levels = math.log2(denoise_timesteps) if denoise_timesteps >= 2 else 0.5
        if levels != int(levels):
            raise ConfigError(f"diffusion.denoise_timesteps={denoise_timesteps}: a power of 2, at least 2 (official: "
                              f"128)")
        if bootstrap_every < 1 or time_scale <= 0 or target_cfg_scale <= 0:
            raise ConfigError(f"diffusion.bootstrap_every={bootstrap_every} must be at least 1, time_scale="
                              f"{time_scale} and target_cfg_scale={target_cfg_scale} positive")
        self.denoise_timesteps, self.levels = int(denoise_timesteps), int(levels)
        self.bootstrap_every, self.bootstrap_ema = int(bootstrap_every), bool(bootstrap_ema)
        self.target_cfg_scale, self.time_scale = target_cfg_scale, time_scale
        self.ema = None   # the run's EMA network (attach_ema), the targets' network with bootstrap_ema

    def attach_ema(self, ema):
        """Keep the run's EMA network as the target network (train.py hands it over; it is saved with the run, so
        a resumed run builds the same targets)."""
        self.ema = ema

    def network(self, model):
        """s(x, t, level, y): the network called with t * time_scale and dt = level."""
        return lambda x, t, level, y: model(x, t * self.time_scale, y, dt=level)

    # ---- training --------------------------------------------------------------------------------------------

    def draw(self, generator, n, shape, device):
        """((N, 2) [t, level] per sample, noise): self-consistency samples at the positions i = 0 mod
        bootstrap_every of the global batch (so every process gets its share) with a level below log2 M, the others
        at level log2 M; t on each level's grid."""
        noise = torch.randn((n, *shape), generator=generator, device=device)
        bootstrap = torch.arange(n, device=device) % self.bootstrap_every == 0
        level = torch.randint(0, self.levels, (n,), generator=generator, device=device)
        level = torch.where(bootstrap, level, self.levels).float()
        sections = 2 ** level
        t = torch.floor(torch.rand(n, generator=generator, device=device) * sections) / sections
        return torch.stack([t, level], dim=1), noise

    @torch.no_grad()
    def bootstrap_target(self, net, x_t, t, level, y, null):
        """(v1 + v2) / 2 of two steps of half the size, clipped as the official code clips."""
        half = 2.0 ** -(level + 1)
        finer = level + 1
        guided = (level == self.levels - 1) & (y != null) if self.target_cfg_scale != 1 and y is not None else None

        def velocity(x, tt):
            v = net(x, tt, finer, y)
            if guided is not None and guided.any():
                v_uncond = net(x, tt, finer, torch.full_like(y, null))
                v = torch.where(expand_like(guided, x), v_uncond + self.target_cfg_scale * (v - v_uncond), v)
            return v

        v1 = velocity(x_t, t)
        x2 = (x_t + expand_like(half, x_t) * v1).clamp(-4, 4)
        v2 = velocity(x2, t + half)
        return ((v1 + v2) / 2).clamp(-4, 4)

    def losses(self, model, x, t, noise, model_kwargs):
        """{"loss": (N,) the mean squared error against flow-matching or self-consistency targets}; t is the (N, 2)
        [t, level] of draw()."""
        t, level = t[:, 0], t[:, 1]
        y = model_kwargs.get("y")
        te = expand_like(t, x)
        x_t = (1 - (1 - PATH_EPS) * te) * noise + te * x
        target = x - (1 - PATH_EPS) * noise
        boot = level < self.levels
        if boot.any():
            if self.bootstrap_ema and self.ema is None:
                raise ConfigError("diffusion.bootstrap_ema=true builds the targets with the run's EMA network, which "
                                  "nobody attached (train.py does); attach_ema(ema) or set bootstrap_ema=false")
            target_net = self.network(self.ema if self.bootstrap_ema else model)
            null = null_class_of(model) if self.target_cfg_scale != 1 else None
            idx = boot.nonzero().squeeze(1)
            y_boot = None if y is None else y[idx]
            target = target.index_put((idx,), self.bootstrap_target(target_net, x_t[idx], t[idx], level[idx], y_boot,
                                                                    null).to(target.dtype))
        pred = self.network(model)(x_t, t, level, y)
        return {"loss": mean_flat((pred.float() - target.float()) ** 2)}

    # ---- sampling --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, model, noise, labels, steps, guide=lambda fn: fn, progress=False):
        """x_1 from noise in `steps` Euler steps of d = 1 / steps at level log2(steps); guide wraps each step's
        fn(x, t, y) (classifier-free guidance, t in SiT's time)."""
        level = math.log2(steps) if steps >= 1 else 0.5
        if level != int(level) or steps > self.denoise_timesteps:
            raise ConfigError(f"steps={steps}: a shortcut model takes a power of 2 up to denoise_timesteps="
                              f"{self.denoise_timesteps} (the step sizes it was trained on)")
        net, x, d = self.network(model), noise, 1.0 / steps
        fn = guide(lambda x_, t_, y_: net(x_, t_, torch.full_like(t_, level), y_))
        for i in range(steps):
            x = x + d * fn(x, torch.full((len(x),), i * d, device=x.device, dtype=x.dtype), labels).to(x.dtype)
        return x
