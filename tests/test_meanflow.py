"""MeanFlow (diffusion/meanflow.py): the JVP against finite differences, the Gaussian closed form, parity with the
official PyTorch code (Gsunshine/py-meanflow), the guided target, the draws, the network's second time, and training,
resuming and sampling through train.py and sample.py.

Parity: tests/data/meanflow_reference.pt holds py-meanflow's loss, gradients and RNG use on a fixed network, recorded
by tests/reference/make_meanflow_reference.py (its docstring says how to regenerate it); set MEANFLOW_OFFICIAL_PATH to a
py-meanflow checkout to also compare live. Tolerance: 1e-5 relative, and the same number of random draws.
"""

import functools
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import sample as sample_script
import train as train_script
from conftest import TINY, assert_same_state, compose_config, final_state, load_reference_script, read_run_metrics, \
    rel_err, tiny_dit, tiny_unet
from diffusion import build_objective
from diffusion.meanflow import exact_gaussian_u, jvp, marginal_velocity
from diffusion.sampling import resolve_sampler, sample
from models.mup import classify
from utils.checkpoint import latest_checkpoint
from utils.errors import ConfigError

TESTS = Path(__file__).resolve().parent
gen = load_reference_script("make_meanflow_reference")


def randomized(model, seed=0, std=0.05):
    """The model with every zero-initialised tensor (adaLN-Zero, the zero readout) drawn at random, so outputs and
    their derivatives are not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# ------------------------------------------------------------------------------------------------------------
# The JVP: finite differences, attention kernels
# ------------------------------------------------------------------------------------------------------------

def _jvp_case(model, channels):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, channels, 8, 8, generator=g)
    v = torch.randn(4, channels, 8, 8, generator=g)
    t, r = torch.tensor([0.9, 0.6, 0.35, 0.2]), torch.tensor([0.1, 0.6, 0.05, 0.0])
    y = torch.tensor([1, 2, 3, 10])
    net = build_objective({"objective": "meanflow"}).network(model)

    def fd(h=1e-2):
        """Central differences in float64 along (v, 1, 0), Richardson-extrapolated (error O(h^4)): the timestep
        features are computed in fp32 even in a float64 network, so a small step would measure their rounding."""
        m64 = build_objective({"objective": "meanflow"}).network(model.double())
        d = lambda e: (m64((z + e * v).double(), (t + e).double(), r.double(), y) -
                       m64((z - e * v).double(), (t - e).double(), r.double(), y)) / (2 * e)
        return (4 * d(h / 2) - d(h)) / 3
    return net, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)), y, fd


@pytest.mark.parametrize("network", ["dit", "unet"])
def test_jvp_matches_finite_differences_in_fp32(network):
    model = randomized(tiny_dit(learn_sigma=False, second_time=True) if network == "dit" else
                       tiny_unet(learn_sigma=False, second_time=True)).eval()
    net, primals, tangents, y, fd = _jvp_case(model, 4 if network == "dit" else 1)
    out, dudt = jvp(lambda *a: net(*a, y), primals, tangents)
    with sdpa_kernel(SDPBackend.MATH):
        assert torch.equal(out, net(*primals, y))   # the primal is the plain forward pass (with the same kernel)
    reference = fd()
    assert reference.abs().max() > 1e-3   # a derivative worth comparing
    assert rel_err(dudt, reference) < 1e-4


def test_jvp_under_bf16_autocast_is_the_derivative_to_bf16_precision():
    model = randomized(tiny_dit(learn_sigma=False, second_time=True)).eval()
    net, primals, tangents, y, fd = _jvp_case(model, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, dudt = jvp(lambda *a: net(*a, y), primals, tangents)
    assert out.dtype == torch.bfloat16 and dudt.dtype == torch.bfloat16
    assert rel_err(dudt.float(), fd()) < 3e-2


def test_jvp_uses_the_math_kernel_inside_only():
    """The fused kernels have no forward-mode derivative; jvp picks the math kernel even when the run forced a fused
    one, and leaves the run's choice in place around it."""
    q = torch.randn(2, 2, 16, 8)
    model = randomized(tiny_dit(learn_sigma=False, second_time=True)).eval()
    net, primals, tangents, y, _ = _jvp_case(model, 4)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        _, dudt = jvp(lambda *a: net(*a, y), primals, tangents)
        assert torch.isfinite(dudt).all()
        try:   # still the fused kernel out here: forward AD through it fails (while PyTorch lacks its derivative)
            with fwAD.dual_level():
                F.scaled_dot_product_attention(*(fwAD.make_dual(q, torch.ones_like(q)),) * 3)
        except RuntimeError as error:
            assert "forward AD" in str(error)
        else:
            pytest.skip("this PyTorch's CPU flash kernel has a forward-mode derivative")


# ------------------------------------------------------------------------------------------------------------
# Closed forms on Gaussian data
# ------------------------------------------------------------------------------------------------------------

MEAN = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64).view(1, 4, 1, 1)
STD = torch.tensor([0.3, 1.0, 0.05, 0.0], dtype=torch.float64).view(1, 4, 1, 1)   # 0: a point mass


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampler_on_the_exact_average_velocity_maps_noise_to_the_data(steps):
    """u of N(mean, std^2) data is known in closed form; each jump is then exact, so noise eps lands on the data point
    mean + std * eps its trajectory leads to, in any number of steps."""
    noise = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    objective = build_objective({"objective": "meanflow"})
    x = objective.sample(exact_gaussian_u(MEAN, STD), noise, torch.zeros(5, dtype=torch.long), steps)
    torch.testing.assert_close(x, MEAN + STD * noise, rtol=0, atol=1e-12)
    x = sample(exact_gaussian_u(MEAN, STD), noise, torch.zeros(5, dtype=torch.long), null_class=0, steps=steps,
               diffusion_kwargs={"objective": "meanflow"})   # the same through the common entry point
    torch.testing.assert_close(x, MEAN + STD * noise, rtol=0, atol=1e-12)


def test_loss_vanishes_at_the_exact_average_velocity():
    """With the instantaneous velocity equal to the marginal one (x = z - t v, eps = z + (1 - t) v give z_t = z and
    eps - x = v(z, t)), the exact u satisfies the MeanFlow identity: the target is u itself, for r = t and r < t."""
    g = torch.Generator().manual_seed(1)
    objective = build_objective({"objective": "meanflow", "norm_p": 0.0, "ratio_r_neq_t": 0.5})
    tr, _ = objective.draw(g, 64, (4, 3, 3), "cpu")
    tr = tr.double()
    z = torch.randn(64, 4, 3, 3, dtype=torch.float64, generator=g)
    t = tr[:, 0].view(-1, 1, 1, 1)
    v = marginal_velocity(MEAN, STD)(z, tr[:, 0])
    x, noise = z - t * v, z + (1 - t) * v
    assert (tr[:, 0] > tr[:, 1]).any() and (tr[:, 0] == tr[:, 1]).any()
    terms = objective.losses(exact_gaussian_u(MEAN, STD), x, tr, noise, dict(y=None))
    assert terms["loss"].max() < 1e-20
    wrong = lambda z_, t_, y=None, dt=None: exact_gaussian_u(MEAN, STD)(z_, t_, y, dt) * 1.01
    assert objective.losses(wrong, x, tr, noise, dict(y=None))["loss"].min() > 1e-8


# ------------------------------------------------------------------------------------------------------------
# Parity with py-meanflow
# ------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _reference(source):
    if source == "stored":
        return torch.load(TESTS / "data" / "meanflow_reference.pt", weights_only=True)
    return gen.make_reference(*gen.load_official(os.environ["MEANFLOW_OFFICIAL_PATH"]))


@pytest.fixture(scope="module", params=[
    "stored",
    pytest.param("live", marks=pytest.mark.skipif(not os.environ.get("MEANFLOW_OFFICIAL_PATH"),
                                                  reason="set MEANFLOW_OFFICIAL_PATH to a Gsunshine/py-meanflow checkout")),
])
def reference(request):
    return _reference(request.param)


def test_reference_covers_every_case(reference):
    assert set(reference["cases"]) == set(gen.CASES) and reference["commit"]


@pytest.mark.parametrize("case", list(gen.CASES))
def test_loss_gradients_and_draws_match_py_meanflow(reference, case):
    expected = reference["cases"][case]
    objective = build_objective(gen.our_config(case))
    net, x = gen.FixedNet(), gen.inputs()
    generator = torch.Generator().manual_seed(gen.SEED)
    tr, noise = objective.draw(generator, len(x), tuple(x.shape[1:]), "cpu")
    loss = objective.losses(net, x, tr, noise, dict(y=None))["loss"].mean()
    after = torch.rand(1, generator=generator)
    loss.backward()
    assert rel_err(loss.detach(), expected["loss"]) < 1e-5
    for name, p in net.named_parameters():
        assert rel_err(p.grad, expected["grads"][name]) < 1e-5, name
    assert torch.equal(after, expected["after"]), "a different number of random draws than py-meanflow"


# ------------------------------------------------------------------------------------------------------------
# Guidance, draws, configuration
# ------------------------------------------------------------------------------------------------------------

class LabelNet(torch.nn.Module):
    """u = z * (1 + y / 10) + t - dt: depends on the label, so conditional and unconditional velocities differ."""
    num_classes = 10

    def forward(self, z, t, y=None, dt=None):
        return z * (1 + y.view(-1, 1, 1, 1) / 10) + (t - dt).view(-1, 1, 1, 1)


def test_guided_target_is_the_official_formula():
    omega, kappa = 1.5, 0.3
    objective = build_objective({"objective": "meanflow", "omega": omega, "kappa": kappa,
                                 "guidance_interval": [0.0, 0.7]})
    model = LabelNet()
    z, v = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    t = torch.tensor([0.2, 0.5, 0.9, 0.3])      # the third is outside the interval
    y = torch.tensor([1, 4, 4, 10])             # the fourth had its label dropped
    v_g = objective.guided_velocity(objective.network(model), z, t, v, y, 10)
    u_c, u_u = model(z, t, y, dt=torch.zeros(4)), model(z, t, torch.full_like(y, 10), dt=torch.zeros(4))
    expected = omega * v + (1 - omega - kappa) * u_u + kappa * u_c
    torch.testing.assert_close(v_g[:2], expected[:2])
    torch.testing.assert_close(v_g[2:], v[2:])
    # omega alone (kappa = 0) is classifier-free guidance with the unconditional velocity: omega v + (1 - omega) u_u
    plain = build_objective({"objective": "meanflow", "omega": 2.0}).guided_velocity(
        objective.network(model), z, t, v, y, 10)
    torch.testing.assert_close(plain[:3], (2 * v + (1 - 2) * u_u)[:3])


def test_draws_are_sorted_shared_and_sliceable():
    objective = build_objective({"objective": "meanflow", "ratio_r_neq_t": 0.25})
    tr, noise = objective.draw(torch.Generator().manual_seed(0), 4000, (1, 2, 2), "cpu")
    assert tr.shape == (4000, 2) and noise.shape == (4000, 1, 2, 2)
    assert (tr[:, 1] <= tr[:, 0]).all() and ((tr > 0) & (tr < 1)).all()
    assert abs((tr[:, 0] != tr[:, 1]).float().mean().item() - 0.25) < 0.03
    again, _ = objective.draw(torch.Generator().manual_seed(0), 4000, (1, 2, 2), "cpu")
    assert torch.equal(tr, again) and torch.equal(tr[10:20], again[10:20])   # what a rank's slice sees


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="valid keys"):
        build_objective({"objective": "meanflow", "omgea": 2.0})
    with pytest.raises(ConfigError, match="kappa"):
        build_objective({"objective": "meanflow", "kappa": 1.0})
    with pytest.raises(ConfigError, match="guidance_interval"):
        build_objective({"objective": "meanflow", "guidance_interval": [0.8, 0.2]})
    with pytest.raises(ConfigError, match="ratio_r_neq_t"):
        build_objective({"objective": "meanflow", "ratio_r_neq_t": 1.5})


def test_samplers_fit_their_objective():
    assert resolve_sampler({"objective": "meanflow"}) == ("meanflow", 1)
    assert resolve_sampler({"objective": "meanflow"}, "meanflow", 4) == ("meanflow", 4)
    with pytest.raises(ConfigError, match="one-step model predicts jumps"):
        resolve_sampler({"objective": "meanflow"}, "ode")
    with pytest.raises(ConfigError, match="diffusion=meanflow"):
        resolve_sampler({"objective": "flow"}, "meanflow")


def test_second_time_leaves_the_official_networks_alone():
    for build in (tiny_dit, tiny_unet):
        plain, second = build(), build(second_time=True)
        extra = set(second.state_dict()) - set(plain.state_dict())
        assert extra and all(k.startswith("dt_embedder.") for k in extra)
        assert not any("dt_embedder" in k for k in plain.state_dict())
        with pytest.raises(ConfigError, match="without second_time"):
            plain(torch.zeros(1, plain.in_channels, 8, 8), torch.zeros(1), dt=torch.zeros(1))
    roles = classify(tiny_dit(second_time=True))
    assert roles["dt_embedder.mlp.0.weight"] == "input" and roles["dt_embedder.mlp.2.weight"] == "hidden"


# ------------------------------------------------------------------------------------------------------------
# Through train.py and sample.py
# ------------------------------------------------------------------------------------------------------------

MEANFLOW = [*TINY, "diffusion=meanflow", "diffusion.omega=1.5", "diffusion.kappa=0.2", "sample.steps=1",
            "fid.at_end=false"]


@pytest.fixture(scope="module")
def meanflow_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("meanflow")
    train_script.train(compose_config(overrides=[*MEANFLOW, f"run_dir={run_dir}"]))
    return run_dir


def test_training_records_the_objective_and_the_second_time(meanflow_run):
    ckpt = final_state(meanflow_run)
    assert ckpt["step"] == 4 and ckpt["config"]["diffusion"]["objective"] == "meanflow"
    assert ckpt["model_args"]["second_time"] is True and ckpt["model_args"]["learn_sigma"] is False
    assert "dt_embedder.mlp.0.weight" in ckpt["model"]
    row = [r for r in read_run_metrics(meanflow_run) if "loss" in r][-1]
    assert 0 < row["loss"] < 1 and row["mse"] > 0   # p = 1: ||err||^2 / (||err||^2 + eps) < 1


def test_resume_continues_exactly(meanflow_run, tmp_path):
    shutil.copytree(meanflow_run, tmp_path / "resumed")
    (tmp_path / "resumed" / "checkpoints" / "0000004.pt").unlink()
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").stem == "0000002"
    train_script.train(compose_config(overrides=[*MEANFLOW, f"run_dir={tmp_path}/resumed"]))
    assert_same_state(final_state(meanflow_run), final_state(tmp_path / "resumed"))


def test_sample_script_draws_in_one_step_and_refuses_other_samplers(meanflow_run, tmp_path):
    out = sample_script.run(compose_config("sample", [f"ckpt={meanflow_run}", "num_samples=6", "device=cpu",
                                                      f"out={tmp_path}/one"]))
    provenance = __import__("json").loads((out / "samples.json").read_text())
    assert provenance["sampler"] == "meanflow" and provenance["steps"] == 1 and provenance["objective"] == "meanflow"
    out = sample_script.run(compose_config("sample", [f"ckpt={meanflow_run}", "num_samples=4", "sampler=meanflow",
                                                      "steps=2", "cfg_scale=1.5", "device=cpu", f"out={tmp_path}/two"]))
    assert __import__("numpy").load(out / "samples.npz")["arr_0"].shape == (4, 8, 8, 1)
    with pytest.raises(ConfigError, match="does not fit a model trained with diffusion.objective=meanflow"):
        sample_script.run(compose_config("sample", [f"ckpt={meanflow_run}", "sampler=ode", "device=cpu"]))


def test_eval_loss_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match="eval.every=0"):
        train_script.train(compose_config(overrides=[*MEANFLOW, "eval.every=2", f"run_dir={tmp_path}/r"]))
