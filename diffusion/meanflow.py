"""MeanFlow (Geng, Deng, Bai, Kolter & He 2025, arXiv 2505.13447): one-step generation from a network that predicts
the average velocity u(z_t, r, t) of the flow between two times, trained from scratch with the MeanFlow identity.

Conventions are MeanFlow's inside this file (docs/onestep.md has the table against the rest of the codebase):

    t = 1 is noise, t = 0 is data         z_t = (1 - t) x + t eps        v = dz_t/dt = eps - x
    (SiT's flows here run the other way: tau = 1 - t, x_tau = tau x + (1 - tau) eps, their velocity is -v)

The network is called as model(z, t * time_scale, y, dt=(t - r) * time_scale): the official DiT's (t, t - r)
conditioning, the second time through the network's own embedder (models/dit.py `second_time`). time_scale = 1 feeds
t in [0, 1] as the official code does.

Training (paper Alg. 1): the MeanFlow identity (eq. 6) u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t), with the
total derivative d/dt u = v . d_z u + d_t u (eq. 8) taken as ONE forward-mode JVP of the network along the tangent
(v, 1, 0) in (z, t, r). The target u_tgt = v - (t - r) du/dt is held fixed (stop-gradient, eq. 9); the loss is the
squared error summed over the values of a sample (as the official code), divided by the stop-gradient adaptive weight
(||err||^2 + norm_eps)^norm_p (paper Sec. 4.3; p = 1 in its recipes). Times: t and r drawn independently (logit-normal,
lognorm(-0.4, 1) in the paper, or uniform), sorted so r <= t, and r set to t for a share 1 - ratio_r_neq_t of the
samples (75% in the paper): those train u(z, t, t) = v, plain flow matching.

Guidance folded into the target (paper Sec. 4.2, eq. 13-21 and its appendix; the official `guidance_fn`): the
instantaneous velocity in the identity is replaced by the guided field
    v_g = omega v + (1 - omega - kappa) u(z_t, t, t | null) + kappa u(z_t, t, t | y)        (network terms no-grad)
for t inside guidance_interval (outside: omega = 1, kappa = 0); the effective guidance scale is omega / (1 - kappa).
Samples whose label was dropped (train.class_dropout: the null class) keep v_g = v, as the official cond_drop does.

JVP through attention: PyTorch's fused attention kernels (flash, memory-efficient, and the CPU flash kernel) have no
forward-mode derivative (pytorch #128971, #154226, #165530), so `jvp` runs the network under the math kernel, and
only there: the no-grad guidance passes and every sampler keep the kernel the run chose. The JVP is computed with
torch.autograd.forward_ad rather than torch.func.jvp, which cannot run a DDP-wrapped network.

Sampling (eq. 12): z_r = z_t - (t - r) u(z_t, r, t) on the grid t_i = 1 - i / steps; one step is
z_0 = eps - u(eps, 0, 1).
"""

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

from utils.errors import ConfigError

TIME_SAMPLING = ("logit_normal", "uniform")


def jvp(fn, primals, tangents):
    """(fn(*primals), the directional derivative of fn at primals along tangents), by forward-mode AD.

    The primal output keeps its autograd graph (the loss backpropagates through it); the tangent is detached. Runs
    under the math attention kernel, the one scaled_dot_product_attention kernel with a forward-mode derivative."""
    with sdpa_kernel(SDPBackend.MATH), fwAD.dual_level():
        out = fn(*(fwAD.make_dual(p, d.to(p.dtype)) for p, d in zip(primals, tangents)))
        primal, tangent = fwAD.unpack_dual(out)
        if tangent is None:   # the output does not depend on the primals: its derivative is zero
            tangent = torch.zeros_like(primal)
        return primal, tangent.detach().clone()


def null_class_of(model):
    """The null class id of a network (DDP / compile wrappers unwrapped): its num_classes."""
    raw = getattr(model, "module", model)
    raw = getattr(raw, "_orig_mod", raw)
    if not hasattr(raw, "num_classes"):
        raise ConfigError("MeanFlow's guidance (omega != 1 or kappa != 0) needs the network's null class: a network "
                          "with a num_classes attribute (every network in models/ has one)")
    return raw.num_classes


def expand_like(t, x):
    """(N,) -> (N, 1, ..., 1) to broadcast against x."""
    return t.view(-1, *([1] * (x.dim() - 1)))


class MeanFlowObjective:
    """MeanFlow behind train.py's objective interface (diffusion/objectives.py); see the module docstring.

    time_sampling, time_mean, time_std: how t and r are drawn (logit-normal: sigmoid(N(time_mean, time_std^2)); the
        paper's lognorm(-0.4, 1.0)), each independently, then sorted.
    ratio_r_neq_t: the share of samples with r != t (the paper: 25%); each sample draws it (py-meanflow's sampler;
        the official JAX code fixes the count per batch instead).
    norm_p, norm_eps: the adaptive loss weight (||err||^2 + norm_eps)^norm_p (p = 0: the plain squared error).
    omega, kappa, guidance_interval: guidance folded into the target (module docstring); omega = 1, kappa = 0: none.
    time_scale: the network sees t * time_scale and (t - r) * time_scale.
    """

    name = "meanflow"
    KEYS = ("time_sampling", "time_mean", "time_std", "ratio_r_neq_t", "norm_p", "norm_eps", "omega", "kappa",
            "guidance_interval", "time_scale")
    learn_sigma = False
    network_kwargs = {"second_time": True}   # the network embeds t - r beside t (models/dit.py, models/unet.py)

    def __init__(self, time_sampling="logit_normal", time_mean=-0.4, time_std=1.0, ratio_r_neq_t=0.25, norm_p=1.0,
                 norm_eps=0.01, omega=1.0, kappa=0.0, guidance_interval=(0.0, 1.0), time_scale=1.0):
        if time_sampling not in TIME_SAMPLING:
            raise ConfigError(f"unknown diffusion.time_sampling {time_sampling!r}; choose one of "
                              f"{', '.join(TIME_SAMPLING)}")
        if not 0 <= ratio_r_neq_t <= 1:
            raise ConfigError(f"diffusion.ratio_r_neq_t={ratio_r_neq_t}: the share of samples with r != t is in [0, 1]")
        if time_std <= 0 or time_scale <= 0 or norm_eps < 0 or norm_p < 0:
            raise ConfigError(f"diffusion.time_std={time_std} and time_scale={time_scale} must be positive, norm_p="
                              f"{norm_p} and norm_eps={norm_eps} non-negative")
        if kappa < 0 or kappa >= 1 or omega <= 0:
            raise ConfigError(f"diffusion.omega={omega}, kappa={kappa}: the guidance takes omega > 0 and 0 <= kappa < "
                              f"1 (its effective scale is omega / (1 - kappa); omega=1 kappa=0 is none)")
        interval = tuple(float(v) for v in guidance_interval)
        if len(interval) != 2 or not 0 <= interval[0] <= interval[1] <= 1:
            raise ConfigError(f"diffusion.guidance_interval={list(guidance_interval)}: give [t_start, t_end] within "
                              f"[0, 1] in MeanFlow's time (t = 1 noise)")
        self.time_sampling, self.time_mean, self.time_std = time_sampling, time_mean, time_std
        self.ratio_r_neq_t, self.norm_p, self.norm_eps = ratio_r_neq_t, norm_p, norm_eps
        self.omega, self.kappa, self.guidance_interval, self.time_scale = omega, kappa, interval, time_scale

    # ---- the network as a function of MeanFlow's (z, t, r) -------------------------------------------------

    def network(self, model):
        """u(z, t, r, y): the network called with t * time_scale and dt = (t - r) * time_scale."""
        s = self.time_scale
        return lambda z, t, r, y: model(z, t * s, y, dt=(t - r) * s)

    # ---- training --------------------------------------------------------------------------------------------

    def _time(self, generator, n, device):
        if self.time_sampling == "uniform":
            return torch.rand(n, generator=generator, device=device)
        return torch.sigmoid(torch.randn(n, generator=generator, device=device) * self.time_std + self.time_mean)

    def draw(self, generator, n, shape, device):
        """((N, 2) times [t, r] with r <= t, noise (N, *shape)), drawn in py-meanflow's order: the noise, t, r, then
        which samples keep r != t."""
        noise = torch.randn((n, *shape), generator=generator, device=device)
        t, r = self._time(generator, n, device), self._time(generator, n, device)
        t, r = torch.maximum(t, r), torch.minimum(t, r)
        equal = torch.rand(n, generator=generator, device=device) < 1 - self.ratio_r_neq_t
        return torch.stack([t, torch.where(equal, t, r)], dim=1), noise

    @torch.no_grad()
    def guided_velocity(self, u, z, t, v, y, null):
        """v_g = omega v + (1 - omega - kappa) u(z, t, t | null) + kappa u(z, t, t | y) inside the guidance interval,
        v outside it and for samples of the null class `null` (their label was dropped)."""
        lo, hi = self.guidance_interval
        inside = (t >= lo) & (t <= hi)
        omega = torch.where(inside, self.omega, 1.0)
        kappa = torch.where(inside, self.kappa, 0.0)
        y_null = torch.full_like(y, null)
        if self.kappa == 0:   # one pass: the unconditional velocity
            v_uncond, v_cond = u(z, t, t, y_null), 0
        else:                 # both in one batch of 2N
            v_uncond, v_cond = u(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]),
                                 torch.cat([y_null, y])).chunk(2)
        omega, kappa = expand_like(omega, z).to(v.dtype), expand_like(kappa, z).to(v.dtype)
        v_g = omega * v + (1 - omega - kappa) * v_uncond + kappa * v_cond
        return torch.where(expand_like(y == null, z), v, v_g.to(v.dtype))

    def losses(self, model, x, t, noise, model_kwargs):
        """{"loss": (N,) the adaptively weighted MeanFlow loss, "mse": (N,) the mean squared error u - u_tgt}; t is
        the (N, 2) [t, r] of draw()."""
        t, r = t[:, 0], t[:, 1]
        model_kwargs = dict(model_kwargs)
        y = model_kwargs.pop("y", None)
        if model_kwargs:
            raise ConfigError(f"MeanFlow's network takes (z, t, y, dt); got the extra inputs {sorted(model_kwargs)}")
        net = self.network(model)
        z = (1 - expand_like(t, x)) * x + expand_like(t, x) * noise          # z_t, t = 1 noise
        v = noise - x                                                        # the conditional velocity
        if (self.omega != 1 or self.kappa != 0) and y is not None:   # unconditional (y=None): nothing to guide
            v_g = self.guided_velocity(net, z, t, v, y, null_class_of(model))
        else:
            v_g = v
        # du/dt along the trajectory: tangents dz/dt = v_g, dt/dt = 1, dr/dt = 0 (Alg. 1)
        u, dudt = jvp(lambda z_, t_, r_: net(z_, t_, r_, y), (z, t, r), (v_g, torch.ones_like(t), torch.zeros_like(r)))
        dtype = torch.promote_types(u.dtype, torch.float32)   # the loss in at least fp32, whatever the autocast
        u_tgt = (v_g.to(dtype) - expand_like((t - r).clamp(0, 1), x).to(dtype) * dudt.to(dtype)).detach()
        err = ((u.to(dtype) - u_tgt) ** 2).flatten(1)
        sq = err.sum(1)                                                      # summed over values, as official
        weight = (sq.detach() + self.norm_eps) ** self.norm_p
        return {"loss": sq / weight, "mse": err.mean(1).detach()}

    # ---- sampling --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, model, noise, labels, steps, guide=lambda fn: fn, progress=False):
        """z_0 from noise z_1 in `steps` jumps z_r = z_t - (t - r) u(z_t, r, t), t_i = 1 - i / steps (eq. 12); guide
        wraps each jump's fn(z, t, y) (classifier-free guidance on u, with t in MeanFlow's time)."""
        if steps < 1:
            raise ConfigError(f"steps={steps}: MeanFlow samples in 1 or more jumps")
        net, z = self.network(model), noise
        grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
        for t, r in zip(grid[:-1], grid[1:]):
            fn = guide(lambda x_, t_, y_, r=r: net(x_, t_, torch.full_like(t_, r), y_))
            u = fn(z, torch.full((len(z),), t, device=z.device, dtype=z.dtype), labels)
            z = z - (t - r) * u.to(z.dtype)
        return z


def exact_gaussian_u(mean, std):
    """The exact average velocity u(z, r, t) of Gaussian data x ~ N(mean, std^2) (per value; std may be 0) under
    MeanFlow's path, as model(z, t, y, dt=t - r): with s(t) = sqrt((1 - t)^2 std^2 + t^2), trajectories keep
    (z_t - (1 - t) mean) / s(t), so u = -mean + (1 - s(r) / s(t)) / (t - r) (z - (1 - t) mean), and at r = t its
    limit -mean + s'(t) / s(t) (z - (1 - t) mean). For tests and docs (the closed form of docs/onestep.md)."""
    def s(t):
        return torch.sqrt((1 - t) ** 2 * std ** 2 + t ** 2)

    def model(z, t, y=None, dt=None):
        t, h = expand_like(t, z), expand_like(dt, z)
        r = t - h
        centred = z - (1 - t) * mean
        safe = torch.where(h == 0, torch.ones_like(h), h)
        jump = (1 - s(r) / s(t)) / safe
        limit = (-(1 - t) * std ** 2 + t) / s(t) ** 2
        return -mean + torch.where(h == 0, limit, jump) * centred
    return model


def marginal_velocity(mean, std):
    """v(z, t) = E[eps - x | z_t = z] of Gaussian data x ~ N(mean, std^2) under MeanFlow's path."""
    u = exact_gaussian_u(mean, std)
    return lambda z, t: u(z, t, None, torch.zeros_like(t))

