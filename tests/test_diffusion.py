"""Gaussian diffusion core: schedules, forward process, posterior, likelihood terms, samplers, guidance, losses.

Closed forms are recomputed here in float64 numpy / scipy, independently of diffusion/.
"""

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.stats import norm

from diffusion import (GaussianDiffusion, classifier_free_guidance, create_diffusion, get_named_beta_schedule,
                       space_timesteps)
from diffusion.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl

T = 1000


def ddpm_linear_alphas_cumprod(num_steps=T):
    """DDPM Sec. 4: beta linear from 1e-4 to 0.02 over 1000 steps; alpha_bar_t = prod_{s<=t} (1 - beta_s)."""
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, num_steps))


def toy_model(learn_sigma=True):
    """A deterministic model(x, t, y) that depends on all three inputs; v in (-1, 1) with a learned sigma."""
    def model(x, t, y):
        s, c = t.float().view(-1, 1, 1, 1) / T, y.float().view(-1, 1, 1, 1)
        eps = torch.sin(x + s) * (1 + 0.1 * c)
        return torch.cat([eps, torch.tanh(x - c / 10)], dim=1) if learn_sigma else eps
    return model


# ------------------------------------------------------------------------------------------------------------
# Schedules and respacing
# ------------------------------------------------------------------------------------------------------------

def test_linear_schedule_is_ddpm():
    betas = get_named_beta_schedule("linear", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert betas[0] == pytest.approx(1e-4, rel=1e-12) and betas[-1] == pytest.approx(0.02, rel=1e-12)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / (T - 1), rtol=1e-9)
    # Other step counts scale the endpoints by 1000 / T, so the process covers the same noise levels.
    betas_250 = get_named_beta_schedule("linear", 250)
    assert betas_250[0] == pytest.approx(4e-4) and betas_250[-1] == pytest.approx(0.08)


@pytest.mark.parametrize("name", ["cosine", "squaredcos_cap_v2"])
def test_cosine_schedule_is_improved_ddpm_eq_17(name):
    # alpha_bar_t = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008; our index i is step t = i + 1.
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = get_named_beta_schedule(name, T)
    alphas_cumprod = np.cumprod(1 - betas)
    expected = np.array([f(i + 1) / f(0) for i in range(T)])
    # beta is clipped at 0.999 near t = T (improved DDPM Sec. 3.2); that happens only at the last step here.
    assert (betas[:-1] < 0.999).all() and betas[-1] == 0.999
    assert np.allclose(alphas_cumprod[:-1], expected[:-1], rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("num_steps", [1000, 100])
def test_alphas_cumprod_decreases_inside_0_1(name, num_steps):
    alphas_cumprod = GaussianDiffusion(betas=get_named_beta_schedule(name, num_steps)).alphas_cumprod
    assert ((alphas_cumprod > 0) & (alphas_cumprod < 1)).all()
    assert (np.diff(alphas_cumprod) < 0).all()


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        get_named_beta_schedule("quadratic", T)


def test_space_timesteps_even():
    kept = sorted(space_timesteps(T, "250"))
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == T - 1
    stride = (T - 1) / 249
    assert set(np.diff(kept)) <= {math.floor(stride), math.ceil(stride)}
    assert space_timesteps(T, 250) == space_timesteps(T, "250") == space_timesteps(T, [250])
    assert space_timesteps(T, "1000") == set(range(T))


def test_space_timesteps_ddim_stride():
    assert space_timesteps(T, "ddim50") == set(range(0, T, 20))
    assert space_timesteps(T, "ddim25") == set(range(0, T, 40))


def test_space_timesteps_sections():
    # 1000 steps in three sections of 334, 333, 333 (the remainder goes to the first); 10 steps from each,
    # evenly spaced from the section's first step to its last.
    kept = sorted(space_timesteps(T, "10,10,10"))
    assert len(kept) == 30
    for section, (first, last) in enumerate([(0, 333), (334, 666), (667, 999)]):
        steps = kept[10 * section:10 * (section + 1)]
        assert steps[0] == first and steps[-1] == last
        assert all(first <= s <= last for s in steps)


@pytest.mark.parametrize("spec", ["ddim999", "2000", "10,10,400"])
def test_space_timesteps_errors(spec):
    # No integer stride gives 999 steps; 2000 > 1000 steps; a 333-step section cannot give 400.
    with pytest.raises(ValueError):
        space_timesteps(T, spec)


@pytest.mark.parametrize("spec", ["25", "250", "ddim50", "10,10,10"])
def test_respacing_keeps_alpha_bar_at_the_kept_steps(spec):
    # improved DDPM Sec. 4.2: beta_i = 1 - alpha_bar_{k_i} / alpha_bar_{k_{i-1}}, so alpha_bar is unchanged.
    respaced = create_diffusion(spec)
    kept = sorted(space_timesteps(T, spec))
    assert list(respaced.timestep_map) == kept and respaced.num_timesteps == len(kept)
    assert np.allclose(respaced.alphas_cumprod, ddpm_linear_alphas_cumprod()[kept], rtol=1e-12, atol=0)


@pytest.mark.parametrize("spec", [None, ""])
def test_no_respacing_is_the_full_process(spec):
    diffusion = create_diffusion(spec)
    assert diffusion.num_timesteps == T and list(diffusion.timestep_map) == list(range(T))
    assert np.allclose(diffusion.alphas_cumprod, ddpm_linear_alphas_cumprod(), rtol=1e-12, atol=0)


def test_invalid_diffusion_types_are_errors():
    with pytest.raises(ValueError):
        GaussianDiffusion(betas=get_named_beta_schedule("linear", 10), model_var_type="learned")


# ------------------------------------------------------------------------------------------------------------
# Forward process and posterior
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_q_sample_moments(t):
    # DDPM eq. 4: x_t ~ N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I). n draws per value of x0; bounds are
    # 5 standard errors of the sample mean (sd / sqrt(n)) and variance (var * sqrt(2 / (n - 1))).
    diffusion, n = create_diffusion(""), 20000
    alpha_bar = ddpm_linear_alphas_cumprod()[t]
    x0 = torch.linspace(-1, 1, 8).repeat(n, 1)  # (n, 8)
    torch.manual_seed(0)
    x_t = diffusion.q_sample(x0, torch.full((n,), t)).double()
    mean, var = x_t.mean(0), x_t.var(0)
    expected_mean, expected_var = math.sqrt(alpha_bar) * x0[0].double(), 1 - alpha_bar
    assert (mean - expected_mean).abs().max() < 5 * math.sqrt(expected_var / n)
    assert (var - expected_var).abs().max() < 5 * expected_var * math.sqrt(2 / (n - 1))
    q_mean, q_var, q_log_var = diffusion.q_mean_variance(x0[:2], torch.full((2,), t))
    assert torch.allclose(q_mean[0].double(), expected_mean, rtol=1e-6, atol=1e-7)
    assert q_var[0, 0].item() == pytest.approx(expected_var, rel=1e-6)
    assert q_log_var[0, 0].item() == pytest.approx(math.log(expected_var), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("spec", ["", "ddim50"])
def test_posterior_is_ddpm_eq_6_7(spec):
    diffusion = create_diffusion(spec)
    # Independent float64 closed form for this (possibly respaced) process.
    alphas_cumprod = ddpm_linear_alphas_cumprod()[sorted(space_timesteps(T, spec or "1000"))]
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    betas = 1 - alphas_cumprod / alphas_cumprod_prev
    # DDPM eq. 7: beta_tilde = (1 - abar_{t-1}) / (1 - abar_t) beta_t; mean = c1 x0 + c2 x_t.
    beta_tilde = (1 - alphas_cumprod_prev) / (1 - alphas_cumprod) * betas
    c1 = np.sqrt(alphas_cumprod_prev) * betas / (1 - alphas_cumprod)
    c2 = np.sqrt(1 - betas) * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
    # Check the test's own algebra: eq. 7 is Bayes' rule for q(x_{t-1}|x0) q(x_t|x_{t-1}) (precisions add).
    i = np.arange(1, len(betas))
    bayes_var = 1 / (1 / (1 - alphas_cumprod_prev[i]) + (1 - betas[i]) / betas[i])
    assert np.allclose(beta_tilde[i], bayes_var, rtol=1e-10)
    assert np.allclose(c1[i], bayes_var * np.sqrt(alphas_cumprod_prev[i]) / (1 - alphas_cumprod_prev[i]), rtol=1e-10)
    assert np.allclose(c2[i], bayes_var * np.sqrt(1 - betas[i]) / betas[i], rtol=1e-10)

    n = diffusion.num_timesteps
    t = torch.tensor([0, 1, 2, n // 2, n - 1])
    g = torch.Generator().manual_seed(0)
    x0, x_t = torch.rand(5, 3, 4, 4, generator=g) * 2 - 1, torch.randn(5, 3, 4, 4, generator=g)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t, t)
    k = t.numpy()[:, None, None, None]
    expected_mean = c1[k] * x0.double().numpy() + c2[k] * x_t.double().numpy()
    np.testing.assert_allclose(mean.double().numpy(), expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var.double().numpy(), np.broadcast_to(beta_tilde[k], x0.shape), rtol=1e-6, atol=0)
    # beta_tilde_0 = 0: its log is clipped to log beta_tilde_1.
    expected_log = np.log(np.where(k == 0, beta_tilde[1], beta_tilde[k]))
    np.testing.assert_allclose(log_var.double().numpy(), np.broadcast_to(expected_log, x0.shape), rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Likelihood terms
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m1, lv1, m2, lv2", [(0.0, 0.0, 0.0, 0.0), (0.3, -1.0, -0.5, 0.4), (2.0, 0.5, 0.0, -0.7),
                                              (-1.2, -6.0, -1.0, -5.5)])
def test_normal_kl_against_numerical_integration(m1, lv1, m2, lv2):
    # KL(p || q) = integral of p (log p - log q), by adaptive quadrature over +-12 sd of p (the rest is < 1e-30).
    p, q = norm(m1, math.exp(lv1 / 2)), norm(m2, math.exp(lv2 / 2))
    sd = math.exp(lv1 / 2)
    kl, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), m1 - 12 * sd, m1 + 12 * sd,
                           epsabs=1e-12, epsrel=1e-10, limit=200)
    args = [torch.tensor([v], dtype=torch.float64) for v in (m1, lv1, m2, lv2)]
    assert normal_kl(*args).item() == pytest.approx(kl, rel=1e-8, abs=1e-12)
    # fp32 arithmetic (what training uses) agrees to float precision.
    assert normal_kl(*(a.float() for a in args)).item() == pytest.approx(kl, rel=1e-5, abs=1e-6)


def test_normal_kl_broadcasts_scalars():
    mean, logvar = torch.tensor([0.5, -1.0]), torch.tensor([0.2, -0.3])
    assert torch.allclose(normal_kl(mean, logvar, 0.0, 0.0), normal_kl(mean, logvar, torch.zeros(2), torch.zeros(2)))


def _exact_bin_probability(x, mean, sd):
    """P of the quantisation bin of x under N(mean, sd^2), with exact normal CDFs; the end levels own the tails."""
    upper, lower = (x + 1 / 255 - mean) / sd, (x - 1 / 255 - mean) / sd
    return np.where(x < -0.999, norm.cdf(upper), np.where(x > 0.999, norm.sf(lower), norm.cdf(upper) - norm.cdf(lower)))


def test_discretized_gaussian_log_likelihood_against_scipy():
    # The code uses DDPM's tanh approximation of the normal CDF, so it cannot match scipy to float precision.
    # Its largest error, measured here on a dense grid, bounds the error of a bin probability (a difference of
    # two CDFs) by twice that; in log space the error is that bound divided by the probability.
    grid = torch.linspace(-10, 10, 200001, dtype=torch.float64)
    cdf_error = (approx_standard_normal_cdf(grid).numpy() - norm.cdf(grid.numpy())).__abs__().max()
    assert cdf_error < 3e-4  # the documented accuracy of the approximation (it is about 1.8e-4)
    bound = 2 * cdf_error + 1e-12

    rng = np.random.default_rng(0)
    levels = np.arange(256) / 127.5 - 1  # the 256 values of uint8 data mapped to [-1, 1]
    x = np.concatenate([levels, levels[rng.integers(0, 256, 744)]])
    log_scales = rng.uniform(math.log(0.002), math.log(0.5), x.shape)
    means = x + np.exp(log_scales) * rng.normal(0, 2, x.shape)  # a few sd away: bulk and tails of each normal
    as_tensor = lambda a: torch.from_numpy(a)
    log_p = discretized_gaussian_log_likelihood(as_tensor(x), means=as_tensor(means), log_scales=as_tensor(log_scales))
    exact = _exact_bin_probability(x, means, np.exp(log_scales))
    assert np.abs(np.exp(log_p.numpy()) - exact).max() <= bound
    large = exact > 0.05  # log-space comparison where the probability is not tiny
    assert large.sum() > 300
    assert (np.abs(log_p.numpy() - np.log(exact))[large] <= bound / exact[large] * 1.01).all()


def test_discretized_gaussian_is_normalised_over_the_256_levels():
    # Adjacent bins share their edges, so the probabilities telescope to exactly 1 (CDF approximation or not).
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in [(0.0, -2.0), (0.7, -4.0), (-0.95, -1.0), (0.2, 0.5)]:
        log_p = discretized_gaussian_log_likelihood(levels, means=torch.full_like(levels, mean),
                                                    log_scales=torch.full_like(levels, log_scale))
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_gaussian_tails_at_the_end_levels():
    # A mean far outside [-1, 1] puts all the mass in an end level's tail: log p = 0 there.
    x = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    log_p = discretized_gaussian_log_likelihood(x, means=torch.tensor([-3.0, 3.0], dtype=torch.float64),
                                                log_scales=torch.full((2,), math.log(0.1), dtype=torch.float64))
    assert torch.allclose(log_p, torch.zeros(2, dtype=torch.float64), atol=1e-9)


# ------------------------------------------------------------------------------------------------------------
# Samplers
# ------------------------------------------------------------------------------------------------------------

def oracle_eps_model(x0, seen=None):
    """The exact eps of x_t for a known x0, eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), with abar of the
    ORIGINAL 1000-step process indexed by the timestep the model receives (records them in `seen`)."""
    alphas_cumprod = torch.from_numpy(ddpm_linear_alphas_cumprod())

    def model(x_t, t, y=None):
        if seen is not None:
            seen.append(int(t[0]))
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        return ((x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).float()
    return model


@pytest.mark.parametrize("spec", ["", "ddim25", "50", "5,5"])
def test_ddim_eta_0_with_the_oracle_recovers_x0(spec):
    # DDIM eq. 12 with the true eps keeps x_t on the same noise path, so it lands exactly on x0; and the model
    # must be called with the original timesteps, from the last kept one down to 0.
    diffusion = create_diffusion(spec, learn_sigma=False)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 4, 4, generator=g) * 1.8 - 0.9
    seen = []
    sample = diffusion.ddim_sample_loop(oracle_eps_model(x0, seen), (2, 3, 4, 4),
                                        noise=torch.randn(2, 3, 4, 4, generator=g), eta=0.0)
    assert seen == sorted(space_timesteps(T, spec or "1000"), reverse=True)
    assert (sample - x0).abs().max() < 1e-4


@pytest.mark.parametrize("spec", ["ddim25", "5,5"])
def test_ancestral_sampling_with_the_oracle_recovers_x0(spec):
    # At t = 0 the posterior mean is x0 itself (coef1 = 1, coef2 = 0) and no noise is added.
    diffusion = create_diffusion(spec, learn_sigma=False)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 3, 4, 4, generator=g) * 1.8 - 0.9
    torch.manual_seed(0)
    sample = diffusion.p_sample_loop(oracle_eps_model(x0), (2, 3, 4, 4), device="cpu")
    assert (sample - x0).abs().max() < 1e-4


def test_ddim_eta_positive_is_stochastic_and_eta_0_is_not():
    diffusion, model = create_diffusion("ddim10"), toy_model()
    kwargs = dict(noise=torch.randn(2, 2, 4, 4), model_kwargs=dict(y=torch.tensor([1, 2])))
    run = lambda seed, eta: (torch.manual_seed(seed), diffusion.ddim_sample_loop(model, (2, 2, 4, 4), eta=eta,
                                                                                   **kwargs))[1]
    assert torch.equal(run(0, 0.0), run(1, 0.0))
    assert torch.equal(run(0, 1.0), run(0, 1.0)) and not torch.allclose(run(0, 1.0), run(1, 1.0))


# ------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ------------------------------------------------------------------------------------------------------------

def _guidance_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 4, 4, generator=g), torch.tensor([5, 500, 900]), torch.tensor([0, 3, 7])


@pytest.mark.parametrize("scale", [1.5, 4.0])
def test_guidance_equals_two_separate_passes_on_all_channels(scale):
    model, null = toy_model(), 10
    x, t, y = _guidance_inputs()
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, null))
    guided = classifier_free_guidance(model, scale, null)(x, t, y)
    # Ho & Salimans eq. 6 on the whole eps (4 channels); the variance half comes from the conditional pass.
    assert torch.allclose(guided[:, :4], uncond[:, :4] + scale * (cond[:, :4] - uncond[:, :4]), atol=1e-6)
    assert torch.equal(guided[:, 4:], cond[:, 4:])


def test_guidance_cfg_channels_3_is_the_official_formula():
    # Official DiT forward_with_cfg: eps = model_out[:, :3] guided, rest = model_out[:, 3:] from the cond half.
    model, null, scale = toy_model(), 10, 4.0
    x, t, y = _guidance_inputs()
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, null))
    official = torch.cat([uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)
    ours = classifier_free_guidance(model, scale, null, cfg_channels=3)(x, t, y)
    assert torch.allclose(ours, official, atol=1e-6)
    assert not torch.allclose(ours, classifier_free_guidance(model, scale, null)(x, t, y))


def test_guidance_runs_one_batch_and_scale_1_is_the_model():
    calls, model = [], toy_model()
    counting = lambda x, t, y: (calls.append(len(x)), model(x, t, y))[1]
    x, t, y = _guidance_inputs()
    classifier_free_guidance(counting, 2.0, 10)(x, t, y)
    assert calls == [6]
    assert classifier_free_guidance(model, 1.0, 10) is model


# ------------------------------------------------------------------------------------------------------------
# Training losses
# ------------------------------------------------------------------------------------------------------------

def _loss_inputs(n=4, c=3):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (n, c, 4, 4), generator=g).float() / 127.5 - 1
    return x0, torch.randn(n, c, 4, 4, generator=g), torch.tensor([0, 1, 400, 999][:n])


def test_hybrid_loss_is_mse_plus_vb():
    diffusion, model = create_diffusion(""), toy_model()
    x0, noise, t = _loss_inputs()
    y = torch.tensor([1, 2, 3, 4])
    terms = diffusion.training_losses(model, x0, t, dict(y=y), noise=noise)
    assert set(terms) == {"loss", "mse", "vb"}
    assert all(v.shape == (4,) and torch.isfinite(v).all() for v in terms.values())
    assert torch.equal(terms["loss"], terms["mse"] + terms["vb"])
    # DDPM eq. 14: the simple loss on eps, for the eps the model predicts at x_t.
    x_t = diffusion.q_sample(x0, t, noise=noise)
    eps = model(x_t, t, y)[:, :3]
    assert torch.allclose(terms["mse"], ((noise - eps) ** 2).mean(dim=(1, 2, 3)))


def test_vb_term_trains_only_the_variance():
    # improved DDPM Sec. 3.1: L_hybrid = L_simple + lambda L_vlb with a stop-gradient on the mean in L_vlb.
    diffusion = create_diffusion("")
    x0, noise, t = _loss_inputs()
    output = torch.randn(4, 6, 4, 4, requires_grad=True)
    terms = diffusion.training_losses(lambda x, t: torch.cat([output[:, :3], output[:, 3:].tanh()], 1), x0, t,
                                      noise=noise)
    vb_grad, = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    assert torch.equal(vb_grad[:, :3], torch.zeros_like(vb_grad[:, :3]))
    assert vb_grad[:, 3:].abs().sum() > 0
    mse_grad, = torch.autograd.grad(terms["mse"].sum(), output)
    assert mse_grad[:, :3].abs().sum() > 0 and torch.equal(mse_grad[:, 3:], torch.zeros_like(mse_grad[:, 3:]))


def test_vb_term_with_the_true_posterior():
    # With the exact eps and v = -1 (variance beta_tilde) the model's p(x_{t-1}|x_t) IS the posterior, so the
    # KL terms (t > 0) vanish; at t = 0 the term is the decoder NLL of x0 under N(x0, beta_tilde_1) in bits
    # (DDPM eq. 13), checked against exact normal CDFs within the tanh approximation's error (see above).
    diffusion = create_diffusion("")
    x0, noise, t = _loss_inputs()
    terms = diffusion.training_losses(lambda x, t: torch.cat([noise, -torch.ones_like(noise)], 1), x0, t, noise=noise)
    assert terms["vb"][1:].abs().max() < 1e-6
    alphas_cumprod = ddpm_linear_alphas_cumprod()
    beta_tilde_1 = (1 - alphas_cumprod[0]) / (1 - alphas_cumprod[1]) * (1 - alphas_cumprod[1] / alphas_cumprod[0])
    x = x0[0].double().numpy()
    nll_bits = -np.log(_exact_bin_probability(x, x, math.sqrt(beta_tilde_1))).mean() / math.log(2)
    assert terms["vb"][0].item() == pytest.approx(nll_bits, rel=2e-3)


def test_fixed_variance_has_no_vb_term():
    diffusion = create_diffusion("", learn_sigma=False)
    x0, noise, t = _loss_inputs()
    terms = diffusion.training_losses(toy_model(learn_sigma=False), x0, t, dict(y=torch.zeros(4)), noise=noise)
    assert set(terms) == {"loss", "mse"} and torch.equal(terms["loss"], terms["mse"])


def test_predict_xstart_regresses_x0():
    diffusion = create_diffusion("", predict_xstart=True, learn_sigma=False)
    x0, noise, t = _loss_inputs()
    terms = diffusion.training_losses(lambda x, t: torch.zeros_like(x), x0, t, noise=noise)
    assert torch.allclose(terms["mse"], (x0 ** 2).mean(dim=(1, 2, 3)))


def test_rescaled_losses():
    # use_kl: the bound alone, times T (an estimate of the whole bound); rescale_learned_sigmas: vb times T / 1000.
    x0, noise, t = _loss_inputs(n=3)
    t = t.clamp(max=24)
    model, kw = toy_model(), dict(model_kwargs=dict(y=torch.tensor([1, 2, 3])), noise=noise)
    hybrid = create_diffusion("25").training_losses(model, x0, t, **kw)
    kl = create_diffusion("25", use_kl=True).training_losses(model, x0, t, **kw)
    rescaled = create_diffusion("25", rescale_learned_sigmas=True).training_losses(model, x0, t, **kw)
    assert set(kl) == {"loss"}
    assert torch.allclose(kl["loss"], hybrid["vb"] * 25)
    assert torch.allclose(rescaled["vb"], hybrid["vb"] * 25 / 1000)
    assert torch.equal(rescaled["mse"], hybrid["mse"])


def test_table_lookups_copy_each_table_to_a_device_once():
    diffusion = create_diffusion("")
    x0, noise = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    t = torch.tensor([0, 10, 500, 999])
    first = diffusion.q_sample(x0, t, noise)
    cached = len(diffusion._device_tables)
    assert cached == 2                                    # sqrt(alpha_bar), sqrt(1 - alpha_bar)
    again = diffusion.q_sample(x0, t, noise)
    assert len(diffusion._device_tables) == cached and torch.equal(first, again)
    abar = torch.from_numpy(diffusion.alphas_cumprod)[t].view(-1, 1, 1, 1)
    expected = (abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()).float()
    torch.testing.assert_close(first, expected, rtol=1e-6, atol=1e-6)


def test_one_step_process_builds_and_one_step_respacing_is_refused():
    one = GaussianDiffusion(betas=[0.5])                   # a single-step process is well defined
    x0, noise = torch.full((2, 1, 2, 2), 0.3), torch.randn(2, 1, 2, 2)
    t = torch.zeros(2, dtype=torch.long)
    x_t = one.q_sample(x0, t, noise)
    eps_model = lambda x, t_, **_: torch.cat([noise, torch.zeros_like(noise)], dim=1)  # exact eps, mid variance
    out = one.p_mean_variance(eps_model, x_t, t, clip_denoised=False)
    torch.testing.assert_close(out["pred_xstart"], x0)
    assert torch.isfinite(one.training_losses(eps_model, x0, t, noise=noise)["loss"]).all()
    for spec in ("1", 1):
        with pytest.raises(ValueError, match="keeps only t=0"):
            create_diffusion(spec)
