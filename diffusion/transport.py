"""Flow matching and stochastic interpolants with the interface of SiT's `transport` package (Ma et al. 2024,
2401.08740): `create_transport`, `Transport.training_losses`, and `Sampler.sample_ode / sample_sde /
sample_ode_likelihood`.

Conventions are SiT's at this interface: t = 0 is noise x0, t = 1 is data x1, the network sees the raw t in [0, 1],
a model predicts the velocity, the score or the noise, or (prediction="x", not in SiT) the clean data x1 itself, as
JiT does (Li & He 2025, 2511.13720, "Back to Basics: Let Denoising Generative Models Denoise"; see
`velocity_from_data`). For the same model function, data and torch RNG state the losses and samplers here equal
SiT's (tests/test_transport_parity.py), with three things SiT gets wrong mended:

- `diffusion_form="SBDM"` with a velocity model on the Linear or GVP path starts the SDE at t = 0, where the SBDM
  diffusion D(t) is infinite (every sample is NaN); here it starts at t = SBDM_T0 instead.
- SiT's SDE drift calls the network twice (once for the velocity, once more for the score); here once.
- Likelihoods: SiT's scripts integrate fresh noise; `Sampler.sample_ode_likelihood` (and `log_likelihood` with
  bits per dimension) evaluates the data it is given, and `divergence="exact"` gives the exact trace for small data.

ODEs are solved by torchdiffeq (any of its methods; fixed-grid methods step exactly on the requested grid).
"""

import enum
import math

import torch
from torchdiffeq import odeint

from .losses import mean_flat
from .paths import DIFFUSION_FORMS, GVPPath, LinearPath, VPPath, expand_t_like_x
from utils.errors import ConfigError

SBDM_T0 = 1e-3   # where the SBDM SDE of a velocity model starts (the eps SiT itself uses for score/noise models)
JIT_T_EPS = 5e-2  # JiT's --t_eps: x-prediction's conversion to a velocity divides by max(sigma_t, t_eps)


class ModelType(enum.Enum):
    """What the network predicts."""
    NOISE = enum.auto()     # eps = x0
    SCORE = enum.auto()     # grad log p_t(x)
    VELOCITY = enum.auto()  # d x_t / dt
    DATA = enum.auto()      # the clean sample x1 (JiT's x-prediction), trained with a loss on the velocity it implies


class PathType(enum.Enum):
    LINEAR = enum.auto()
    GVP = enum.auto()
    VP = enum.auto()


class WeightType(enum.Enum):
    """Loss weighting of noise and score models (a velocity model's loss is never weighted, as in SiT)."""
    NONE = enum.auto()
    VELOCITY = enum.auto()    # w = (D / sigma)^2: the score loss measured as a velocity error
    LIKELIHOOD = enum.auto()  # w = D / sigma^2: the maximum-likelihood weighting


_PATH_CLASSES = {PathType.LINEAR: LinearPath, PathType.GVP: GVPPath, PathType.VP: VPPath}
PREDICTIONS = {"velocity": ModelType.VELOCITY, "score": ModelType.SCORE, "noise": ModelType.NOISE, "x": ModelType.DATA}
# Predictions whose drift is regular at both ends of a Linear or GVP path: trained and sampled on all of [0, 1].
_REGULAR = (ModelType.VELOCITY, ModelType.DATA)
LOSS_WEIGHTS = {None: WeightType.NONE, "velocity": WeightType.VELOCITY, "likelihood": WeightType.LIKELIHOOD}
_PATH_TYPES = {"Linear": PathType.LINEAR, "GVP": PathType.GVP, "VP": PathType.VP}


def create_transport(path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None,
                     t_eps=JIT_T_EPS):
    """SiT's factory. path_type: Linear | GVP | VP; prediction: velocity | score | noise | x (JiT: the clean data);
    loss_weight: None | velocity | likelihood (noise and score models only); train_eps / sample_eps: how far
    training times and sampling grids stay from the singular ends; t_eps: x-prediction only, the floor of the
    sigma_t its velocity divides by (JiT's --t_eps, 0.05; on Linear sigma_t = 1 - t).

    Defaults as SiT's: a velocity model on Linear or GVP is regular everywhere, so both eps are 0 (given values
    are ignored); noise and score models there use 1e-3; VP trains on [0, 1 - 1e-5] and samples to 1 - 1e-3.
    As in SiT, a given sample_eps counts only together with a given train_eps (alone it is replaced by 1e-3).
    An x-prediction model is treated as a velocity model (JiT trains and samples t on all of [0, 1]: the floor
    t_eps keeps its velocity finite at the data end).
    """
    if path_type not in _PATH_TYPES:
        raise ConfigError(f"unknown path_type {path_type!r}; choose one of {', '.join(_PATH_TYPES)}")
    if prediction not in PREDICTIONS:
        raise ConfigError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    if loss_weight not in LOSS_WEIGHTS:
        raise ConfigError(f"unknown loss_weight {loss_weight!r}; choose None, velocity or likelihood")
    path, model_type = _PATH_TYPES[path_type], PREDICTIONS[prediction]
    if model_type == ModelType.DATA and loss_weight is not None:
        raise ConfigError(f"loss_weight={loss_weight!r} weights score and noise losses; prediction=x is trained with "
                         f"JiT's unweighted velocity loss: set loss_weight=None")
    if isinstance(t_eps, bool) or not isinstance(t_eps, (int, float)) or not 0 < t_eps < 1:
        raise ConfigError(f"t_eps={t_eps!r}: give a number in (0, 1) (JiT: 0.05)")
    if path == PathType.VP or model_type not in _REGULAR:
        default_train_eps = 1e-5 if path == PathType.VP else 1e-3
        # SiT leaves sample_eps None (and its samplers crash) when only train_eps is given; 1e-3 here.
        sample_eps = 1e-3 if train_eps is None or sample_eps is None else sample_eps
        train_eps = default_train_eps if train_eps is None else train_eps
    else:
        train_eps, sample_eps = 0, 0
    return Transport(model_type=model_type, path_type=path, loss_type=LOSS_WEIGHTS[loss_weight],
                     train_eps=train_eps, sample_eps=sample_eps, t_eps=t_eps)


class Transport:
    """The interpolant objective: its training loss and the drift, score and diffusion the samplers integrate."""

    def __init__(self, *, model_type, path_type, loss_type, train_eps, sample_eps, t_eps=JIT_T_EPS):
        self.model_type, self.path_type, self.loss_type = model_type, path_type, loss_type
        self.path_sampler = _PATH_CLASSES[path_type]()
        self.train_eps, self.sample_eps, self.t_eps = train_eps, sample_eps, t_eps

    def prior_logp(self, z):
        """log N(z; 0, I) per sample, in nats."""
        n = z[0].numel()
        return -n / 2 * math.log(2 * math.pi) - (z ** 2).flatten(1).sum(1) / 2

    def check_interval(self, train_eps, sample_eps, *, diffusion_form="SBDM", sde=False, reverse=False, eval=False,
                       last_step_size=0.0):
        """(t0, t1): the time range of training (eval=False) or of a sampler, kept away from singular ends."""
        t0, t1 = 0, 1
        eps = sample_eps if eval else train_eps
        if self.path_type == PathType.VP:
            t1 = 1 - eps if not sde or last_step_size == 0 else 1 - last_step_size
        elif self.model_type not in _REGULAR or sde:
            t0 = eps if (diffusion_form == "SBDM" and sde) or self.model_type not in _REGULAR else 0
            t1 = 1 - eps if not sde or last_step_size == 0 else 1 - last_step_size
        if reverse:
            t0, t1 = 1 - t0, 1 - t1
        return t0, t1

    def sample(self, x1):
        """(t, x0, x1): noise like x1 and t ~ U[t0, t1], drawn from torch's global RNG in SiT's order."""
        x0 = torch.randn_like(x1)
        t0, t1 = self.check_interval(self.train_eps, self.sample_eps)
        t = torch.rand((x1.shape[0],)) * (t1 - t0) + t0
        return t.to(x1), x0, x1

    def training_losses(self, model, x1, model_kwargs=None, t=None, x0=None):
        """{'loss': per-sample loss (N,), 'pred': the model output} at x_t = alpha_t x1 + sigma_t x0.

        t and x0 default to fresh draws (SiT's `sample`); the trainer passes its own, drawn from the step's RNG.
        """
        if t is None or x0 is None:
            t, x0, x1 = self.sample(x1)
        t, xt, ut = self.path_sampler.plan(t, x0, x1)
        pred = model(xt, t, **(model_kwargs or {}))
        if pred.shape != xt.shape:
            raise ValueError(f"the model returns shape {tuple(pred.shape)} for input {tuple(xt.shape)}; a flow model "
                             f"predicts one value per input value (build it with learn_sigma=False)")
        if self.model_type == ModelType.VELOCITY:
            return {"loss": mean_flat((pred - ut) ** 2), "pred": pred}
        if self.model_type == ModelType.DATA:
            # JiT's loss: both velocities through the same conversion, so its floor t_eps applies to both; where
            # sigma_t >= t_eps the target is u_t itself, and the loss is a weighted x-loss A^2 |x_hat - x1|^2 / sigma^2.
            target = self.velocity_from_data(x1, xt, t)
            return {"loss": mean_flat((self.velocity_from_data(pred, xt, t) - target) ** 2), "pred": pred}
        _, d = self.path_sampler.compute_drift(xt, t)
        sigma_t, _ = self.path_sampler.compute_sigma_t(expand_t_like_x(t, xt))
        weight = {WeightType.NONE: 1, WeightType.VELOCITY: (d / sigma_t) ** 2,
                  WeightType.LIKELIHOOD: d / sigma_t ** 2}[self.loss_type]
        if self.model_type == ModelType.NOISE:
            return {"loss": mean_flat(weight * (pred - x0) ** 2), "pred": pred}
        return {"loss": mean_flat(weight * (pred * sigma_t + x0) ** 2), "pred": pred}  # score target -x0 / sigma

    # ---- what the samplers integrate, from one network output ----------------------------------------------

    def velocity_from_data(self, x_hat, x, t):
        """The velocity an x-prediction x_hat implies at (x, t): with the noise it implies, eps = (x - alpha x_hat) /
        sigma, v = alpha' x_hat + sigma' eps = ((alpha' sigma - sigma' alpha) x_hat + sigma' x) / sigma, where the
        last sigma is floored at t_eps (JiT's clamp_min: finite at the data end). On the Linear path (alpha = t,
        sigma = 1 - t) this is JiT's v = (x_hat - x) / max(1 - t, t_eps) exactly; on GVP pi/2 (x_hat - sin(pi t/2) x)
        / max(cos(pi t/2), t_eps). On VP, sigma' itself grows like 1 / sigma at the data end, which the floor does
        not remove (VP stays 1e-5 away from it)."""
        t = expand_t_like_x(t, x)
        alpha, d_alpha = self.path_sampler.compute_alpha_t(t)
        sigma, d_sigma = self.path_sampler.compute_sigma_t(t)
        return ((d_alpha * sigma - d_sigma * alpha) * x_hat + d_sigma * x) / sigma.clamp_min(self.t_eps)

    def velocity_and_score(self, output, x, t):
        """(v, s) at (x, t) from the network's output, whatever it predicts (one network call gives both). An
        x-prediction's score is the one its (floored) velocity implies, so its SDE and ODE share one field; where
        sigma_t >= t_eps it is Tweedie's (alpha x_hat - x) / sigma^2."""
        path = self.path_sampler
        if self.model_type == ModelType.VELOCITY:
            return output, path.get_score_from_velocity(output, x, t)
        if self.model_type == ModelType.DATA:
            v = self.velocity_from_data(output, x, t)
            return v, path.get_score_from_velocity(v, x, t)
        if self.model_type == ModelType.NOISE:
            score = output / -path.compute_sigma_t(expand_t_like_x(t, x))[0]
        else:
            score = output
        minus_drift, d = path.compute_drift(x, t)
        return -minus_drift + d * score, score

    def get_drift(self):
        """drift(x, t, model, **kwargs): the probability-flow ODE's velocity."""
        def drift(x, t, model, **model_kwargs):
            out = model(x, t, **model_kwargs)
            if self.model_type == ModelType.VELOCITY:
                return out
            return self.velocity_and_score(out, x, t)[0]
        return drift

    def get_score(self):
        """score(x, t, model, **kwargs) = grad log p_t(x)."""
        def score(x, t, model, **model_kwargs):
            out = model(x, t, **model_kwargs)
            if self.model_type == ModelType.SCORE:
                return out
            return self.velocity_and_score(out, x, t)[1]
        return score


# ---- time shift -----------------------------------------------------------------------------------------------
# One map in two parametrisations (docs/flows.md, "Time shift"). On SiT time t (0 noise, 1 data) shift_time(t, a) =
# a t / (1 + (a - 1) t), LightningDiT's sampling-grid shift (`sample.time_shift`, 0.3 in their recipe). SD3
# (2403.03206) and RAE (2510.11690) shift their noise time tau = 1 - t by s tau / (1 + (s - 1) tau), s > 1 toward
# noise (`diffusion.time_shift`); substituting tau = 1 - t gives shift_time(t, 1 / s) (algebraically). The inverse of
# shift_time(., a) is shift_time(., 1 / a).

DIMENSION_SHIFT_BASE = 4096   # RAE's time_dist_shift_base (src/train.py; every config): s = 1 at 4 x 32 x 32 values


def shift_time(t, shift):
    """LightningDiT's sampling-grid shift t' = a t / (1 + (a - 1) t), a = `shift`, on SiT time (t = 1 data); the ends
    stay fixed. a < 1 crowds the grid toward the noise end. In SD3's / RAE's noise time tau = 1 - t it is their shift
    s = 1 / a (diffusion.time_shift's parametrisation)."""
    if shift == 1:
        return t
    if shift <= 0:
        raise ConfigError(f"time_shift={shift} must be positive (1 = no shift; LightningDiT uses 0.3)")
    return shift * t / (1 + (shift - 1) * t)


def shift_interval(t, shift, t0, t1):
    """shift_time within the interval between t0 and t1 (either order): its ends stay fixed, so a sampler's grid
    still starts at t0 and ends at t1 (the SDE's last step then starts where it should). On [0, 1] it is
    shift_time itself, bit for bit; shift = 1 returns t."""
    if shift == 1:
        return t
    lo, hi = min(t0, t1), max(t0, t1)
    return lo + (hi - lo) * shift_time((t - lo) / (hi - lo), shift)


def dimension_shift(shape, base=DIMENSION_SHIFT_BASE):
    """RAE's (and SD3's) dimension-dependent shift s = sqrt(C H W / base) for data of `shape` (C, H, W) (any shape:
    the number of values is what counts): s > 1 moves time toward noise for data of more than `base` values."""
    return math.sqrt(math.prod(int(d) for d in shape) / base)


def resolve_time_shift(time_shift, shape=None):
    """The noise-side shift s (SD3's and RAE's parametrisation, 1 = none) that `diffusion.time_shift` asks for:
    a positive number as it is, or "auto" = dimension_shift(shape) of the data the network sees."""
    if time_shift == "auto":
        if shape is None:
            raise ConfigError("diffusion.time_shift=auto takes the shift from the data's shape, and none was given")
        return dimension_shift(shape)
    if isinstance(time_shift, bool) or not isinstance(time_shift, (int, float)) or not time_shift > 0:
        raise ConfigError(f"diffusion.time_shift={time_shift!r}: give a positive number (1 = no shift; SD3's and "
                         f"RAE's s, > 1 toward noise) or auto (s = sqrt(C*H*W / {DIMENSION_SHIFT_BASE}))")
    return time_shift


class Sampler:
    """SiT's sampler factory: each method returns a function (init, model, **model_kwargs) -> trajectory."""

    def __init__(self, transport):
        self.transport = transport
        self.drift = transport.get_drift()
        self.score = transport.get_score()

    # ---- SDE -------------------------------------------------------------------------------------------------

    def sample_sde(self, *, sampling_method="Euler", diffusion_form="SBDM", diffusion_norm=1.0, last_step="Mean",
                   last_step_size=0.04, num_steps=250, time_shift=1.0, generator=None):
        """Integrate dx = [v + w s] dt + sqrt(2 w) dW from noise (t0) to t1 = 1 - last_step_size, then one last step.

        sampling_method: "Euler" (Euler-Maruyama) or "Heun" (stochastic Heun: noise, then a 2nd-order drift step).
        diffusion_form / diffusion_norm: w(t) (see paths.DIFFUSION_FORMS); "sigma" is SiT's CLI default and, with
        last_step="Mean" and last_step_size=0.04, REPA's SDE sampler. last_step: None | "Mean" (drift only) |
        "Tweedie" (the posterior mean of the data) | "Euler" (a velocity step). num_steps: grid points, i.e.
        num_steps - 1 stochastic steps, plus the last step. The returned function gives the list of num_steps states.
        generator: a torch.Generator for the noise (default: torch's global RNG, as in SiT).
        """
        if sampling_method not in ("Euler", "Heun"):
            raise ConfigError(f"unknown SDE sampling_method {sampling_method!r}; choose Euler or Heun")
        if diffusion_form not in DIFFUSION_FORMS and diffusion_form != "inccreasing-decreasing":
            raise ConfigError(f"unknown diffusion_form {diffusion_form!r}; choose one of {', '.join(DIFFUSION_FORMS)}")
        if last_step not in (None, "Mean", "Tweedie", "Euler"):
            raise ConfigError(f"unknown last_step {last_step!r}; choose None, Mean, Tweedie or Euler")
        if num_steps < 2:
            raise ConfigError(f"num_steps={num_steps}: the SDE grid needs at least 2 points")
        if last_step is None:
            last_step_size = 0.0
        transport, path = self.transport, self.transport.path_sampler
        t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, diffusion_form=diffusion_form,
                                          sde=True, eval=True, last_step_size=last_step_size)
        if diffusion_form == "SBDM" and t0 == 0 and transport.path_type != PathType.VP:
            t0 = SBDM_T0  # D(0) is infinite on Linear and GVP (SiT starts here and returns NaN)
        if not t0 < t1:
            raise ConfigError(f"the SDE runs from t0={t0} to t1={t1}; use a smaller last_step_size")
        grid = shift_interval(torch.linspace(t0, t1, num_steps), time_shift, t0, t1)

        def drift_and_diffusion(x, t, model, model_kwargs):
            """f = v + w s and w, from a single network call."""
            v, s = transport.velocity_and_score(model(x, t, **model_kwargs), x, t)
            w = path.compute_diffusion(x, t, form=diffusion_form, norm=diffusion_norm)
            return v + w * s, w

        def last(x, t, model, model_kwargs):
            if last_step is None:
                return x
            if last_step == "Mean":
                return x + drift_and_diffusion(x, t, model, model_kwargs)[0] * last_step_size
            if last_step == "Euler":
                return x + self.drift(x, t, model, **model_kwargs) * last_step_size
            alpha, sigma = path.compute_alpha_t(t[:1])[0], path.compute_sigma_t(t[:1])[0]  # Tweedie's formula
            return x / alpha + sigma ** 2 / alpha * self.score(x, t, model, **model_kwargs)

        def _sample(init, model, **model_kwargs):
            x, states = init, []
            ones = torch.ones(init.shape[0], device=init.device, dtype=init.dtype)
            for i in range(num_steps - 1):
                t, dt = ones * grid[i].item(), (grid[i + 1] - grid[i]).to(init)
                noise = torch.randn(x.shape, generator=generator, device=x.device).to(x)
                with torch.no_grad():
                    if sampling_method == "Euler":
                        f, w = drift_and_diffusion(x, t, model, model_kwargs)
                        x = x + f * dt + torch.sqrt(2 * w) * noise * torch.sqrt(dt)
                    else:
                        w = path.compute_diffusion(x, t, form=diffusion_form, norm=diffusion_norm)
                        x_hat = x + torch.sqrt(2 * w) * noise * torch.sqrt(dt)
                        k1 = drift_and_diffusion(x_hat, t, model, model_kwargs)[0]
                        k2 = drift_and_diffusion(x_hat + dt * k1, t + dt, model, model_kwargs)[0]
                        x = x_hat + 0.5 * dt * (k1 + k2)
                states.append(x)
            with torch.no_grad():
                states.append(last(x, ones * t1, model, model_kwargs))
            return states

        return _sample

    # ---- ODE -------------------------------------------------------------------------------------------------

    def sample_ode(self, *, sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3, reverse=False,
                   time_shift=1.0):
        """Integrate the probability-flow ODE dx/dt = v(x, t) with torchdiffeq from t0 (noise) to t1 (data), or back
        with reverse=True. sampling_method: any torchdiffeq method ("euler", "midpoint", "heun2", "rk4", "dopri5",
        ...), or "heun_last_euler": Heun steps except the last, which is an Euler step (EDM's Algorithm 1, Karras et al.
        2022; JiT's sampler, whose x-prediction velocity at t = 1 would divide by its floor). num_steps: the grid of
        times returned; fixed-grid methods step exactly on it (euler with num_steps=N takes N - 1 steps), adaptive ones
        (dopri5) choose their own steps within atol / rtol. time_shift: see shift_time. The returned function gives a
        tensor (num_steps, *init.shape), the state at every grid time."""
        t0, t1 = self.transport.check_interval(self.transport.train_eps, self.transport.sample_eps, sde=False,
                                               eval=True, reverse=reverse)
        grid = shift_interval(torch.linspace(t0, t1, num_steps), time_shift, t0, t1)
        if sampling_method == "heun_last_euler":
            return _HeunLastEuler(self.drift, grid).sample
        return _ODE(self.drift, grid, sampling_method, atol, rtol).sample

    def sample_ode_likelihood(self, *, sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3,
                              divergence="hutchinson"):
        """log p(x) of data x by the instantaneous change of variables (FFJORD, 1810.01367): integrate data -> noise
        with d(delta)/ds = div v, then log p(x) = log N(z; 0, I) - delta. The returned function maps (x, model,
        **model_kwargs) -> (logp (N,) in nats, z).

        divergence: "hutchinson" (one Rademacher probe per evaluation, SiT's estimator and RNG use) or "exact"
        (the trace of the Jacobian, one backward pass per dimension: for small data and for tests).
        """
        if divergence not in ("hutchinson", "exact"):
            raise ConfigError(f"unknown divergence {divergence!r}; choose hutchinson or exact")
        drift = self.drift

        def likelihood_drift(state, t, model, **model_kwargs):
            x, _ = state
            probe = torch.randint(2, x.shape, dtype=torch.float, device=x.device) * 2 - 1 \
                if divergence == "hutchinson" else None
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                v = drift(x, 1 - t, model, **model_kwargs)   # solver time s runs data -> noise: model time 1 - s
                div = _divergence(v, x, probe)
            return -v.detach(), div.detach()

        t0, t1 = self.transport.check_interval(self.transport.train_eps, self.transport.sample_eps, sde=False,
                                               eval=True)
        ode = _ODE(likelihood_drift, torch.linspace(t0, t1, num_steps), sampling_method, atol, rtol)

        def _sample(x, model, **model_kwargs):
            z, delta = ode.sample((x, torch.zeros(x.shape[0]).to(x)), model, **model_kwargs)
            z, delta = z[-1], delta[-1]
            return self.transport.prior_logp(z) - delta, z

        return _sample


def _divergence(v, x, probe):
    """div_x v: probe^T (dv/dx) probe (Hutchinson) with a probe, else the exact trace."""
    if probe is not None:
        grad = torch.autograd.grad((v * probe).sum(), x)[0]
        return (grad * probe).flatten(1).sum(1)
    flat_v = v.flatten(1)
    div = torch.zeros(x.shape[0], device=x.device, dtype=v.dtype)
    for i in range(flat_v.shape[1]):  # d v_i / d x_i for every sample at once (samples are independent)
        grad = torch.autograd.grad(flat_v[:, i].sum(), x, retain_graph=True)[0]
        div = div + grad.flatten(1)[:, i]
    return div


def bits_per_dim(logp, num_dims, bin_width=2 / 256):
    """Bits per dimension of discrete data from the density of its continuous version: data in [-1, 1] from 8-bit
    values has bins of width 2/256, so -log2 P(bin) ~= -(log p + D log(bin_width)) / ln 2 (uniformly dequantised)."""
    return -(logp + num_dims * math.log(bin_width)) / (num_dims * math.log(2))


class _ODE:
    """torchdiffeq's odeint over a fixed output grid, for a drift(x, t, model, **kwargs) with t of shape (N,)."""

    def __init__(self, drift, grid, method, atol, rtol):
        self.drift, self.grid, self.method, self.atol, self.rtol = drift, grid, method, atol, rtol

    def sample(self, x, model, **model_kwargs):
        first = x[0] if isinstance(x, tuple) else x
        n, device = first.shape[0], first.device

        def fn(t, state):
            return self.drift(state, torch.ones(n, device=device) * t, model, **model_kwargs)

        tol = len(x) if isinstance(x, tuple) else 1
        return odeint(fn, x, self.grid.to(device), method=self.method, atol=[self.atol] * tol, rtol=[self.rtol] * tol)


class _HeunLastEuler:
    """Heun's method (torchdiffeq's heun2) on every interval of the grid but the last, then one Euler step to its end:
    the last step never evaluates the drift at the grid's end (the data end of an x-prediction model)."""

    def __init__(self, drift, grid):
        self.drift, self.grid = drift, grid

    def sample(self, x, model, **model_kwargs):
        states = _ODE(self.drift, self.grid[:-1], "heun2", 0.0, 0.0).sample(x, model, **model_kwargs)
        last, grid = states[-1], self.grid.to(x.device)
        t = torch.ones(x.shape[0], device=x.device) * grid[-2]
        last = last + (grid[-1] - grid[-2]) * self.drift(last, t, model, **model_kwargs)
        return torch.cat([states, last[None]])
