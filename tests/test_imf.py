"""Improved MeanFlow (diffusion/imeanflow.py, `diffusion=meanflow diffusion.variant=imf`): parity with the official
JAX code, the closed forms on Gaussian data, the guidance conditions of the network (present only when the variant
needs them), the configuration and its refusals, training steps of a DiT-Mini/2, and the sampler handing the
network its guidance scale and interval.

Parity: tests/data/imf_reference.json holds the official `iMeanFlow.forward` loss, its terms, the gradients of a fixed
network and every random draw it made, recorded by tests/reference/make_imf_reference.py (its docstring says how to
regenerate it; it needs jax and flax, these tests do not). Our loss runs on the same draws: 1e-5 relative.
"""

import functools
import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import sample as sample_script
import train as train_script
from conftest import TINY, compose_config, final_state, load_reference_script, read_run_metrics, rel_err, tiny_dit, \
    tiny_unet
from diffusion import build_objective
from diffusion.imeanflow import ImprovedMeanFlowObjective
from diffusion.meanflow import MeanFlowObjective, exact_gaussian_u
from diffusion.objectives import canonical_config, network_kwargs
from diffusion.sampling import sample
from models import DiT_models
from models.mup import classify
from utils.errors import ConfigError

TESTS = Path(__file__).resolve().parent
gen = load_reference_script("make_imf_reference")
IMF = {"objective": "meanflow", "variant": "imf"}
GUIDANCE_KEYS = ("omega_embedder.", "t_min_embedder.", "t_max_embedder.")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These networks are tiny: one thread runs them in tens of milliseconds, where a second one contending for a
    busy core (measured on this 2-core machine beside another job) takes seconds a step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------------
# Parity with the official code (Lyy-iiis/imeanflow, JAX)
# ------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _reference(source):
    if source == "stored":
        return json.loads((TESTS / "data" / "imf_reference.json").read_text())
    imf, hashes = gen.load_official(os.environ["IMF_OFFICIAL_PATH"])
    return json.loads(json.dumps(gen.make_reference(imf, hashes, "live")))


@pytest.fixture(scope="module", params=[
    "stored",
    pytest.param("live", marks=pytest.mark.skipif(not os.environ.get("IMF_OFFICIAL_PATH"),
                                                  reason="set IMF_OFFICIAL_PATH to a Lyy-iiis/imeanflow checkout "
                                                         "(and install jax, flax)")),
])
def reference(request):
    return _reference(request.param)


def _draws(case):
    return {k: torch.tensor(v) for k, v in case["draws"].items()}


def test_reference_covers_every_case_and_the_guidance_interval(reference):
    assert set(reference["cases"]) == set(gen.CASES) and reference["commit"]
    for case in reference["cases"].values():   # r != t samples on both sides of their interval, and r = t ones
        d = _draws(case)
        jump, inside = d["t"] != d["r"], (d["t"] >= d["t_min"]) & (d["t"] <= d["t_max"])
        assert (jump & inside).any() and (jump & ~inside).any()
        assert torch.equal(d["t_min"][~jump], torch.zeros(int((~jump).sum())))
    assert (_draws(reference["cases"]["recipe"])["t"] == _draws(reference["cases"]["recipe"])["r"]).any()


@pytest.mark.parametrize("case", list(gen.CASES))
def test_loss_terms_and_gradients_match_the_official_code(reference, case):
    expected = reference["cases"][case]
    config = expected["config"]
    objective = build_objective({**IMF, "norm_p": config["norm_p"], "norm_eps": config["norm_eps"],
                                 "omega_beta": config["cfg_beta"]})
    d = _draws(expected)
    x = torch.tensor(reference["x"]).permute(0, 3, 1, 2)                    # NHWC -> NCHW
    tr = torch.stack([d["t"], d["r"], d["omega"], d["t_min"], d["t_max"]], dim=1)
    net = gen.TorchTinyNet()
    terms = objective.losses(net, x, tr, d["noise"].permute(0, 3, 1, 2), dict(y=torch.tensor(reference["labels"])))
    loss = terms["loss"].mean()
    loss.backward()
    assert rel_err(loss.detach(), torch.tensor(expected["loss"])) < 1e-5
    assert rel_err(terms["mse"].mean(), torch.tensor(expected["loss_u"])) < 1e-5
    assert rel_err(terms["mse_v"].mean(), torch.tensor(expected["loss_v"])) < 1e-5
    for name, p in net.p.items():
        assert rel_err(p.grad, torch.tensor(expected["grads"][name])) < 1e-5, name
    # the guidance scale's map from U(0, 1), official sample_cfg_scale (cfg_beta 1, 2 and 0.5)
    assert rel_err(objective.guidance_scale(d["omega_uniform"]), d["omega"]) < 1e-6


def test_the_tangent_is_the_networks_velocity_not_the_samples():
    """What the parity would miss if the draws were kind: MeanFlow's tangent eps - x (and no guidance) gives another
    loss on the same draws."""
    reference = _reference("stored")
    expected = reference["cases"]["no_weight_beta2"]   # p = 0: the loss is the plain squared error
    d = _draws(expected)
    x = torch.tensor(reference["x"]).permute(0, 3, 1, 2)
    tr = torch.stack([d["t"], d["r"], d["omega"], d["t_min"], d["t_max"]], dim=1)
    objective = build_objective({**IMF, "norm_p": 0.0})
    objective.guided_velocity = lambda u, z, t, v, *rest: (v, v)   # v_g = v and the tangent v = eps - x
    terms = objective.losses(gen.TorchTinyNet(), x, tr, d["noise"].permute(0, 3, 1, 2),
                             dict(y=torch.tensor(reference["labels"])))
    assert rel_err(terms["mse"].mean(), torch.tensor(expected["loss_u"])) > 1e-2


# ------------------------------------------------------------------------------------------------------------
# Closed forms on Gaussian data
# ------------------------------------------------------------------------------------------------------------

STD = torch.tensor([0.3, 1.0, 0.05], dtype=torch.float64).view(1, 3, 1, 1)
MEANS = torch.tensor([[0.5, -1.0, 2.0], [-0.7, 0.4, 0.0], [0.1, 0.2, -0.3]], dtype=torch.float64)   # classes 0, 1; null


def flow(z, t, r, mean):
    """z_r from z_t on the trajectory of N(mean, STD^2) data under MeanFlow's path ((z - (1 - t) mean) / s is kept)."""
    s = lambda a: torch.sqrt((1 - a) ** 2 * STD ** 2 + a ** 2)
    return (1 - r) * mean + s(r) / s(t) * (z - (1 - t) * mean)


class GuidedGaussian(torch.nn.Module):
    """The exact average velocity of iMF's guided field for Gaussian classes of one std: told (omega, t_min, t_max),
    class y's field is that of N(omega mean_y + (1 - omega) mean_null, STD^2) inside [t_min, t_max] (classifier-free
    guidance of affine fields), N(mean_y, STD^2) outside; the null class's is N(mean_null, STD^2) at any omega.
    Trajectories are exact per piece, so u(z, r, t) = (z_t - z_r) / (t - r) across the interval's ends."""

    num_classes = 2

    def forward(self, z, t, y=None, dt=None, guidance=None):
        col = lambda a: a.view(-1, 1, 1, 1).to(z.dtype)
        g, t_min, t_max = guidance.unbind(1)
        omega, null = col(1 / (1 - g)), col(y == self.num_classes)
        mean_y, mean_null = MEANS[y].view(-1, 3, 1, 1), MEANS[-1].view(1, 3, 1, 1)
        inner = torch.where(null.bool(), mean_null, omega * mean_y + (1 - omega) * mean_null)
        outer = torch.where(null.bool(), mean_null, mean_y)
        t_, h = col(t), col(dt)
        r = t_ - h
        b2 = torch.minimum(torch.maximum(col(t_max), r), t_)   # [b2, t] outside, [b1, b2] inside, [r, b1] outside
        b1 = torch.minimum(torch.maximum(col(t_min), r), b2)
        z_r = flow(flow(flow(z, t_, b2, outer), b2, b1, inner), b1, r, outer)
        jump = (z - z_r) / torch.where(h == 0, torch.ones_like(h), h)
        inside = (t_ >= col(t_min)) & (t_ <= col(t_max))
        limit = exact_gaussian_u(torch.where(inside, inner, outer), STD)(z, t, None, torch.zeros_like(t))
        return torch.where(h == 0, limit, jump)


def _marginal(y, z, t):
    """The sample's velocity set to its class's marginal one: x = z - t v, eps = z + (1 - t) v give z_t = z."""
    return exact_gaussian_u(MEANS[y].view(-1, 3, 1, 1), STD)(z, t, None, torch.zeros_like(t))


@pytest.mark.parametrize("v_loss", [True, False])
def test_loss_vanishes_at_the_exact_guided_average_velocity(v_loss):
    """At the exact u the v-loss is 0 for r = t and r < t, inside and outside the guidance interval and for dropped
    labels: V = u + (t - r) du/dt is the guided field's velocity, which the guided target v_g equals."""
    g = torch.Generator().manual_seed(2)
    objective = build_objective({**IMF, "norm_p": 0.0, "v_loss": v_loss})
    tr, _ = objective.draw(g, 96, (3, 2, 2), "cpu")
    tr = tr.double()
    y = torch.randint(0, 3, (96,), generator=g)                               # 2: the null class
    z = torch.randn(96, 3, 2, 2, dtype=torch.float64, generator=g)
    t, r = tr[:, 0], tr[:, 1]
    inside = (t >= tr[:, 3]) & (t <= tr[:, 4])
    assert (t == r).any() and (inside & (t > r)).any() and (~inside & (t > r)).any() and (y == 2).any()
    v = _marginal(y, z, t)
    x, noise = z - t.view(-1, 1, 1, 1) * v, z + (1 - t.view(-1, 1, 1, 1)) * v
    terms = objective.losses(GuidedGaussian(), x, tr, noise, dict(y=y))
    assert terms["loss"].max() < 1e-20 and set(terms) == ({"loss", "mse", "mse_v"} if v_loss else {"loss", "mse"})
    wrong = GuidedGaussian()
    wrong.forward = lambda *a, **k: GuidedGaussian.forward(wrong, *a, **k) * 1.01
    assert objective.losses(wrong, x, tr, noise, dict(y=y))["loss"].min() > 1e-8


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("interval", [(None, None), (0.3, 0.7)])
def test_sampler_told_the_guidance_maps_noise_to_the_guided_data(steps, interval):
    """One or more jumps of the exact u land where the guided field carries the noise: with the interval [0, 1] on
    N(omega mean_y + (1 - omega) mean_null, STD^2), i.e. mean + STD eps; the null class on its own data."""
    noise = torch.randn(6, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels, omega = torch.tensor([0, 1, 0, 1, 2, 2]), 3.0
    x = sample(GuidedGaussian(), noise, labels, null_class=2, steps=steps, cfg_scale=omega,
               guidance_low=interval[0], guidance_high=interval[1], diffusion_kwargs=IMF)
    mean_y, mean_null = MEANS[labels].view(-1, 3, 1, 1), MEANS[-1].view(1, 3, 1, 1)
    null = (labels == 2).view(-1, 1, 1, 1)
    guided = torch.where(null, mean_null, omega * mean_y + (1 - omega) * mean_null)
    plain = torch.where(null, mean_null, mean_y)
    one, zero = torch.ones(6, 1, 1, 1, dtype=torch.float64), torch.zeros(6, 1, 1, 1, dtype=torch.float64)
    if interval == (None, None):
        expected = guided + STD * noise
    else:
        lo, hi = one * interval[0], one * interval[1]
        expected = flow(flow(flow(noise, one, hi, plain), hi, lo, guided), lo, zero, plain)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# The network's guidance conditions: only where the variant needs them
# ------------------------------------------------------------------------------------------------------------

def test_guidance_conditions_are_built_only_for_imf():
    assert network_kwargs(build_objective({"objective": "meanflow"})) == {"learn_sigma": False, "second_time": True}
    assert network_kwargs(build_objective(IMF)) == {"learn_sigma": False, "second_time": True, "guidance_cond": True}
    for build in (tiny_dit, small_unet):
        second, imf = build(second_time=True), build(second_time=True, guidance_cond=True)
        extra = set(imf.state_dict()) - set(second.state_dict())
        assert extra and all(k.startswith(GUIDANCE_KEYS) for k in extra)
        assert not any(k.startswith(GUIDANCE_KEYS) for k in (*build().state_dict(), *second.state_dict()))
        x = torch.zeros(1, imf.in_channels, 8, 8)
        with pytest.raises(ConfigError, match="without guidance_cond"):
            second(x, torch.zeros(1), dt=torch.zeros(1), guidance=torch.zeros(1, 3))
    roles = classify(tiny_dit(second_time=True, guidance_cond=True))
    for name in GUIDANCE_KEYS:
        assert roles[f"{name}mlp.0.weight"] == "input" and roles[f"{name}mlp.2.weight"] == "hidden"


def small_unet(**kwargs):
    """A one-block-per-level U-Net on the digits' 1x8x8 (UNet-T's forward takes seconds on a busy CPU)."""
    return tiny_unet(model_channels=32, channel_mult=(1, 2), attention_levels=(1,), num_res_blocks=1,
                     head_channels=None, norm_groups=8, **kwargs)


@pytest.mark.parametrize("build", [tiny_dit, small_unet])
def test_each_guidance_condition_reaches_the_output(build):
    torch.manual_seed(0)
    model = build(second_time=True, guidance_cond=True).eval()
    with torch.no_grad():
        for p in model.parameters():   # no zero-initialised readout: outputs depend on the conditions
            if not p.abs().sum():
                p.copy_(torch.randn(p.shape) * 0.05)
        x, t, y = torch.randn(1, model.in_channels, 8, 8).expand(4, -1, -1, -1), torch.full((4,), 0.7), torch.full(
            (4,), 2)
        guidance = torch.tensor([[0.5, 0.2, 0.8]]).repeat(4, 1) + 0.3 * torch.cat([torch.zeros(1, 3), torch.eye(3)])
        out = model(x, t, y, dt=t / 2, guidance=guidance)
        assert ((out[1:] - out[:1]).flatten(1).abs().amax(1) > 1e-6).all()
        assert torch.equal(model(x[:2], t[:2], y[:2], dt=t[:2] / 2),
                           model(x[:2], t[:2], y[:2], dt=t[:2] / 2, guidance=torch.zeros(2, 3)))


# ------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------

def test_experiment_composes_with_the_published_recipe():
    cfg = compose_config(overrides=["experiment=imf-b2-imagenet256"])
    d = cfg.diffusion
    assert (d.objective, d.variant, d.ratio_r_neq_t, d.time_mean, d.time_std, d.norm_p, d.norm_eps) == (
        "meanflow", "imf", 0.5, -0.4, 1.0, 1.0, 0.01)
    assert (d.omega_max, d.omega_beta, list(d.t_min_range), list(d.t_max_range), d.v_loss) == (
        8.0, 1.0, [0.0, 0.5], [0.5, 1.0], True)
    assert (cfg.train.batch_size, cfg.train.steps, cfg.train.class_dropout) == (1024, 640 * (1281167 // 1024), 0.1)
    assert (cfg.optim.lr, list(cfg.optim.betas), cfg.optim.weight_decay, cfg.optim.warmup_steps) == (
        1e-4, [0.9, 0.95], 0.0, 10 * (1281167 // 1024))
    assert cfg.ema.decay == 0.9999 and cfg.model.name == "LightningDiT-B/2"
    assert (cfg.sample.sampler, cfg.sample.steps, cfg.sample.cfg_scale, cfg.sample.guidance_low,
            cfg.sample.guidance_high) == ("meanflow", 1, 8.0, 0.4, 0.65)
    assert isinstance(build_objective(OmegaConf.to_container(d)), ImprovedMeanFlowObjective)
    assert OmegaConf.to_container(cfg, resolve=True)["run_dir"] == "runs/imagenet/iMF-LightningDiT-B-2"


def test_the_default_stays_meanflow_and_old_configs_resume():
    cfg = compose_config(overrides=["diffusion=meanflow"])
    new = OmegaConf.to_container(cfg.diffusion)
    assert new["variant"] == "mf" and type(build_objective(new)) is MeanFlowObjective
    old = {k: v for k, v in new.items() if k not in ("variant", "omega_max", "omega_beta", "t_min_range",
                                                     "t_max_range", "v_loss")}
    assert canonical_config(old) == canonical_config(new)   # a MeanFlow run from before iMF resumes


def test_bad_combinations_name_the_key_and_the_fix():
    cases = [
        ({**IMF, "kappa": 0.5}, r"diffusion.kappa=0.5 .*set diffusion.omega=1.0 diffusion.kappa=0.0"),
        ({**IMF, "guidance_interval": [0.0, 0.75]}, r"diffusion.guidance_interval"),
        ({"objective": "meanflow", "omega_max": 5.0}, r"diffusion.omega_max=5.0 .*set diffusion.variant=imf"),
        ({"objective": "meanflow", "v_loss": False}, r"diffusion.v_loss"),
        ({"objective": "meanflow", "variant": "imf2"}, r"diffusion.variant 'imf2'"),
        ({**IMF, "t_min_range": [0.6, 0.2]}, r"diffusion.t_min_range"),
        ({**IMF, "omega_max": 0.5}, r"diffusion.omega_max=0.5"),
        ({**IMF, "omgea_max": 5.0}, r"valid keys: .*omega_max"),
    ]
    for config, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_objective(config)
    model, noise, labels = GuidedGaussian(), torch.zeros(2, 3, 2, 2), torch.tensor([0, 1])
    for kwargs, message in [(dict(cfg_scale=0.5), "cfg_scale=0.5"), (dict(cfg_channels=3), "cfg_channels=3"),
                            (dict(guidance_low=0.8, guidance_high=0.2), "guidance_low=0.8"),
                            (dict(guidance="auto", guide_model=model), "guidance=auto")]:
        with pytest.raises(ConfigError, match=message):
            sample(model, noise, labels, null_class=2, diffusion_kwargs=IMF, **kwargs)


# ------------------------------------------------------------------------------------------------------------
# Training and sampling
# ------------------------------------------------------------------------------------------------------------

def test_a_few_training_steps_of_a_dit_mini():
    torch.manual_seed(0)
    objective = build_objective(IMF)
    model = DiT_models["DiT-Mini/2"](input_size=8, in_channels=1, num_classes=10, **network_kwargs(objective))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 4, 10])
    for _ in range(3):   # adaLN-Zero: the readout, then the modulations, then the conditions' embedders move
        t, noise = objective.draw(g, 6, (1, 8, 8), "cpu")
        assert t.shape == (6, 5) and (t[:, 2] >= 1).all() and (t[:, 2] <= 8).all()
        terms = objective.losses(model, x, t, noise, dict(y=y))
        assert set(terms) == {"loss", "mse", "mse_v"} and all(torch.isfinite(v).all() for v in terms.values())
        optimizer.zero_grad()
        terms["loss"].mean().backward()
        optimizer.step()
    # the zero-initialised readout and modulations moved off zero: the guidance conditions receive gradients
    for embedder in model.guidance_embedders():
        assert embedder.mlp[0].weight.grad.abs().sum() > 0


class Recorder(torch.nn.Module):
    """u = 0, recording what each call was told."""
    num_classes = 10

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, z, t, y=None, dt=None, **kwargs):
        self.calls.append(dict(t=t.clone(), dt=dt.clone(), y=y.clone(), **{k: v.clone() for k, v in kwargs.items()}))
        return torch.zeros_like(z)


def test_sampler_hands_the_network_its_guidance_one_call_a_jump():
    model, labels = Recorder(), torch.tensor([3, 10])
    sample(model, torch.zeros(2, 1, 2, 2), labels, null_class=10, steps=2, cfg_scale=4.0, guidance_low=0.3,
           guidance_high=0.7, diffusion_kwargs=IMF)
    assert len(model.calls) == 2   # no classifier-free guidance around the network
    for call, t in zip(model.calls, (1.0, 0.5)):
        assert torch.equal(call["t"], torch.full((2,), t)) and torch.equal(call["dt"], torch.full((2,), 0.5))
        assert torch.equal(call["y"], labels)
        torch.testing.assert_close(call["guidance"], torch.tensor([[0.75, 0.3, 0.7], [0.0, 0.3, 0.7]]))   # null: 1
    model.calls.clear()
    sample(model, torch.zeros(2, 1, 2, 2), labels, null_class=10, steps=1, diffusion_kwargs=IMF)
    torch.testing.assert_close(model.calls[0]["guidance"], torch.tensor([[0.0, 0.0, 1.0]] * 2))   # defaults
    model.calls.clear()   # MeanFlow (variant=mf) is guided from outside as before (one batch of 2N), told no conditions
    sample(model, torch.zeros(2, 1, 2, 2), labels, null_class=10, steps=1, cfg_scale=4.0,
           diffusion_kwargs={"objective": "meanflow"})
    assert len(model.calls) == 1 and len(model.calls[0]["y"]) == 4 and "guidance" not in model.calls[0]


@pytest.mark.slow
def test_train_and_sample_scripts(tmp_path):
    """train.py builds the guidance conditions into the network and records them; sample.py tells it its scale."""
    run_dir = tmp_path / "imf"
    train_script.train(compose_config(overrides=[*TINY, "diffusion=meanflow", "diffusion.variant=imf",
                                                 "sample.steps=1", "sample.cfg_scale=2.0", "fid.at_end=false",
                                                 f"run_dir={run_dir}"]))
    ckpt = final_state(run_dir)
    assert ckpt["model_args"]["guidance_cond"] is True and ckpt["config"]["diffusion"]["variant"] == "imf"
    assert "omega_embedder.mlp.0.weight" in ckpt["model"]
    assert any("mse_v" in row for row in read_run_metrics(run_dir))
    out = sample_script.run(compose_config("sample", [f"ckpt={run_dir}", "num_samples=4", "steps=2", "cfg_scale=3.0",
                                                      "guidance_low=0.2", "guidance_high=0.8", "device=cpu",
                                                      f"out={tmp_path}/samples"]))
    assert __import__("numpy").load(out / "samples.npz")["arr_0"].shape == (4, 8, 8, 1)
