"""Interpolant paths of stochastic interpolants / flow matching (Ma et al. 2024, SiT, 2401.08740).

A path joins noise x0 ~ N(0, I) at t = 0 to data x1 at t = 1 (SiT's convention):

    x_t = alpha_t x1 + sigma_t x0,        u_t = d/dt x_t = alpha'_t x1 + sigma'_t x0.

Each class gives alpha_t, sigma_t and their derivatives; everything else (the probability-flow drift of a
score model, the score of a velocity model, the SDE diffusion coefficients) is derived from them here, once.
The method names are the ones of SiT's `transport.path` classes, so code that reaches into
`transport.path_sampler` keeps working.

With D(t) = (alpha'/alpha) sigma^2 - sigma sigma' (SiT eq. 9), the velocity and the score of the marginals are
related by  v(x, t) = (alpha'/alpha) x + D(t) s(x, t)  (Tweedie: E[x0 | x_t] = -sigma_t s).
"""

import math

import torch
from utils.errors import ConfigError


def expand_t_like_x(t, x):
    """(N,) times -> (N, 1, ..., 1), broadcastable against x of shape (N, ...)."""
    return t.view(t.shape[0], *([1] * (x.dim() - 1)))


class LinearPath:
    """alpha_t = t, sigma_t = 1 - t: rectified flow / the linear interpolant (SiT's "Linear", ICPlan)."""

    def compute_alpha_t(self, t):
        return t, 1

    def compute_sigma_t(self, t):
        return 1 - t, -1

    def compute_d_alpha_alpha_ratio_t(self, t):
        """alpha'_t / alpha_t (infinite at t = 0 for Linear and GVP)."""
        return 1 / t

    # ---- derived quantities -------------------------------------------------------------------------------

    def compute_drift(self, x, t):
        """(-(alpha'/alpha) x, D(t)): the probability-flow drift is the first plus D times the score."""
        t = expand_t_like_x(t, x)
        ratio = self.compute_d_alpha_alpha_ratio_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        return -ratio * x, ratio * sigma_t ** 2 - sigma_t * d_sigma_t

    def compute_diffusion(self, x, t, form="constant", norm=1.0):
        """w(t) of the SDE  dx = [v + w s] dt + sqrt(2 w) dW  (SiT's code; the paper's w_t is 2 w)."""
        t = expand_t_like_x(t, x)
        if form == "constant":
            return torch.full_like(t, norm)  # a tensor (SiT returns a float here, which its solver cannot take)
        if form == "SBDM":  # the diffusion of score-based diffusion models: w = D(t)
            return norm * self.compute_drift(x, t.flatten())[1]
        if form == "sigma":
            return norm * self.compute_sigma_t(t)[0]
        if form == "linear":
            return norm * (1 - t)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
        if form in ("increasing-decreasing", "inccreasing-decreasing"):  # the second spelling is SiT's code's
            return norm * torch.sin(math.pi * t) ** 2
        raise ConfigError(f"unknown diffusion_form {form!r}; choose one of {', '.join(DIFFUSION_FORMS)}")

    def get_score_from_velocity(self, velocity, x, t):
        """s = (r v - x) / (sigma^2 - r sigma' sigma) with r = alpha / alpha' (Linear: (t v - x) / (1 - t))."""
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        r = alpha_t / d_alpha_t
        return (r * velocity - x) / (sigma_t ** 2 - r * d_sigma_t * sigma_t)

    def get_noise_from_velocity(self, velocity, x, t):
        """eps = (r v - x) / (r sigma' - sigma), the noise x0 the velocity implies."""
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        r = alpha_t / d_alpha_t
        return (r * velocity - x) / (r * d_sigma_t - sigma_t)

    def get_velocity_from_score(self, score, x, t):
        """v = D s + (alpha'/alpha) x."""
        minus_drift, d = self.compute_drift(x, t)
        return d * score - minus_drift

    def compute_mu_t(self, t, x0, x1):
        """x_t = alpha_t x1 + sigma_t x0 (deterministic given the pair)."""
        t = expand_t_like_x(t, x1)
        return self.compute_alpha_t(t)[0] * x1 + self.compute_sigma_t(t)[0] * x0

    def compute_xt(self, t, x0, x1):
        return self.compute_mu_t(t, x0, x1)

    def compute_ut(self, t, x0, x1, xt):
        """The conditional velocity u_t = alpha'_t x1 + sigma'_t x0, the flow-matching target."""
        t = expand_t_like_x(t, x1)
        return self.compute_alpha_t(t)[1] * x1 + self.compute_sigma_t(t)[1] * x0

    def plan(self, t, x0, x1):
        """(t, x_t, u_t) for noise x0 and data x1."""
        xt = self.compute_xt(t, x0, x1)
        return t, xt, self.compute_ut(t, x0, x1, xt)


class GVPPath(LinearPath):
    """alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2): variance preserving, alpha^2 + sigma^2 = 1 (SiT's "GVP")."""

    def compute_alpha_t(self, t):
        return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def compute_sigma_t(self, t):
        return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)

    def compute_d_alpha_alpha_ratio_t(self, t):
        return math.pi / (2 * torch.tan(t * math.pi / 2))


class VPPath(LinearPath):
    """The VP SDE of Song et al. 2021 (2011.13456) in interpolant time: alpha_t = exp(m(t)), sigma_t^2 = 1 - alpha_t^2,
    m(t) = -(1-t)^2 (beta_max - beta_min) / 4 - (1-t) beta_min / 2 (SiT's "VP", beta_min 0.1, beta_max 20)."""

    def __init__(self, sigma_min=0.1, sigma_max=20.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def log_mean_coeff(self, t):
        return -0.25 * (1 - t) ** 2 * (self.sigma_max - self.sigma_min) - 0.5 * (1 - t) * self.sigma_min

    def d_log_mean_coeff(self, t):
        return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def compute_alpha_t(self, t):
        alpha_t = torch.exp(self.log_mean_coeff(t))
        return alpha_t, alpha_t * self.d_log_mean_coeff(t)

    def compute_sigma_t(self, t):
        alpha_sq = torch.exp(2 * self.log_mean_coeff(t))
        sigma_t = torch.sqrt(1 - alpha_sq)
        return sigma_t, -alpha_sq * self.d_log_mean_coeff(t) / sigma_t

    def compute_d_alpha_alpha_ratio_t(self, t):
        return self.d_log_mean_coeff(t)  # m'(t), finite everywhere

    def compute_drift(self, x, t):
        # D(t) = beta_t / 2 = m'(t) in closed form (the generic expression agrees, less stably near t = 1).
        t = expand_t_like_x(t, x)
        beta_t = self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min)
        return -0.5 * beta_t * x, beta_t / 2


PATHS = {"Linear": LinearPath, "GVP": GVPPath, "VP": VPPath}
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
