"""x-prediction (JiT, Li & He 2025, 2511.13720): `diffusion.prediction=x` against closed forms and the official code.

On Gaussian data x1 ~ N(mu, s^2 I) the exact x-predictor is the posterior mean E[x1 | x_t] = mu + alpha s^2 / var
(x - alpha mu), var = alpha^2 s^2 + sigma^2, and the velocity, score and noise it implies are the exact ones
(tests/test_transport.py's oracle). The official references are tests/data/jit_reference.pt, made by
tests/reference/make_jit_reference.py from an LTH14/JiT checkout; with JIT_OFFICIAL_PATH set, it is also run live.
"""

import os
from pathlib import Path

import pytest
import torch

from conftest import load_reference_script
from diffusion import Sampler, build_objective, create_transport
from diffusion.losses import mean_flat
from diffusion.paths import PATHS
from diffusion.sampling import sample
from diffusion.transport import JIT_T_EPS, ModelType
from test_transport import MU, S, oracle

REFERENCE = Path(__file__).parent / "data" / "jit_reference.pt"
gen = load_reference_script("make_jit_reference")


def x_oracle(path, mu=MU, s=S):
    """The exact x-prediction network E[x1 | x_t] for data N(mu, s^2 I) on `path`."""
    def model(x, t, y=None):
        tt = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        alpha, sigma = path.compute_alpha_t(tt)[0], path.compute_sigma_t(tt)[0]
        return mu + alpha * s ** 2 / (alpha ** 2 * s ** 2 + sigma ** 2) * (x - alpha * mu)
    return model


def times_above_floor(path, t_eps=JIT_T_EPS):
    """Times in (0, 1) where sigma_t >= t_eps, so the floor is inactive."""
    t = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)
    return t[path.compute_sigma_t(t)[0] >= t_eps]


# ------------------------------------------------------------------------------------------------------------
# Conversions x_hat <-> v <-> score <-> noise
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PATHS)
def test_exact_x_predictor_gives_the_exact_velocity_score_and_noise(name):
    transport = create_transport(name, "x")
    path = transport.path_sampler
    t = times_above_floor(path)
    x = torch.randn(len(t), 3, dtype=torch.float64)
    x_hat = x_oracle(path)(x, t)
    v, s, eps = (oracle(path, prediction=p)(x, t) for p in ("velocity", "score", "noise"))
    torch.testing.assert_close(transport.velocity_from_data(x_hat, x, t), v)
    v_out, s_out = transport.velocity_and_score(x_hat, x, t)      # what the samplers integrate
    torch.testing.assert_close(v_out, v)
    torch.testing.assert_close(s_out, s)
    torch.testing.assert_close(path.get_noise_from_velocity(v_out, x, t), eps)
    # ... and back: Tweedie's x_hat = (x + sigma^2 s) / alpha = (x - sigma eps) / alpha.
    tt = t.view(-1, 1)
    alpha, sigma = path.compute_alpha_t(tt)[0], path.compute_sigma_t(tt)[0]
    torch.testing.assert_close((x + sigma ** 2 * s) / alpha, x_hat)
    torch.testing.assert_close((x - sigma * eps) / alpha, x_hat)


def test_linear_conversion_is_jits_with_its_floor():
    """Linear: v = (x_hat - x) / max(1 - t, t_eps) at every t, the data end included (finite there); the inverse
    where the floor is inactive is x_hat = x + (1 - t) v."""
    transport = create_transport("Linear", "x")
    t = torch.tensor([0.0, 0.3, 0.9, 0.95, 0.97, 1.0], dtype=torch.float64)
    x, x_hat = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    v = transport.velocity_from_data(x_hat, x, t)
    torch.testing.assert_close(v, (x_hat - x) / (1 - t).clamp_min(0.05).view(-1, 1))
    assert torch.isfinite(v).all()
    torch.testing.assert_close(x[:4] + (1 - t[:4]).view(-1, 1) * v[:4], x_hat[:4])
    small = create_transport("Linear", "x", t_eps=1e-3)
    torch.testing.assert_close(small.velocity_from_data(x_hat, x, t)[4], (x_hat[4] - x[4]) / 0.03)


def test_gvp_conversion_closed_form():
    """GVP: v = pi/2 (x_hat - sin(pi t / 2) x) / max(cos(pi t / 2), t_eps)."""
    transport = create_transport("GVP", "x")
    t = torch.tensor([0.0, 0.5, 0.99, 1.0], dtype=torch.float64)
    x, x_hat = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    half = torch.pi / 2 * t.view(-1, 1)
    torch.testing.assert_close(transport.velocity_from_data(x_hat, x, t),
                               torch.pi / 2 * (x_hat - torch.sin(half) * x) / torch.cos(half).clamp_min(0.05))


def test_create_transport_for_x_prediction():
    for name in ("Linear", "GVP"):   # treated as a velocity model: all of [0, 1], as JiT trains and samples
        transport = create_transport(name, "x")
        assert transport.model_type == ModelType.DATA
        assert (transport.train_eps, transport.sample_eps, transport.t_eps) == (0, 0, JIT_T_EPS)
        assert transport.check_interval(0, 0) == (0, 1) and transport.check_interval(0, 0, eval=True) == (0, 1)
    vp = create_transport("VP", "x")
    assert (vp.train_eps, vp.sample_eps) == (1e-5, 1e-3)
    with pytest.raises(ValueError, match="loss_weight=None"):
        create_transport("Linear", "x", "velocity")
    for bad in (0, 1.5, -0.1, True, "0.05"):
        with pytest.raises(ValueError, match="t_eps"):
            create_transport("Linear", "x", t_eps=bad)


# ------------------------------------------------------------------------------------------------------------
# Gaussian data: the exact x-predictor's ODE / SDE carries N(0, I) to N(mu, s^2 I)
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Linear", "GVP"])
@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_ode_of_the_exact_x_predictor_maps_noise_to_the_data(name, method):
    """With a negligible floor the converted field is the exact velocity, whose flow is x1 = mu + s x0."""
    noise = torch.randn(64, 8, dtype=torch.float64)
    transport = create_transport(name, "x", t_eps=1e-9)
    fn = Sampler(transport).sample_ode(sampling_method=method, num_steps=41 if method == "dopri5" else 401,
                                       atol=1e-9, rtol=1e-9)
    x1 = fn(noise, x_oracle(transport.path_sampler))[-1]
    torch.testing.assert_close(x1, MU + S * noise, atol=1e-5 if method == "dopri5" else 2e-3, rtol=0)


def test_ode_with_jits_floor_follows_the_exact_flow_until_sigma_reaches_it():
    """With t_eps = 0.05 the field is exact while 1 - t >= 0.05: the state at t = 0.95 is the exact flow's,
    x_t = alpha mu + sqrt(alpha^2 s^2 + sigma^2) x0; after it the floored velocity is slower than the exact one
    (JiT's sampler leaves part of the last 5% of the noise): here 0.018 on average from x1 = mu + s x0."""
    noise = torch.randn(256, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    transport = create_transport("Linear", "x")
    fn = Sampler(transport).sample_ode(sampling_method="rk4", num_steps=401)
    states = fn(noise, x_oracle(transport.path_sampler))
    t = 0.95
    exact = t * MU + (t ** 2 * S ** 2 + (1 - t) ** 2) ** 0.5 * noise
    torch.testing.assert_close(states[380], exact, atol=1e-6, rtol=0)       # grid point 380 of 400 is t = 0.95
    gap = (states[-1] - (MU + S * noise)).abs()
    assert 0.01 < gap.mean() < 0.03 and gap.max() < 0.1


def test_sde_of_the_exact_x_predictor_is_the_velocity_models():
    """With a negligible floor the x-predictor's SDE (velocity and score from one x_hat) is the exact velocity
    model's, path for path on the same noise; with JiT's floor it still reaches N(mu, s^2) up to the floor's bias
    (SiT's default SDE ends with a Mean step from t = 0.96, where sigma = 0.04 < t_eps: measured -0.016 in the mean)."""
    noise = torch.randn(4000, 4, dtype=torch.float64)
    ends = {}
    for name, transport, model in (("x", create_transport("Linear", "x", t_eps=1e-9), x_oracle),
                                   ("v", create_transport("Linear"), oracle),
                                   ("jit", create_transport("Linear", "x"), x_oracle)):
        fn = Sampler(transport).sample_sde(sampling_method="Euler", diffusion_form="sigma", num_steps=100,
                                           generator=torch.Generator().manual_seed(0))
        ends[name] = fn(noise, model(transport.path_sampler))[-1]
    torch.testing.assert_close(ends["x"], ends["v"], atol=1e-9, rtol=0)
    assert torch.isfinite(ends["jit"]).all()
    assert abs(ends["jit"].mean().item() - MU) < 0.03 and abs(ends["jit"].std().item() - S) < 0.03


# ------------------------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PATHS)
def test_loss_is_the_velocity_loss_of_the_converted_prediction(name):
    """Where sigma_t >= t_eps: the x-loss equals a velocity model's loss on v(x_hat), and both equal
    |v(x_hat) - u_t|^2 (everywhere it is JiT's |(x_hat - x1) A / max(sigma, t_eps)|^2, A = alpha' sigma - sigma'
    alpha)."""
    transport, velocity = create_transport(name, "x"), create_transport(name, "velocity")
    path = transport.path_sampler
    t = times_above_floor(path).float()
    n = len(t)
    x1, x0, x_hat = torch.randn(n, 2, 3, 3), torch.randn(n, 2, 3, 3), torch.randn(n, 2, 3, 3)
    loss = transport.training_losses(lambda x, t: x_hat, x1, t=t, x0=x0)
    _, xt, ut = path.plan(t, x0, x1)
    v_hat = transport.velocity_from_data(x_hat, xt, t)
    torch.testing.assert_close(loss["loss"], mean_flat((v_hat - ut) ** 2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss["loss"], velocity.training_losses(lambda x, t: v_hat, x1, t=t, x0=x0)["loss"],
                               rtol=1e-4, atol=1e-5)
    assert loss["pred"] is x_hat


def test_linear_loss_is_jits_at_every_time():
    transport = create_transport("Linear", "x")
    t = torch.tensor([0.0, 0.5, 0.96, 0.999, 1.0])
    x1, x0, x_hat = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    loss = transport.training_losses(lambda x, t: x_hat, x1, t=t, x0=x0)["loss"]
    expected = mean_flat(((x_hat - x1) / (1 - t).clamp_min(0.05).view(-1, 1, 1, 1)) ** 2)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(loss).all()


def test_flow_objective_with_x_prediction():
    objective = build_objective(dict(objective="flow", prediction="x", time_sampling="logit_normal",
                                     time_mean=-0.8, time_std=0.8, t_eps=0.1))
    assert objective.transport.model_type == ModelType.DATA and objective.transport.t_eps == 0.1
    g = torch.Generator().manual_seed(0)
    t, noise = objective.draw(g, 20000, (1, 2, 2), "cpu")
    assert 0 < t.min() and t.max() < 1                    # JiT's t = sigmoid(N(-0.8, 0.8^2)): no eps at either end
    assert abs(torch.logit(t.double()).mean().item() + 0.8) < 0.02
    x = torch.randn(4, 1, 2, 2)
    terms = objective.losses(lambda x, t, y: torch.zeros_like(x), x, t[:4], noise[:4], dict(y=torch.zeros(4).long()))
    assert set(terms) == {"loss"} and torch.isfinite(terms["loss"]).all()
    with pytest.raises(ValueError, match="prediction=velocity"):
        build_objective(dict(objective="flow", prediction="x", cosine_loss=True))


# ------------------------------------------------------------------------------------------------------------
# Parity with the official JiT loss and samplers
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE, weights_only=True)


def jit_objective(settings):
    return build_objective(dict(objective="flow", prediction="x", time_sampling="logit_normal",
                                time_mean=settings["P_mean"], time_std=settings["P_std"], t_eps=settings["t_eps"]))


def test_loss_equals_the_official_denoiser(reference):
    """Official Denoiser.forward (eval: no label dropout) on the same network, batch, t and noise."""
    stored = reference["objective"]
    net = gen.ours_for(reference["configs"]["in_context"]["options"])
    with torch.no_grad():
        terms = jit_objective(stored["settings"]).losses(net, stored["x"], stored["t"], stored["noise"],
                                                         dict(y=stored["labels"]))
    torch.testing.assert_close(terms["loss"].mean(), stored["loss"], rtol=1e-5, atol=0)


def test_euler_sampler_equals_the_official_one(reference):
    """Official Denoiser.generate(euler): steps Euler steps over linspace(0, 1, steps + 1), CFG on the velocity
    inside the interval = our ODE sampler (euler, steps + 1 grid points) with CFG on x_hat (the conversion is affine
    in x_hat, so guiding x_hat guides v). Through the sampling entry point, from the recorded diffusion config."""
    stored, settings = reference["objective"], reference["objective"]["settings"]
    net = gen.ours_for(reference["configs"]["in_context"]["options"])
    with torch.no_grad():
        x = sample(net, stored["sample_noise"], stored["labels"], null_class=gen.SMALL["num_classes"], sampler="ode",
                   steps=settings["steps"] + 1, ode=dict(method="euler"), cfg_scale=settings["cfg"],
                   guidance_low=settings["interval_min"], guidance_high=settings["interval_max"],
                   objective=jit_objective(settings))
    torch.testing.assert_close(x, stored["samples_euler"], rtol=1e-5, atol=2e-5)


def test_heun_sampler_equals_the_official_one(reference):
    """Official heun: Heun steps on the grid except its last interval, which is one Euler step (the velocity at t = 1
    would divide by the floor) = our ode.method=heun_last_euler; torchdiffeq's plain heun2 steps Heun there too."""
    stored, settings = reference["objective"], reference["objective"]["settings"]
    net = gen.ours_for(reference["configs"]["in_context"]["options"])
    calls = []

    def counted(x, t, y):
        calls.append(len(x))
        return net(x, t, y)
    kw = dict(null_class=gen.SMALL["num_classes"], sampler="ode", steps=settings["steps"] + 1,
              cfg_scale=settings["cfg"], guidance_low=settings["interval_min"], guidance_high=settings["interval_max"],
              objective=jit_objective(settings))
    with torch.no_grad():
        x = sample(counted, stored["sample_noise"], stored["labels"], ode=dict(method="heun_last_euler"), **kw)
        plain = sample(net, stored["sample_noise"], stored["labels"], ode=dict(method="heun"), **kw)
    torch.testing.assert_close(x, stored["samples_heun"], rtol=1e-5, atol=2e-5)
    assert len(calls) == 2 * (settings["steps"] - 1) + 1        # as the official sampler (each a guided batch)
    assert (plain - stored["samples_heun"]).abs().max() > 0.1


@pytest.mark.skipif(not os.environ.get("JIT_OFFICIAL_PATH"),
                    reason="set JIT_OFFICIAL_PATH to an LTH14/JiT checkout (needs einops)")
def test_live_official_objective_gives_the_stored_reference(reference):
    live = gen.make_reference(gen.load_official(os.environ["JIT_OFFICIAL_PATH"]))["objective"]
    for key in ("loss", "t", "noise", "samples_euler", "samples_heun", "sample_noise"):
        torch.testing.assert_close(live[key], reference["objective"][key], rtol=0, atol=0)
