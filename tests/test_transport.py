"""Flows and stochastic interpolants against closed forms: paths, conversions, Gaussian data, time sampling, guidance.

On Gaussian data x1 ~ N(mu, s^2 I) everything is known: x_t ~ N(alpha mu, (alpha^2 s^2 + sigma^2) I), the velocity is
affine in x, and the flow from N(0, I) to the data is x1 = mu + s x0 exactly.
"""

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.special import expit

from diffusion import Sampler, build_objective, create_transport
from diffusion.guidance import classifier_free_guidance
from diffusion.paths import PATHS, VPPath
from diffusion.sampling import resolve_sampler, sample
from diffusion.transport import SBDM_T0, bits_per_dim, shift_time

MU, S = 0.7, 0.5   # the Gaussian data of these tests


def oracle(path, mu=MU, s=S, prediction="velocity"):
    """The exact velocity / score / noise network for data N(mu, s^2 I) on `path`."""
    def model(x, t, y=None):
        tt = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        alpha, d_alpha = path.compute_alpha_t(tt)
        sigma, d_sigma = path.compute_sigma_t(tt)
        var = alpha ** 2 * s ** 2 + sigma ** 2
        centred = x - alpha * mu
        # sigma sigma' = -alpha alpha' on variance-preserving paths, also at VP's t = 1 where sigma' = -inf, sigma = 0.
        sigma_d_sigma = -alpha * d_alpha if isinstance(path, VPPath) else sigma * d_sigma
        if prediction == "velocity":
            return d_alpha * mu + (d_alpha * alpha * s ** 2 + sigma_d_sigma) / var * centred
        score = -centred / var
        return score if prediction == "score" else -sigma * score
    return model


# ------------------------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PATHS)
def test_path_derivatives_are_the_autograd_derivatives(name):
    path = PATHS[name]()
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64, requires_grad=True)
    for compute in (path.compute_alpha_t, path.compute_sigma_t):
        value, derivative = compute(t)
        value = value if torch.is_tensor(value) else torch.full_like(t, value)
        (grad,) = torch.autograd.grad(value.sum(), t)
        torch.testing.assert_close(torch.as_tensor(derivative, dtype=torch.float64).expand_as(t), grad)
    alpha, d_alpha = path.compute_alpha_t(t)
    torch.testing.assert_close(path.compute_d_alpha_alpha_ratio_t(t), d_alpha / alpha)


@pytest.mark.parametrize("name", PATHS)
def test_drift_variance_is_the_generic_formula(name):
    """D(t) = (alpha'/alpha) sigma^2 - sigma sigma' (VP overrides it with beta_t / 2: the same function)."""
    path = PATHS[name]()
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    x = torch.ones(19, 1)
    alpha, d_alpha = path.compute_alpha_t(t)
    sigma, d_sigma = path.compute_sigma_t(t)
    minus_drift, d = path.compute_drift(x, t)
    torch.testing.assert_close(d.flatten(), (d_alpha / alpha * sigma ** 2 - sigma * d_sigma).expand_as(t))
    torch.testing.assert_close(minus_drift.flatten(), -(d_alpha / alpha).expand_as(t))


def test_path_end_points():
    t = torch.tensor([0.0, 1.0])
    for name in ("Linear", "GVP"):
        alpha, _ = PATHS[name]().compute_alpha_t(t)
        sigma, _ = PATHS[name]().compute_sigma_t(t)
        torch.testing.assert_close(alpha, torch.tensor([0.0, 1.0]), atol=1e-7, rtol=0)
        torch.testing.assert_close(sigma, torch.tensor([1.0, 0.0]), atol=1e-7, rtol=0)
    alpha, _ = PATHS["VP"]().compute_alpha_t(t)   # VP reaches alpha = exp(-5.05) at t = 0, 1 at t = 1
    torch.testing.assert_close(alpha, torch.tensor([math.exp(-0.25 * 19.9 - 0.05), 1.0]))


@pytest.mark.parametrize("name", PATHS)
def test_velocity_score_noise_conversions_agree(name):
    """On Gaussian data the exact velocity, score and noise are three views of one field."""
    path = PATHS[name]()
    x = torch.randn(5, 3, dtype=torch.float64)
    t = torch.linspace(0.1, 0.9, 5, dtype=torch.float64)
    v, s, eps = (oracle(path, prediction=p)(x, t) for p in ("velocity", "score", "noise"))
    torch.testing.assert_close(path.get_score_from_velocity(v, x, t), s)
    torch.testing.assert_close(path.get_velocity_from_score(s, x, t), v)
    torch.testing.assert_close(path.get_noise_from_velocity(v, x, t), eps)


def test_create_transport_defaults_are_sits():
    assert (create_transport("Linear").train_eps, create_transport("Linear").sample_eps) == (0, 0)
    assert (create_transport("GVP", "score").train_eps, create_transport("GVP", "score").sample_eps) == (1e-3, 1e-3)
    assert (create_transport("VP").train_eps, create_transport("VP").sample_eps) == (1e-5, 1e-3)
    assert create_transport("Linear", train_eps=0.1).train_eps == 0  # a velocity model on Linear needs none
    assert create_transport("VP", train_eps=0.01, sample_eps=0.02).sample_eps == 0.02
    assert create_transport("VP", train_eps=0.01).sample_eps == 1e-3  # SiT leaves None here and then crashes
    for bad in (dict(path_type="Cosine"), dict(prediction="x0"), dict(loss_weight="snr")):
        with pytest.raises(ValueError, match="choose"):
            create_transport(**bad)


# ------------------------------------------------------------------------------------------------------------
# Gaussian data: the exact field carries N(0, I) to N(mu, s^2 I)
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Linear", "GVP"])
@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_ode_with_the_exact_velocity_maps_noise_to_the_data(name, method):
    noise = torch.randn(64, 8, dtype=torch.float64)
    transport = create_transport(name)
    fn = Sampler(transport).sample_ode(sampling_method=method, num_steps=41, atol=1e-9, rtol=1e-9)
    x1 = fn(noise, oracle(transport.path_sampler))[-1]
    torch.testing.assert_close(x1, MU + S * noise, atol=1e-5, rtol=0)   # the flow of this field is affine


def test_reverse_ode_maps_the_data_back_to_its_noise():
    noise = torch.randn(16, 4, dtype=torch.float64)
    transport = create_transport()
    fn = Sampler(transport).sample_ode(sampling_method="dopri5", num_steps=2, atol=1e-9, rtol=1e-9, reverse=True)
    torch.testing.assert_close(fn(MU + S * noise, oracle(transport.path_sampler))[-1], noise, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prediction", ["score", "noise"])
def test_ode_of_score_and_noise_models(prediction):
    """Score and noise models start at t0 = sample_eps = 1e-3 (the drift is singular at 0): x1 = mu + s x0 up to that."""
    noise = torch.randn(64, 8, dtype=torch.float64)
    transport = create_transport("GVP", prediction)
    fn = Sampler(transport).sample_ode(sampling_method="rk4", num_steps=200)
    x1 = fn(noise, oracle(transport.path_sampler, prediction=prediction))[-1]
    torch.testing.assert_close(x1, MU + S * noise, atol=2e-2, rtol=0)


@pytest.mark.parametrize("method", ["Euler", "Heun"])
@pytest.mark.parametrize("form", ["sigma", "SBDM", "linear"])
def test_sde_with_the_exact_field_reaches_the_data_distribution(method, form):
    torch.manual_seed(0)
    transport = create_transport()
    fn = Sampler(transport).sample_sde(sampling_method=method, diffusion_form=form, num_steps=250)
    x1 = fn(torch.randn(20000, 4, dtype=torch.float64), oracle(transport.path_sampler))[-1]
    assert torch.isfinite(x1).all()
    # Monte-Carlo error of the mean ~ s / sqrt(80000) = 0.002; the step and last-step errors are of order 1e-2.
    assert abs(x1.mean().item() - MU) < 0.02
    assert abs(x1.std().item() - S) < 0.03


def test_sbdm_with_a_velocity_model_starts_after_t0():
    """SiT's SBDM SDE of a velocity model evaluates D(0) = inf; ours starts at SBDM_T0."""
    seen = []

    def model(x, t, y=None):
        seen.append(float(t[0]))
        return -x
    Sampler(create_transport()).sample_sde(diffusion_form="SBDM", num_steps=5)(torch.randn(2, 3), model)
    assert min(seen) == pytest.approx(SBDM_T0)


def test_sde_calls_the_network_once_per_drift_evaluation():
    calls = []

    def model(x, t, y=None):
        calls.append(1)
        return -x
    steps = 11
    Sampler(create_transport()).sample_sde(sampling_method="Euler", num_steps=steps)(torch.randn(2, 3), model)
    assert len(calls) == (steps - 1) + 1             # one per Euler-Maruyama step, one for the Mean last step
    calls.clear()
    Sampler(create_transport()).sample_sde(sampling_method="Heun", num_steps=steps)(torch.randn(2, 3), model)
    assert len(calls) == 2 * (steps - 1) + 1         # SiT: twice these


@pytest.mark.parametrize("name", ["Linear", "GVP", "VP"])
@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_likelihood_of_gaussian_data_is_the_closed_form(name, divergence):
    """log N(x; mu, s^2 I) of given data (Hutchinson's estimate is exact for this isotropic linear field)."""
    x = MU + S * torch.randn(6, 5, dtype=torch.float64)
    transport = create_transport(name)
    fn = Sampler(transport).sample_ode_likelihood(sampling_method="dopri5", num_steps=2, atol=1e-9, rtol=1e-9,
                                                  divergence=divergence)
    logp, z = fn(x, oracle(transport.path_sampler))
    gauss = lambda v, m, var: (-0.5 * math.log(2 * math.pi * var) - (v - m) ** 2 / (2 * var)).sum(1)
    expected = gauss(x, MU, S ** 2)
    # The prior N(0, I) is assumed at the solver's end, model time 1 - t1 (VP: 1e-3, where x_t is not quite N(0, I):
    # alpha = 0.0065). The map itself is exact, so the estimate is off by exactly log N(z; 0, I) - log p_end(z).
    t_end = torch.tensor([1.0 - transport.check_interval(0, transport.sample_eps, eval=True)[1]], dtype=torch.float64)
    alpha, sigma = transport.path_sampler.compute_alpha_t(t_end)[0], transport.path_sampler.compute_sigma_t(t_end)[0]
    expected = expected + gauss(z, 0.0, 1.0) - gauss(z, alpha * MU, alpha ** 2 * S ** 2 + sigma ** 2)
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=0)


def test_bits_per_dim_of_uniform_data_is_8():
    """A uniform density on [-1, 1]^D (log p = -D log 2) is 8 bits per 8-bit value."""
    d = 64
    assert bits_per_dim(torch.tensor(-d * math.log(2.0)), d).item() == pytest.approx(8.0)


# ------------------------------------------------------------------------------------------------------------
# Time sampling, time shift, network time scale
# ------------------------------------------------------------------------------------------------------------

def test_logit_normal_time_moments():
    objective = build_objective(dict(objective="flow", time_sampling="logit_normal", time_mean=0.5, time_std=0.8))
    t, noise = objective.draw(torch.Generator().manual_seed(0), 200_000, (1,), "cpu")
    logit = torch.log(t / (1 - t)).double()
    assert abs(logit.mean().item() - 0.5) < 0.01 and abs(logit.std().item() - 0.8) < 0.01
    density = lambda u, k: u ** k * np.exp(-(np.log(u / (1 - u)) - 0.5) ** 2 / (2 * 0.64)) / (
        0.8 * np.sqrt(2 * np.pi) * u * (1 - u))
    mean = integrate.quad(lambda u: density(u, 1), 0, 1)[0]
    var = integrate.quad(lambda u: density(u, 2), 0, 1)[0] - mean ** 2
    assert t.double().mean().item() == pytest.approx(mean, abs=2e-3)
    assert t.double().var().item() == pytest.approx(var, rel=2e-2)
    assert mean == pytest.approx(float(np.mean(expit(np.random.default_rng(0).normal(0.5, 0.8, 10 ** 6)))), abs=2e-3)
    assert noise.shape == (200_000, 1)


def test_uniform_time_stays_inside_the_training_interval():
    objective = build_objective(dict(objective="flow", prediction="noise"))  # train_eps 1e-3
    t, _ = objective.draw(torch.Generator().manual_seed(0), 10_000, (1,), "cpu")
    assert t.min() >= 1e-3 and t.max() <= 1 - 1e-3 and abs(t.mean().item() - 0.5) < 0.01


def test_draws_depend_only_on_the_generator():
    objective = build_objective(dict(objective="flow", time_sampling="logit_normal"))
    a = objective.draw(torch.Generator().manual_seed(3), 8, (1, 2, 2), "cpu")
    torch.manual_seed(123)  # the global RNG plays no part
    b = objective.draw(torch.Generator().manual_seed(3), 8, (1, 2, 2), "cpu")
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_time_shift_is_lightningdits_and_sd3s():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    shifted = shift_time(t, 0.3)
    assert shifted[0] == 0 and shifted[-1] == pytest.approx(1) and (shifted <= t + 1e-12).all()
    a = 1 / 0.3  # SD3's shift on sigma = 1 - t
    sigma = 1 - t
    torch.testing.assert_close(1 - shifted, a * sigma / (1 + (a - 1) * sigma))
    assert shift_time(t, 1.0) is t
    with pytest.raises(ValueError, match="positive"):
        shift_time(t, 0)


def test_time_scale_multiplies_the_network_time():
    seen = []
    objective = build_objective(dict(objective="flow", time_scale=1000))
    objective.losses(lambda x, t, y: seen.append(t) or torch.zeros_like(x), torch.zeros(2, 1, 2, 2),
                     torch.tensor([0.25, 0.5]), torch.randn(2, 1, 2, 2), dict(y=torch.zeros(2, dtype=torch.long)))
    torch.testing.assert_close(seen[0], torch.tensor([250.0, 500.0]))


def test_cosine_loss_is_lightningdits():
    objective = build_objective(dict(objective="flow", cosine_loss=True))
    x, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.rand(3)
    pred = torch.randn(3, 4, 2, 2)
    terms = objective.losses(lambda *a, **k: pred, x, t, noise, {})
    target = x - noise
    cos = (pred * target).sum(1) / (pred.norm(dim=1) * target.norm(dim=1))
    torch.testing.assert_close(terms["cos"], (1 - cos).mean((1, 2)))
    torch.testing.assert_close(terms["mse"], ((pred - target) ** 2).mean((1, 2, 3)))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["cos"])
    with pytest.raises(ValueError, match="prediction=velocity"):
        build_objective(dict(objective="flow", prediction="noise", cosine_loss=True))
    with pytest.raises(ValueError, match="with one channel it is the sign"):
        objective.losses(lambda *a, **k: pred[:, :1], x[:, :1], t, noise[:, :1], {})


def test_unknown_objective_keys_and_values_are_named():
    with pytest.raises(ValueError, match="valid keys"):
        build_objective(dict(objective="flow", learn_sigma=True))
    with pytest.raises(ValueError, match="time_sampling"):
        build_objective(dict(objective="flow", time_sampling="cosmap"))
    with pytest.raises(ValueError, match="objective"):
        build_objective(dict(objective="edm"))


# ------------------------------------------------------------------------------------------------------------
# Guidance interval and sampler dispatch
# ------------------------------------------------------------------------------------------------------------

def test_guidance_interval_guides_inside_only():
    batches = []

    def model(x, t, y):
        batches.append(len(x))
        return torch.where(y.view(-1, 1) == 10, torch.zeros_like(x), torch.ones_like(x))
    guided = classifier_free_guidance(model, 3.0, null_class=10, interval=(0.3, 0.7))
    x, y = torch.zeros(2, 1), torch.tensor([1, 2])
    for time, expected, batch in ((0.2, 1.0, 2), (0.3, 3.0, 4), (0.5, 3.0, 4), (0.7, 3.0, 4), (0.9, 1.0, 2)):
        batches.clear()
        out = guided(x, torch.full((2,), time), y)
        assert torch.all(out == expected), time        # cond alone = 1; guided = 0 + 3 (1 - 0) = 3
        assert batches == [batch], "outside the interval the unconditional pass must be skipped"
    mixed = guided(x, torch.tensor([0.1, 0.5]), y)     # per-sample times: each sample its own rule
    assert mixed.flatten().tolist() == [1.0, 3.0]


def test_sampler_must_fit_the_objective():
    with pytest.raises(ValueError, match="does not fit a model trained with diffusion.objective=flow"):
        resolve_sampler({"objective": "flow"}, "ddim")
    with pytest.raises(ValueError, match="probability-flow ODE"):
        resolve_sampler({}, "ode")
    with pytest.raises(ValueError, match="unknown sampler"):
        resolve_sampler({}, "euler")
    assert resolve_sampler({"objective": "flow"}, "auto") == ("ode", 50)
    assert resolve_sampler({}, None) == ("ddpm", 250)
    assert resolve_sampler({"objective": "flow"}, "sde", 30) == ("sde", 30)


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_sample_dispatches_flows_with_guidance_and_clipping(sampler):
    def model(x, t, y):
        return torch.where(y.view(-1, 1, 1, 1) == 10, torch.zeros_like(x), torch.full_like(x, 2.0))
    noise = torch.zeros(3, 1, 2, 2)
    kw = dict(null_class=10, sampler=sampler, steps=11, diffusion_kwargs={"objective": "flow"},
              sde=dict(diffusion_form="linear"))
    torch.manual_seed(0)
    plain = sample(model, noise, torch.tensor([1, 2, 3]), **kw)
    torch.manual_seed(0)
    guided = sample(model, noise, torch.tensor([1, 2, 3]), cfg_scale=2.0, **kw)
    clipped = sample(model, noise, torch.tensor([1, 2, 3]), cfg_scale=2.0, clip_denoised=True, **kw)
    if sampler == "ode":  # dx/dt = 2 (or 4 guided) from 0 over [0, 1]
        torch.testing.assert_close(plain, torch.full_like(noise, 2.0))
        torch.testing.assert_close(guided, torch.full_like(noise, 4.0))
    assert clipped.max() <= 1 and guided.max() > 1
