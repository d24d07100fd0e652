"""Autoguidance (EDM2): the formula, its identities, the interval, every sampler, and sample.py's guide checks."""

import json

import numpy as np
import pytest
import torch

import sample as sample_script
import train as train_script
from conftest import TINY, compose_config, tiny_digits_dit
from diffusion.guidance import autoguidance
from diffusion.sampling import sample
from utils.errors import ConfigError


def toy(scale, calls=None):
    def model(x, t, y):
        if calls is not None:
            calls.append(len(x))
        return torch.tanh(scale * x + t.view(-1, 1, 1, 1) * 0.1 + y.view(-1, 1, 1, 1) * 0.01)
    return model


X, T, Y = torch.randn(3, 2, 4, 4), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 1, 2])


def test_autoguidance_is_the_weighted_sum_of_the_two_predictions():
    main, guide = toy(1.0), toy(0.5)
    for w in (0.0, 1.5, 2.5):
        out = autoguidance(main, guide, w)(X, T, Y)
        torch.testing.assert_close(out, w * main(X, T, Y) + (1 - w) * guide(X, T, Y))


def test_weight_one_is_the_unguided_model_and_a_guide_equal_to_the_model_is_the_identity():
    main = toy(1.0)
    assert autoguidance(main, toy(0.5), 1.0) is main
    assert torch.equal(autoguidance(main, main, 2.0)(X, T, Y), main(X, T, Y))


def test_the_interval_and_channels_compose_with_autoguidance():
    calls = []
    main, guide = toy(1.0), toy(0.5, calls)
    out = autoguidance(main, guide, 2.0, interval=(0.4, 1.0))(X, T, Y)
    expected = 2.0 * main(X, T, Y) - guide(X, T, Y)
    torch.testing.assert_close(out[1:], expected[1:])
    torch.testing.assert_close(out[0], main(X, T, Y)[0])          # t = 0.1 is outside: the main model alone
    calls.clear()
    autoguidance(main, guide, 2.0, interval=(0.95, 1.0))(X, T, Y)
    assert calls == []                                           # nothing inside: the guide never runs
    out = autoguidance(main, guide, 2.0, cfg_channels=1)(X, T, Y)
    torch.testing.assert_close(out[:, 1:], main(X, T, Y)[:, 1:])
    torch.testing.assert_close(out[:, :1], (2.0 * main(X, T, Y) - guide(X, T, Y))[:, :1])


def small(seed, learn_sigma):
    torch.manual_seed(seed)
    model = tiny_digits_dit(patch_size=4, learn_sigma=learn_sigma).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)   # not the zero-initialised output
    return model


@pytest.mark.parametrize("sampler, objective", [("ddpm", "ddpm"), ("ddim", "ddpm"), ("dpm-solver++", "ddpm"),
                                                ("ode", "flow"), ("sde", "flow")])
def test_every_sampler_takes_autoguidance(sampler, objective):
    diffusion = {"objective": "ddpm"} if objective == "ddpm" else compose_config(overrides=["diffusion=flow"]).diffusion
    diffusion = dict(diffusion)
    main, guide = small(0, objective == "ddpm"), small(1, objective == "ddpm")
    noise, labels = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 4])
    run = lambda **kw: sample(main, noise, labels, null_class=10, sampler=sampler, steps=4, diffusion_kwargs=diffusion,
                              generator=torch.Generator().manual_seed(1), **kw)
    with torch.no_grad():
        torch.manual_seed(2)
        plain = run()
        torch.manual_seed(2)
        same = run(guidance="auto", guide_model=main, cfg_scale=2.0)      # guide = model: the identity
        torch.manual_seed(2)
        guided = run(guidance="auto", guide_model=guide, cfg_scale=2.0)
    torch.testing.assert_close(same, plain)
    assert not torch.allclose(guided, plain)
    with pytest.raises(ConfigError, match="guidance=auto with a guide model"):
        run(guidance="auto")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("autoguide")
    train_script.train(compose_config(overrides=[*TINY, f"run_dir={root}/main"]))
    train_script.train(compose_config(overrides=[*TINY, "model=DiT-Mini-4", "train.steps=2", f"run_dir={root}/small"]))
    train_script.train(compose_config(overrides=[*TINY, "diffusion=ddpm", "train.steps=2", f"run_dir={root}/ddpm"]))
    return root


def test_sample_py_guides_with_a_smaller_model_and_with_an_earlier_checkpoint(runs, tmp_path):
    base = [f"ckpt={runs}/main", "num_samples=4", "batch_size=4", "steps=3", "device=cpu", "cfg_scale=2.0"]
    plain = sample_script.run(compose_config("sample", [*base, "cfg_scale=1.0", f"out={tmp_path}/plain"]))
    for name, guide in (("small", f"{runs}/small"), ("early", f"{runs}/main/checkpoints/0000002.pt")):
        out = sample_script.run(compose_config("sample", [*base, "guidance=auto", f"guide_ckpt={guide}",
                                                          f"out={tmp_path}/{name}"]))
        info = json.loads((out / "samples.json").read_text())
        assert info["guidance"] == "auto" and info["guide"].startswith(str(runs))
        assert not np.array_equal(np.load(out / "samples.npz")["arr_0"], np.load(plain / "samples.npz")["arr_0"])


def test_a_guide_that_does_not_fit_is_refused(runs, tmp_path):
    base = [f"ckpt={runs}/main", "num_samples=2", "steps=2", "device=cpu", f"out={tmp_path}/s"]
    with pytest.raises(ConfigError, match="does not fit the model: .*diffusion"):
        sample_script.run(compose_config("sample", [*base, "guidance=auto", f"guide_ckpt={runs}/ddpm"]))
    with pytest.raises(ConfigError, match="needs guide_ckpt"):
        sample_script.run(compose_config("sample", [*base, "guidance=auto"]))
    with pytest.raises(ConfigError, match="add guidance=auto"):
        sample_script.run(compose_config("sample", [*base, f"guide_ckpt={runs}/small"]))
