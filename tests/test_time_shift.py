"""The dimension-dependent time shift of flows (SD3, RAE): `diffusion.time_shift` in the training draw, the evaluation
loss's time grid and, by default, the sampling grid; `sample.time_shift` (LightningDiT's parametrisation of the same
map) as the override.

Conventions: ours (SiT's) t = 0 noise, t = 1 data; RAE's and SD3's tau = 1 - t (1 = noise). Their shift s on tau,
tau' = s tau / (1 + (s - 1) tau), is shift_time(t, 1 / s) on ours. Parity with the official RAE code
(bytetriper/RAE) is checked against tests/data/time_shift_reference.json, made by
tests/reference/make_time_shift_reference.py (its docstring says how to regenerate it); with RAE_OFFICIAL_PATH set to
a checkout the reference is also recomputed live.
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import expit, logit

from conftest import compose_config, load_reference_script
from diffusion import Sampler, build_objective, create_transport
from diffusion.eval_loss import EvalLoss, time_grid
from diffusion.objectives import canonical_config
from diffusion.sampling import flow_sample, sample
from diffusion.transport import (DIMENSION_SHIFT_BASE, dimension_shift, resolve_time_shift, shift_interval,
                                 shift_time)
from utils.errors import ConfigError

REFERENCE = Path(__file__).parent / "data" / "time_shift_reference.json"
gen = load_reference_script("make_time_shift_reference")
RAE_LATENT = (768, 16, 16)


def noise_side_shift(tau, s):
    """SD3's / RAE's map on their noise time tau (1 = noise), written out."""
    return s * tau / (1 + (s - 1) * tau)


def flow(**kwargs):
    return build_objective({"objective": "flow", **kwargs})


@pytest.fixture(scope="module")
def reference():
    return json.loads(REFERENCE.read_text())


# ---- the map ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s", [0.5, 2.0, 3.0, math.sqrt(48), 13.0])
def test_the_map_its_inverse_and_the_convention_conversion(s):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    a = 1 / s
    shifted = shift_time(t, a)
    torch.testing.assert_close(shifted, a * t / (1 + (a - 1) * t), rtol=0, atol=1e-15)   # the closed form
    torch.testing.assert_close(shift_time(shifted, s), t, rtol=0, atol=1e-12)              # its inverse: 1 / a
    assert shifted[0] == 0 and shifted[-1] == pytest.approx(1, abs=1e-15)                  # the ends stay
    assert (shifted.diff() > 0).all()                                                      # increasing
    assert ((shifted <= t + 1e-15).all() if s > 1 else (shifted >= t - 1e-15).all())      # s > 1: toward noise
    # RAE's / SD3's shift s on tau = 1 - t is ours with 1 / s.
    torch.testing.assert_close(1 - noise_side_shift(1 - t, s), shifted, rtol=0, atol=1e-14)


def test_shift_interval_keeps_the_ends_and_is_shift_time_on_the_unit_interval():
    t = torch.linspace(0, 1, 17)
    assert torch.equal(shift_interval(t, 0.3, 0, 1), shift_time(t, 0.3))    # bit for bit
    assert torch.equal(shift_interval(1 - t, 0.3, 1, 0), shift_time(1 - t, 0.3))   # reversed grids too
    grid = torch.linspace(0.001, 0.96, 9, dtype=torch.float64)
    out = shift_interval(grid, 0.2, 0.001, 0.96)
    assert out[0] == pytest.approx(0.001, abs=1e-15) and out[-1] == pytest.approx(0.96, abs=1e-15)
    torch.testing.assert_close(out, 0.001 + 0.959 * shift_time((grid - 0.001) / 0.959, 0.2))
    assert shift_interval(grid, 1.0, 0.001, 0.96) is grid


@pytest.mark.parametrize("shape, s", [((4, 32, 32), 1.0), (RAE_LATENT, math.sqrt(48)), ((768, 32, 32), math.sqrt(192)),
                                      ((32, 16, 16), math.sqrt(2)), ((1, 8, 8), 0.125), ((3, 256, 256), math.sqrt(48)),
                                      ((16, 32, 32), 2.0)])
def test_s_from_the_shape(shape, s):
    assert DIMENSION_SHIFT_BASE == 4096
    assert dimension_shift(shape) == pytest.approx(s, rel=1e-15)
    assert flow(time_shift="auto").shift(shape) == dimension_shift(shape) == math.sqrt(math.prod(shape) / 4096)
    assert flow(time_shift=2.5).shift(shape) == 2.5 and flow().shift(shape) == 1.0


def test_auto_on_raes_latents_gives_the_official_s(reference):
    configs = reference["configs"]
    assert configs, "the reference holds RAE's shipped configs"
    for name, c in configs.items():
        assert c["base"] == DIMENSION_SHIFT_BASE, name
        assert c["dim"] == math.prod(c["latent_size"]), name   # every shipped config: dim = C*H*W of its latent
        assert flow(time_shift="auto").shift(tuple(c["latent_size"])) == c["s"], name
    assert flow(time_shift="auto").shift(RAE_LATENT) == pytest.approx(6.928203230275509, rel=1e-15)


@pytest.mark.parametrize("bad", [0, -1.0, "fast", True, None, "1.0"])
def test_bad_values_are_refused_when_the_objective_is_built(bad):
    with pytest.raises(ConfigError, match="time_shift"):
        flow(time_shift=bad)
    with pytest.raises(ConfigError, match="auto"):
        resolve_time_shift("auto")   # auto needs a shape
    with pytest.raises(ConfigError, match="valid keys"):
        build_objective({"objective": "ddpm", "time_shift": 2.0})   # DDPM has no continuous time to shift


# ---- the training draw ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("time_sampling, mean, std", [("uniform", 0, 1), ("logit_normal", 0.0, 1.0),
                                                      ("logit_normal", 0.4, 0.8)])
@pytest.mark.parametrize("s", [3.0, 0.5])
def test_the_training_draw_follows_the_shifted_density(time_sampling, mean, std, s):
    """Kolmogorov-Smirnov against the CDF of the shifted draw, F(t) = F_base(shift^-1(t)), shift^-1 = shift_time(., s);
    the unshifted CDF is rejected."""
    objective = flow(time_sampling=time_sampling, time_mean=mean, time_std=std, time_shift=s)
    t, _ = objective.draw(torch.Generator().manual_seed(1), 20_000, (1,), "cpu")
    t = t.double().numpy()
    base = (lambda u: np.clip(u, 0, 1)) if time_sampling == "uniform" else \
        (lambda u: stats.norm.cdf((logit(np.clip(u, 1e-300, 1 - 1e-16)) - mean) / std))
    assert stats.kstest(t, lambda x: base(shift_time(x, s))).pvalue > 1e-3
    assert stats.kstest(t, base).pvalue < 1e-6


def test_the_shift_stays_inside_the_training_interval():
    """Noise models train on [t0, t1] = [1e-3, 1 - 1e-3]: the drawn u is shifted on [0, 1], then mapped there, as the
    eps keep the singular ends away."""
    objective = flow(prediction="noise", time_sampling="logit_normal", time_shift=5.0)
    t0, t1 = objective.transport.check_interval(objective.transport.train_eps, objective.transport.sample_eps)
    assert (t0, t1) == (1e-3, 1 - 1e-3)
    t, _ = objective.draw(torch.Generator().manual_seed(2), 20_000, (1,), "cpu")
    assert t.min() >= t0 and t.max() <= t1
    u = ((t.double() - t0) / (t1 - t0)).numpy()
    cdf = lambda x: stats.norm.cdf(logit(np.clip(shift_time(x, 5.0), 1e-300, 1 - 1e-16)))
    assert stats.kstest(u, cdf).pvalue > 1e-3


def test_auto_takes_the_shape_the_draw_is_for():
    """`auto` resolves from the shape the trainer passes to draw (the data's), so train.py needs nothing new; the
    noise and the RNG stream are the unshifted draw's."""
    for shape, s in ((RAE_LATENT, math.sqrt(48)), ((1, 8, 8), 0.125)):
        plain = flow(time_sampling="logit_normal").draw(torch.Generator().manual_seed(4), 4, shape, "cpu")
        auto = flow(time_sampling="logit_normal", time_shift="auto").draw(torch.Generator().manual_seed(4), 4, shape,
                                                                          "cpu")
        assert torch.equal(plain[1], auto[1])
        torch.testing.assert_close(auto[0], shift_time(plain[0], 1 / s))


# ---- time_shift = 1 changes nothing -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(time_sampling="logit_normal"), dict(time_sampling="uniform"),
                                    dict(prediction="noise", time_sampling="logit_normal"), dict(path_type="VP")])
def test_time_shift_one_leaves_the_draws_and_the_eval_grid_bit_identical(kwargs):
    draws = [flow(**kwargs, **extra).draw(torch.Generator().manual_seed(7), 64, (2, 4, 4), "cpu")
             for extra in ({}, {"time_shift": 1.0}, {"time_shift": 1})]
    for t, noise in draws[1:]:
        assert torch.equal(t, draws[0][0]) and torch.equal(noise, draws[0][1])
    grids = [time_grid(flow(**kwargs, **extra), 8)[0] for extra in ({}, {"time_shift": 1.0})]
    assert torch.equal(grids[0], grids[1])
    assert flow(time_shift="auto").draw(torch.Generator().manual_seed(7), 8, (4, 32, 32), "cpu")[0].equal(
        flow().draw(torch.Generator().manual_seed(7), 8, (4, 32, 32), "cpu")[0])   # auto at 4096 values: s = 1


def test_old_configs_read_as_unshifted_and_resume():
    """Checkpoints from before the key existed record no time_shift: they are unshifted, and compare equal to the
    default config (a resume is not refused)."""
    old = {"objective": "flow", "path_type": "Linear", "time_sampling": "logit_normal"}
    assert canonical_config(old)["time_shift"] == 1.0
    assert canonical_config(old) == canonical_config({**old, "time_shift": 1.0})
    assert "time_shift" not in canonical_config({"objective": "ddpm"}) and "time_shift" not in canonical_config(None)
    assert build_objective(old).config["time_shift"] == 1.0
    cfg = compose_config(overrides=["diffusion=flow"])
    assert cfg.diffusion.time_shift == 1.0 and cfg.sample.time_shift is None
    assert compose_config("sample", overrides=["ckpt=x"]).time_shift is None
    assert compose_config(overrides=["diffusion.time_shift=auto"]).diffusion.time_shift == "auto"


# ---- sampling -------------------------------------------------------------------------------------------------------

class Recorder:
    """A velocity model that records the times it is called at and returns zeros."""

    def __init__(self):
        self.times = []

    def __call__(self, x, t, y):
        self.times.append(float(t[0]))
        return torch.zeros_like(x)


def sampled_times(shape=(2, 4, 4), **kwargs):
    model = Recorder()
    options = dict(null_class=10, sampler="ode", steps=6, ode=dict(method="euler"))
    sample(model, torch.randn(2, *shape), torch.zeros(2, dtype=torch.long), **{**options, **kwargs})
    return torch.tensor(model.times, dtype=torch.float64)


def test_the_sampling_grid_follows_the_objectives_shift():
    grid = torch.linspace(0, 1, 6)
    unshifted = sampled_times(objective=flow())
    torch.testing.assert_close(unshifted, grid[:-1].double(), rtol=0, atol=0)
    for s in (3.0, 0.5):
        expected = shift_time(grid, 1 / s)[:-1].double()
        torch.testing.assert_close(sampled_times(objective=flow(time_shift=s)), expected, rtol=0, atol=1e-7)
        torch.testing.assert_close(sampled_times(diffusion_kwargs={"objective": "flow", "time_shift": s}), expected,
                                   rtol=0, atol=1e-7)   # as sample.py gets it: the checkpoint's recorded config
    # auto: from the noise's shape, which is the training data's.
    expected = shift_time(grid, 1 / math.sqrt(48))[:-1].double()
    torch.testing.assert_close(sampled_times(RAE_LATENT, objective=flow(time_shift="auto")), expected, atol=1e-7,
                               rtol=0)
    # An explicit sample.time_shift (LightningDiT's a on our t) replaces it; 1 = an unshifted grid.
    torch.testing.assert_close(sampled_times(objective=flow(time_shift=3.0), time_shift=1.0), unshifted)
    torch.testing.assert_close(sampled_times(objective=flow(time_shift=3.0), time_shift=0.3),
                               shift_time(grid, 0.3)[:-1].double(), rtol=0, atol=1e-7)
    # LightningDiT's 0.3 at sampling is the noise-side s = 1 / 0.3 of SD3 / RAE.
    torch.testing.assert_close(sampled_times(objective=flow(time_shift=1 / 0.3)),
                               sampled_times(objective=flow(), time_shift=0.3), rtol=0, atol=1e-7)


def test_the_sde_grid_is_shifted_inside_its_interval():
    """The SDE runs to t1 = 1 - last_step_size, then one last step: its shifted grid keeps t1, so the last step still
    ends at the data (a grid shifted on [0, 1] would stop at shift(t1), far from t1 for large s)."""
    s, t1 = 4.0, 0.96
    times = sampled_times(objective=flow(time_shift=s), sampler="sde", steps=6,
                          sde=dict(method="Euler", last_step="Mean", last_step_size=0.04))
    expected = shift_interval(torch.linspace(0, t1, 6), 1 / s, 0, t1)
    torch.testing.assert_close(times[:-1], expected[:-1].double(), rtol=0, atol=1e-7)
    assert times[-1] == pytest.approx(t1)   # the last step, from t1
    assert expected[-1].item() == pytest.approx(t1, abs=1e-6)
    assert (times[1:-1] < torch.linspace(0, t1, 6)[1:-1].double()).all()   # crowded toward the noise end


def test_an_unshifted_model_samples_as_before():
    """time_shift None (follow the objective, s = 1) and an explicit 1 give the same samples as the low-level
    flow_sample with no shift, for the ODE and the SDE."""
    torch.manual_seed(0)
    model = lambda x, t, y: -x * (1 + t.view(-1, 1, 1, 1)) + 0.1 * y.view(-1, 1, 1, 1)
    noise, labels = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2])
    for sampler, steps in (("ode", 8), ("sde", 8)):
        runs = []
        for kwargs in ({}, {"time_shift": 1.0}, {"diffusion_kwargs": {"objective": "flow"}}):
            objective = None if "diffusion_kwargs" in kwargs else flow()
            runs.append(sample(model, noise, labels, null_class=10, sampler=sampler, steps=steps, objective=objective,
                               generator=torch.Generator().manual_seed(5), **kwargs))
        low = flow_sample(flow().transport, model, noise, labels, sampler, steps,
                          generator=torch.Generator().manual_seed(5))
        assert all(torch.equal(r, low) for r in runs)


# ---- the evaluation loss's grid --------------------------------------------------------------------------------

@pytest.mark.parametrize("time_sampling", ["uniform", "logit_normal"])
def test_the_eval_grid_is_the_shifted_densitys_quantiles(time_sampling):
    k, s = 8, 3.0
    objective = flow(time_sampling=time_sampling, time_mean=0.3, time_std=1.2, time_shift=s)
    t, w = time_grid(objective, k)
    mid = (np.arange(k) + 0.5) / k
    base = mid if time_sampling == "uniform" else expit(0.3 + 1.2 * stats.norm.ppf(mid))
    np.testing.assert_allclose(t.numpy(), shift_time(base, 1 / s), rtol=1e-6)
    # The shifted density's CDF at the grid points is (i + 1/2) / K: they are its midpoint quantiles.
    cdf = shift_time(t.double().numpy(), s)
    if time_sampling == "logit_normal":
        cdf = stats.norm.cdf((logit(cdf) - 0.3) / 1.2)
    np.testing.assert_allclose(cdf, mid, atol=1e-6)
    assert np.allclose(w.numpy(), 1 / k)


def test_the_eval_loss_takes_auto_from_its_shape():
    objective = flow(time_sampling="logit_normal", time_shift="auto")
    with pytest.raises(ConfigError, match="auto"):
        time_grid(objective, 4)
    evaluator = EvalLoss(objective, [None], [0], RAE_LATENT, times=4)
    expected = time_grid(flow(time_sampling="logit_normal", time_shift=math.sqrt(48)), 4)[0]
    assert torch.equal(evaluator.t, expected) and torch.equal(evaluator.t, time_grid(objective, 4, RAE_LATENT)[0])


# ---- parity with the official RAE code -------------------------------------------------------------------------------

def test_the_grids_equal_raes_after_the_conversion(reference):
    """RAE's ODE / SDE grids shift(1 - linspace(t0, t1, N)) on its tau are shift_time(linspace(t0, t1, N), 1 / s) on
    ours, and for the ODE on [0, 1] (a velocity model's) our sampler's grid is exactly that."""
    assert reference["ode_grids"] and reference["sde_grids"]
    for entry in reference["ode_grids"] + reference["sde_grids"]:
        ours = shift_time(torch.linspace(entry["t0"], entry["t1"], entry["n"]), 1 / entry["s"])
        theirs = 1 - torch.tensor(entry["t"], dtype=torch.float64)
        assert (ours.double() - theirs).abs().max() < 1e-6, entry["s"]
    for entry in reference["ode_grids"]:
        if (entry["t0"], entry["t1"]) == (0.0, 1.0):
            fn = Sampler(create_transport()).sample_ode(sampling_method="euler", num_steps=entry["n"],
                                                        time_shift=1 / entry["s"])
            theirs = 1 - torch.tensor(entry["t"], dtype=torch.float64)
            assert (fn.__self__.grid.double() - theirs).abs().max() < 1e-6, entry["s"]


def test_the_intended_differences_from_raes_samplers(reference):
    """RAE's velocity ODE stops at tau = 1e-3 before the shift (check_interval's t1 = 1 - 1/1000), so after it at
    shift(1e-3) (6.9e-3 for s = 6.93); ours runs to t = 1. RAE's SDE grid shifts its end too, so it stops at
    shift(t1) and the last step (of size 0.04, at the unshifted time) does not reach the data; ours keeps t1."""
    rae = [e for e in reference["ode_sampler_grids"] if e["s"] == pytest.approx(math.sqrt(48))][0]
    theirs = 1 - torch.tensor(rae["t"], dtype=torch.float64)
    ours = shift_time(torch.linspace(0, 0.999, rae["n"]), 1 / rae["s"]).double()
    assert (ours - theirs).abs().max() < 1e-6 and 1 - theirs[-1] == pytest.approx(6.887e-3, rel=1e-3)
    grid = Sampler(create_transport()).sample_ode(sampling_method="euler", num_steps=rae["n"],
                                                  time_shift=1 / rae["s"]).__self__.grid
    assert grid[-1].item() == pytest.approx(1, abs=1e-6)
    for entry in reference["sde_grids"]:
        if entry["s"] > 1:
            assert 1 - entry["t"][-1] < entry["t1"] - 1e-3   # theirs ends short of t1
            ours = shift_interval(torch.linspace(entry["t0"], entry["t1"], entry["n"]), 1 / entry["s"], entry["t0"],
                                  entry["t1"])
            assert ours[-1].item() == pytest.approx(entry["t1"], abs=1e-6)


def test_the_training_shift_equals_raes(reference):
    """RAE's Transport.sample: t = shift(u) on its tau, from the same seed with and without the shift; ours maps
    1 - u to 1 - t."""
    assert reference["draws"]
    for entry in reference["draws"]:
        u, t = (torch.tensor(entry[k], dtype=torch.float64) for k in ("u", "t"))
        assert not torch.equal(u, t) or entry["s"] == 1
        assert ((1 - t) - shift_time(1 - u, 1 / entry["s"])).abs().max() < 1e-6, entry


@pytest.mark.skipif(not os.environ.get(gen.ENV), reason=f"set {gen.ENV} to a bytetriper/RAE checkout")
def test_live_official_code_gives_the_stored_reference(reference):
    live = json.loads(json.dumps(gen.make_reference(*gen.load_official(os.environ[gen.ENV]))))
    assert live == {k: v for k, v in reference.items() if k != "meta"}
