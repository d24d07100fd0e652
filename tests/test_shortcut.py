"""Shortcut models (diffusion/shortcut.py): the Gaussian closed forms, the self-consistency targets and their EMA
network, the draws and the batch split, the sampler's step sizes, and training, resuming and sampling through train.py
and sample.py.
"""

import json
import shutil

import numpy as np
import pytest
import torch

import sample as sample_script
import train as train_script
from conftest import TINY, assert_same_state, compose_config, final_state, read_run_metrics
from diffusion import build_objective
from diffusion.sampling import resolve_sampler, sample
from diffusion.shortcut import PATH_EPS
from utils.checkpoint import latest_checkpoint
from utils.errors import ConfigError

MEAN = torch.tensor([0.5, -1.0, 1.5, 0.0], dtype=torch.float64).view(1, 4, 1, 1)
STD = torch.tensor([0.3, 1.0, 0.05, 0.0], dtype=torch.float64).view(1, 4, 1, 1)


def spread(t):
    """The standard deviation of x_t = (1 - (1 - 1e-5) t) x_0 + t x_1 for N(MEAN, STD^2) data (per value)."""
    return torch.sqrt((1 - (1 - PATH_EPS) * t) ** 2 + t ** 2 * STD ** 2)


def exact_shortcut(x, t, y=None, dt=None):
    """The exact jump of N(MEAN, STD^2) data's flow from t to t + d, d = 2^-level, divided by d: trajectories keep
    (x_t - t MEAN) / spread(t), so s = MEAN + (spread(t + d) / spread(t) - 1) (x - t MEAN) / d."""
    t, d = t.view(-1, 1, 1, 1), (2.0 ** -dt).view(-1, 1, 1, 1)
    return MEAN + (spread(t + d) / spread(t) - 1) * (x - t * MEAN) / d


def velocity(x, t):
    """The marginal velocity E[x_1 - (1 - 1e-5) x_0 | x_t = x] (the derivative of the flow map)."""
    t = t.view(-1, 1, 1, 1)
    ds = (-(1 - PATH_EPS) * (1 - (1 - PATH_EPS) * t) + t * STD ** 2) / spread(t) ** 2
    return MEAN + ds * (x - t * MEAN)


def consistent(levels):
    """The fixed point of the shortcut objective with `levels` = log2 M: the marginal velocity at the finest level,
    and at every coarser one the mean of two half steps of the next finer level (what the targets ask)."""
    def s(x, t, y=None, dt=None):
        out = torch.empty_like(x)
        finest = dt == levels
        out[finest] = velocity(x[finest], t[finest])
        if (~finest).any():
            xc, tc, lc = x[~finest], t[~finest], dt[~finest]
            half = (2.0 ** -(lc + 1)).view(-1, 1, 1, 1)
            v1 = s(xc, tc, None, lc + 1)
            v2 = s(xc + half * v1, tc + half.flatten(), None, lc + 1)
            out[~finest] = (v1 + v2) / 2
        return out
    return s


# ------------------------------------------------------------------------------------------------------------
# Closed forms
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 8])
def test_sampler_on_the_exact_shortcut_maps_noise_to_the_data(steps):
    noise = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = MEAN + spread(torch.tensor(1.0, dtype=torch.float64)) / spread(torch.tensor(0.0)) * noise
    objective = build_objective({"objective": "shortcut", "denoise_timesteps": 8})
    x = objective.sample(exact_shortcut, noise, torch.zeros(5, dtype=torch.long), steps)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-12)
    x = sample(exact_shortcut, noise, torch.zeros(5, dtype=torch.long), null_class=0, steps=steps,
               diffusion_kwargs={"objective": "shortcut", "denoise_timesteps": 8})
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-12)


def test_loss_vanishes_at_the_self_consistent_model():
    """x_0 = z - t v, x_1 = v + (1 - 1e-5) x_0 give x_t = z and the conditional velocity v(z, t): the flow-matching
    target is then the marginal velocity, and every self-consistency target is the model's own two half steps."""
    objective = build_objective({"objective": "shortcut", "denoise_timesteps": 8, "bootstrap_every": 2,
                                 "bootstrap_ema": False})
    g = torch.Generator().manual_seed(1)
    tl, _ = objective.draw(g, 64, (4, 2, 2), "cpu")
    tl = tl.double()
    t = tl[:, 0].view(-1, 1, 1, 1)   # points of the flow (within 2 sd), where the targets need no clipping
    z = t * MEAN + spread(t) * torch.randn(64, 4, 2, 2, dtype=torch.float64, generator=g).clamp(-2, 2)
    v = velocity(z, tl[:, 0])
    x0 = z - t * v
    x1 = v + (1 - PATH_EPS) * x0
    model = consistent(objective.levels)
    assert (tl[:, 1] < 3).sum() == 32 and set(tl[:, 1].tolist()) == {0.0, 1.0, 2.0, 3.0}
    assert objective.losses(model, x1, tl, x0, dict(y=None))["loss"].max() < 1e-24
    shifted = lambda x, t, y=None, dt=None: model(x, t, y, dt) + 1e-3 * (dt < 3).view(-1, 1, 1, 1)
    loss = objective.losses(shifted, x1, tl, x0, dict(y=None))["loss"]
    assert (loss[tl[:, 1] < 3] > 0).all() and loss[tl[:, 1] == 3].max() < 1e-24   # a wrong coarse step is seen


# ------------------------------------------------------------------------------------------------------------
# Targets, draws, sampler
# ------------------------------------------------------------------------------------------------------------

class Affine(torch.nn.Module):
    """s = a x + b t + c dt + y / 10, one value each: a stand-in whose EMA copy can differ."""
    num_classes = 10

    def __init__(self, a):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))

    def forward(self, x, t, y=None, dt=None):
        shape = (-1, 1, 1, 1)
        return self.a * x + 0.1 * t.view(shape) + 0.01 * dt.view(shape) + (0 if y is None else y.view(shape) / 10)


def test_targets_come_from_the_ema_network_and_are_guided_at_the_finest_level():
    objective = build_objective({"objective": "shortcut", "denoise_timesteps": 4, "bootstrap_every": 2,
                                 "target_cfg_scale": 2.0})
    model, ema = Affine(0.5), Affine(-0.3)
    with pytest.raises(ConfigError, match="EMA"):
        objective.losses(model, torch.zeros(2, 1, 2, 2), torch.tensor([[0.0, 0.0], [0.0, 2.0]]),
                         torch.zeros(2, 1, 2, 2), dict(y=torch.tensor([1, 2])))
    objective.attach_ema(ema)
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(4, 1, 2, 2, generator=g), torch.randn(4, 1, 2, 2, generator=g)
    tl = torch.tensor([[0.5, 1.0], [0.25, 2.0], [0.0, 0.0], [0.75, 2.0]])   # levels 1 (finest bootstrapped), 0; 2 = flow
    y = torch.tensor([3, 4, 10, 6])
    loss = objective.losses(model, x, tl, noise, dict(y=y))["loss"]
    x_t = (1 - (1 - PATH_EPS) * tl[:, 0].view(-1, 1, 1, 1)) * noise + tl[:, 0].view(-1, 1, 1, 1) * x
    net = objective.network(ema)

    def step(xx, tt, level, label, guided):
        v = net(xx, tt, level, label)
        return net(xx, tt, level, torch.full_like(label, 10)) + 2.0 * (v - net(xx, tt, level, torch.full_like(
            label, 10))) if guided else v

    for i, guided in ((0, True), (2, False)):   # sample 2 is level 0 (not the finest) and of the null class
        xi, ti, li, yi = x_t[i:i + 1], tl[i:i + 1, 0], tl[i:i + 1, 1], y[i:i + 1]
        half = 2.0 ** -(li + 1)
        v1 = step(xi, ti, li + 1, yi, guided)
        v2 = step((xi + half.view(-1, 1, 1, 1) * v1).clamp(-4, 4), ti + half, li + 1, yi, guided)
        target = ((v1 + v2) / 2).clamp(-4, 4)
        pred = objective.network(model)(xi, ti, li, yi)
        torch.testing.assert_close(loss[i], ((pred - target) ** 2).mean())
    v = x[1:2] - (1 - PATH_EPS) * noise[1:2]   # a flow-matching sample: the plain velocity target
    torch.testing.assert_close(loss[1], ((objective.network(model)(x_t[1:2], tl[1:2, 0], tl[1:2, 1], y[1:2]) - v)
                                         ** 2).mean())


def test_draws_split_the_batch_by_position_on_each_levels_grid():
    objective = build_objective({"objective": "shortcut"})
    tl, noise = objective.draw(torch.Generator().manual_seed(0), 4096, (1, 2, 2), "cpu")
    t, level = tl[:, 0], tl[:, 1]
    bootstrap = torch.arange(4096) % 8 == 0
    assert (level[bootstrap] < 7).all() and (level[~bootstrap] == 7).all()
    assert set(level[bootstrap].tolist()) == set(range(7))
    assert torch.equal(t * 2 ** level, torch.floor(t * 2 ** level)) and ((t >= 0) & (t < 1)).all()
    again, _ = objective.draw(torch.Generator().manual_seed(0), 4096, (1, 2, 2), "cpu")
    assert torch.equal(tl, again)


def test_sampler_steps_and_objective_fit():
    objective = build_objective({"objective": "shortcut", "denoise_timesteps": 8})
    for steps in (3, 16):
        with pytest.raises(ConfigError, match="power of 2"):
            objective.sample(exact_shortcut, torch.zeros(1, 4, 1, 1), torch.zeros(1, dtype=torch.long), steps)
    assert resolve_sampler({"objective": "shortcut"}) == ("shortcut", 1)
    with pytest.raises(ConfigError, match="does not fit"):
        resolve_sampler({"objective": "shortcut"}, "meanflow")
    with pytest.raises(ConfigError, match="power of 2"):
        build_objective({"objective": "shortcut", "denoise_timesteps": 100})


# ------------------------------------------------------------------------------------------------------------
# Through train.py and sample.py
# ------------------------------------------------------------------------------------------------------------

SHORTCUT = [*TINY, "diffusion=shortcut", "diffusion.target_cfg_scale=1.5", "sample.steps=1", "fid.at_end=false"]


@pytest.fixture(scope="module")
def shortcut_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("shortcut")
    train_script.train(compose_config(overrides=[*SHORTCUT, f"run_dir={run_dir}"]))
    return run_dir


def test_training_records_the_objective_and_resumes_exactly(shortcut_run, tmp_path):
    ckpt = final_state(shortcut_run)
    assert ckpt["config"]["diffusion"]["objective"] == "shortcut" and ckpt["model_args"]["second_time"] is True
    assert np.isfinite([r["loss"] for r in read_run_metrics(shortcut_run) if "loss" in r]).all()
    shutil.copytree(shortcut_run, tmp_path / "resumed")   # from step 2: the EMA targets come back with the EMA
    (tmp_path / "resumed" / "checkpoints" / "0000004.pt").unlink()
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").stem == "0000002"
    train_script.train(compose_config(overrides=[*SHORTCUT, f"run_dir={tmp_path}/resumed"]))
    assert_same_state(ckpt, final_state(tmp_path / "resumed"))


def test_sample_script_takes_power_of_two_steps(shortcut_run, tmp_path):
    out = sample_script.run(compose_config("sample", [f"ckpt={shortcut_run}", "num_samples=4", "device=cpu",
                                                      f"out={tmp_path}/one"]))
    provenance = json.loads((out / "samples.json").read_text())
    assert provenance["sampler"] == "shortcut" and provenance["steps"] == 1
    out = sample_script.run(compose_config("sample", [f"ckpt={shortcut_run}", "num_samples=4", "steps=4",
                                                      "cfg_scale=1.5", "device=cpu", f"out={tmp_path}/four"]))
    assert np.load(out / "samples.npz")["arr_0"].shape == (4, 8, 8, 1)
    with pytest.raises(ConfigError, match="does not fit a model trained with diffusion.objective=shortcut"):
        sample_script.run(compose_config("sample", [f"ckpt={shortcut_run}", "sampler=meanflow", "device=cpu"]))


@pytest.mark.slow
def test_sampler_benchmark_runs_a_shortcut_model_at_its_power_of_two_steps(shortcut_run, tmp_path):
    from conftest import run_script

    # The warm-up used to run every sampler at 3 steps, which a shortcut model refuses.
    run_script(["benchmarks/samplers.py", "--run", str(shortcut_run), "--num-samples", "10", "--batch-size", "10",
                "--samplers", "shortcut:1", "shortcut:2", "--out", f"{tmp_path}/bench"])
    rows = json.loads((tmp_path / "bench" / "samplers.json").read_text())["results"]
    assert [(r["sampler"], r["steps"], r["network_evals_per_sample"]) for r in rows] == [("shortcut", 1, 1.0),
                                                                                       ("shortcut", 2, 2.0)]
