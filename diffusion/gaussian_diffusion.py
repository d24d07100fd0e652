"""Gaussian diffusion: the forward process, the hybrid training loss and the DDPM / DDIM samplers.

Equations cite Ho et al. 2020 (DDPM, 2006.11239), Nichol & Dhariwal 2021 (improved DDPM, 2102.09672) and
Song et al. 2020 (DDIM, 2010.02502). The API and the numbers (float64 tables, fp32 arithmetic) follow the
official DiT code, so results agree with it to float precision.

`model(x_t, t, **model_kwargs)` is any function; with a learned variance it returns 2C channels: epsilon
(or x0) then v in [-1, 1], the log-variance interpolation of improved DDPM eq. 15.
"""

import numpy as np
import torch
from tqdm.auto import tqdm

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from utils.errors import ConfigError

MEAN_TYPES = ("epsilon", "start_x")
VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


class GaussianDiffusion:
    """A discrete-time Gaussian diffusion with T = len(betas) steps, indexed t = 0 .. T-1.

    timestep_map: when this process is a respaced subset of a longer one, the original index of each of
    its steps; the model always sees original indices (so a model trained on 1000 steps samples in 250).
    """

    def __init__(self, *, betas, model_mean_type="epsilon", model_var_type="learned_range", loss_type="mse",
                 timestep_map=None):
        for value, allowed in ((model_mean_type, MEAN_TYPES), (model_var_type, VAR_TYPES), (loss_type, LOSS_TYPES)):
            if value not in allowed:
                raise ConfigError(f"{value!r} is not one of {', '.join(allowed)}")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.asarray(betas, dtype=np.float64)  # float64 tables for accuracy
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all(), "betas must be 1-D in (0, 1]"
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)                                    # alpha_bar_t
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])         # alpha_bar_{t-1}
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # Posterior q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7): variance beta_tilde_t and the two mean coefficients.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta_tilde_0 = 0, so its log is clipped to beta_tilde_1. A one-step process has no beta_tilde_1:
        # beta_0 stands in (only the likelihood terms read it; the last sampling step adds no noise).
        clipped = (np.append(self.posterior_variance[1], self.posterior_variance[1:]) if self.num_timesteps > 1
                   else betas.copy())
        self.posterior_log_variance_clipped = np.log(clipped)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        # Fixed variances (DDPM Sec. 3.2): sigma^2 = beta_tilde ("small") or beta ("large", with beta_tilde_1 at
        # t = 0 for a better decoder likelihood); improved DDPM interpolates between their logs.
        self.log_betas = np.log(betas)
        large = np.append(clipped[0], betas[1:])
        self._fixed_variance = {
            "fixed_large": (large, np.log(large)),
            "fixed_small": (self.posterior_variance, self.posterior_log_variance_clipped),
        }
        self._device_tables = {}  # (id(table), device) -> (table, tensor): each table crosses to a device once

    def _extract(self, arr, t, shape):
        """arr[t] for one of this process's float64 tables and (N,) indices, as float32 broadcastable to `shape`.

        The table is copied to t's device on first use only: a copy from pageable host memory on every lookup
        (about ten per training or sampling step) is synchronous for the host (a GPU saving not measured here).
        """
        out = self._on_device(arr, t.device)[t].float()
        return out.view(-1, *([1] * (len(shape) - 1))).expand(shape)

    def _on_device(self, arr, device, dtype=None):
        key = (id(arr), device, dtype)
        if key not in self._device_tables:  # the entry keeps `arr` alive, so its id cannot be reused
            self._device_tables[key] = (arr, torch.as_tensor(arr, device=device, dtype=dtype))
        return self._device_tables[key][1]

    # ----------------------------------------------------------------------------------------------------
    # Forward process
    # ----------------------------------------------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (DDPM eq. 4): (mean, variance, log_variance)."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = self._extract(self.one_minus_alphas_cumprod, t, x_start.shape)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        if noise is None:
            noise = torch.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7): (mean, variance, clipped log-variance)."""
        assert x_start.shape == x_t.shape
        mean = (self._extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        variance = self._extract(self.posterior_variance, t, x_t.shape)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ----------------------------------------------------------------------------------------------------
    # Reverse process
    # ----------------------------------------------------------------------------------------------------

    def _run_model(self, model, x, t, model_kwargs):
        """Call the model with the original (un-respaced) timestep indices."""
        return model(x, self._on_device(self.timestep_map, t.device, t.dtype)[t], **(model_kwargs or {}))

    def _predict_xstart_from_eps(self, x_t, t, eps):
        # Invert q_sample: x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar).
        assert x_t.shape == eps.shape
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    def p_mean_variance_from_output(self, model_output, x, t, clip_denoised=True, denoised_fn=None):
        """p(x_{t-1} | x_t) from a model output already computed: mean, variance, log_variance, pred_xstart."""
        B, C = x.shape[:2]
        if self.model_var_type == "learned_range":
            assert model_output.shape == (B, 2 * C, *x.shape[2:]), (
                f"a learned-variance model must output {2 * C} channels, got {tuple(model_output.shape)}")
            model_output, v = torch.split(model_output, C, dim=1)
            # improved DDPM eq. 15: log sigma^2 = frac log beta_t + (1 - frac) log beta_tilde_t, v in [-1, 1].
            min_log = self._extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = self._extract(self.log_betas, t, x.shape)
            frac = (v + 1) / 2
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            variance, log_variance = self._fixed_variance[self.model_var_type]
            model_variance = self._extract(variance, t, x.shape)
            model_log_variance = self._extract(log_variance, t, x.shape)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == "start_x":
            pred_xstart = process_xstart(model_output)
        else:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
        # The mean of p is the posterior mean with x_0 replaced by its prediction (DDPM eq. 11).
        model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance,
                "pred_xstart": pred_xstart}

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the model and return p(x_{t-1} | x_t): dict of mean, variance, log_variance, pred_xstart."""
        model_output = self._run_model(model, x, t, model_kwargs)
        return self.p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (DDPM Algorithm 2); no noise at t = 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = torch.randn_like(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return {"sample": out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise,
                "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0):
        """One DDIM step x_t -> x_{t-1} (DDIM eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like (eq. 16)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        # Re-derive eps from the (possibly clipped) x_0 prediction, whatever the model predicts.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        sample = mean_pred
        if eta > 0:
            nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
            sample = mean_pred + nonzero_mask * sigma * torch.randn_like(x)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _sample_loop(self, step, shape, noise, device, progress):
        """Run `step(x, t)` from t = T-1 down to 0, starting at `noise` or a fresh N(0, I) draw."""
        assert isinstance(shape, (tuple, list)), "shape must be a tuple such as (N, C, H, W)"
        x = noise if noise is not None else torch.randn(*shape, device=device)
        indices = range(self.num_timesteps - 1, -1, -1)
        for i in tqdm(indices, desc="sampling", leave=False) if progress else indices:
            t = torch.full((shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                x = step(x, t)["sample"]
        return x

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                      device=None, progress=False):
        """Ancestral sampling over all steps of this (possibly respaced) process; returns x_0."""
        step = lambda x, t: self.p_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        return self._sample_loop(step, shape, noise, _device(model, noise, device), progress)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                         device=None, progress=False, eta=0.0):
        """DDIM sampling over all steps of this (possibly respaced) process; returns x_0."""
        step = lambda x, t: self.ddim_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, eta)
        return self._sample_loop(step, shape, noise, _device(model, noise, device), progress)

    # ----------------------------------------------------------------------------------------------------
    # Training losses
    # ----------------------------------------------------------------------------------------------------

    def _vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised=False):
        """The variational-bound term L_t in bits per dim (DDPM eq. 5): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
        for t > 0, and the discretised decoder NLL -log p(x_0 | x_1) at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"],
                                                           log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample losses at timesteps t: a dict with "loss" (N,), plus "mse" and "vb" where they apply.

        mse: the simple loss ||eps - eps_theta||^2 (DDPM eq. 14), or on x_0 for x0-prediction.
        With a learned variance the hybrid loss L_simple + L_vb (improved DDPM Sec. 3.1): the vb term sees the
        mean through a stop-gradient, so it trains only the variance.
        kl / rescaled_kl: the variational bound alone (rescaled by T to estimate the full bound).
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self._run_model(model, x_t, t, model_kwargs)
        terms = {}
        if self.loss_type in ("kl", "rescaled_kl"):
            terms["loss"] = self._vb_terms_bpd(model_output, x_start, x_t, t)["output"]
            if self.loss_type == "rescaled_kl":
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        if self.model_var_type == "learned_range":
            C = x_t.shape[1]
            assert model_output.shape == (x_t.shape[0], 2 * C, *x_t.shape[2:]), (
                f"a learned-variance model must output {2 * C} channels, got {tuple(model_output.shape)}")
            model_output, v = torch.split(model_output, C, dim=1)
            frozen = torch.cat([model_output.detach(), v], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen, x_start, x_t, t)["output"]
            if self.loss_type == "rescaled_mse":
                # Keeps the vb term's weight equal to the 1000-step setting whatever T is.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = noise if self.model_mean_type == "epsilon" else x_start
        assert model_output.shape == target.shape == x_start.shape
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


def _device(model, noise, device):
    """Where sampling runs: the given device, else the noise's, else the model's parameters', else CPU."""
    if device is not None:
        return device
    if noise is not None:
        return noise.device
    first = next(model.parameters(), None) if hasattr(model, "parameters") else None
    return first.device if first is not None else "cpu"
