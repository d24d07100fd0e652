"""Parity with the official willisma/SiT `transport` package: losses, ODE, SDE and likelihood.

The reference values live in tests/data/sit_reference.pt, recorded from SiT by tests/reference/make_sit_reference.py
(its docstring says how to regenerate them). Set SIT_OFFICIAL_PATH to a SiT checkout to also compare live.

Tolerance: 1e-5 relative to the largest magnitude of the reference (1e-4 for adaptive dopri5), and the same number of
random draws consumed (the next draw of torch's global RNG after each call is equal).
"""

import functools
import os
from pathlib import Path

import pytest
import torch

from conftest import load_reference_script, rel_err
from diffusion import Sampler, create_transport

TESTS = Path(__file__).resolve().parent
REFERENCE_FILE = TESTS / "data" / "sit_reference.pt"


gen = load_reference_script("make_sit_reference")


@functools.lru_cache(maxsize=None)
def _reference(source):
    if source == "stored":
        return torch.load(REFERENCE_FILE, weights_only=True)
    return gen.make_reference(*gen.load_official(os.environ["SIT_OFFICIAL_PATH"]))


@pytest.fixture(scope="module", params=[
    "stored",
    pytest.param("live", marks=pytest.mark.skipif(not os.environ.get("SIT_OFFICIAL_PATH"),
                                                  reason="set SIT_OFFICIAL_PATH to a willisma/SiT checkout")),
])
def reference(request):
    return _reference(request.param)


def seeded(fn):
    torch.manual_seed(gen.SEED)
    out = fn()
    return out, torch.rand(1)


X, Y = gen.inputs()
NOISE = torch.randn(gen.SHAPE, generator=torch.Generator().manual_seed(99))
KW = dict(y=Y)


def test_reference_covers_every_case(reference):
    assert len(reference["losses"]) == 27
    assert len(reference["ode"]) == 3 * 3 * len(gen.ODE_METHODS) - len(gen.ODE_UNSOLVABLE) + 1
    assert len(reference["likelihood"]) == 6
    assert reference["commit"]  # which SiT produced it


@pytest.mark.parametrize("path", gen.PATHS)
@pytest.mark.parametrize("prediction", gen.PREDICTIONS)
@pytest.mark.parametrize("weight", gen.WEIGHTS)
def test_training_losses(reference, path, prediction, weight):
    expected = reference["losses"][f"{path}/{prediction}/{weight}"]
    terms, after = seeded(lambda: create_transport(path, prediction, weight).training_losses(gen.fixed_model, X, KW))
    assert rel_err(terms["loss"], expected["loss"]) < 1e-5
    assert rel_err(terms["pred"], expected["pred"]) < 1e-5
    assert torch.equal(after, expected["after"]), "a different number of random draws than SiT"


def test_ode(reference):
    checked = 0
    for key, expected in reference["ode"].items():
        path, prediction, method, *rest = key.split("/")
        fn = Sampler(create_transport(path, prediction)).sample_ode(sampling_method=method, num_steps=gen.ODE_STEPS,
                                                                    reverse=bool(rest))
        traj, after = seeded(lambda: fn(X if rest else NOISE, gen.fixed_model, **KW))
        tol = 1e-4 if method == "dopri5" else 1e-5
        assert rel_err(traj, expected["traj"]) < tol, key
        assert torch.equal(after, expected["after"]), key
        checked += 1
    assert checked == len(reference["ode"])


def test_sde(reference):
    checked = 0
    for key, expected in reference["sde"].items():
        if "SBDM_" in key:
            continue
        path, prediction, method, form, last, size = key.split("/")
        fn = Sampler(create_transport(path, prediction)).sample_sde(
            sampling_method=method, diffusion_form=form, last_step=None if last == "None" else last,
            last_step_size=float(size), num_steps=gen.SDE_STEPS)
        traj, after = seeded(lambda: torch.stack(fn(NOISE, gen.fixed_model, **KW)))
        assert rel_err(traj, expected["traj"]) < 1e-5, key
        assert torch.equal(after, expected["after"]), key
        checked += 1
    assert checked >= 45


@pytest.mark.parametrize("path", ["Linear", "GVP"])
def test_sbdm_with_a_velocity_model_is_finite_where_sit_is_nan(reference, path):
    """SiT starts the SBDM SDE of a velocity model at t = 0, where D(t) is infinite; we start at SBDM_T0 = 1e-3, which
    is SiT's own computation with sample_eps = 1e-3."""
    assert bool(reference["sde"][f"{path}/velocity/SBDM_nan"]), "SiT's SBDM velocity SDE was expected to be NaN"
    expected = reference["sde"][f"{path}/velocity/SBDM_t0=1e-3"]
    fn = Sampler(create_transport(path, "velocity")).sample_sde(diffusion_form="SBDM", num_steps=gen.SDE_STEPS)
    traj, after = seeded(lambda: torch.stack(fn(NOISE, gen.fixed_model, **KW)))
    assert torch.isfinite(traj).all()
    assert rel_err(traj, expected["traj"]) < 1e-5
    assert torch.equal(after, expected["after"])


def test_likelihood(reference):
    for key, expected in reference["likelihood"].items():
        path, prediction, method = key.split("/")
        fn = Sampler(create_transport(path, prediction)).sample_ode_likelihood(sampling_method=method,
                                                                               num_steps=gen.ODE_STEPS)
        (logp, z), after = seeded(lambda: fn(X, gen.fixed_model, **KW))
        tol = 1e-4 if method == "dopri5" else 1e-5
        assert rel_err(logp, expected["logp"]) < tol, key
        assert rel_err(z, expected["z"]) < tol, key
        if method != "dopri5":
            # One Hutchinson probe per drift evaluation: a fixed grid draws exactly as SiT does. dopri5 draws once per
            # evaluation too, but how many evaluations it makes (accepted and rejected steps) turns on its error
            # estimate, which rounding differences between CPUs and kernels can tip either way (seen 2026-12-03).
            assert torch.equal(after, expected["after"]), key


def test_likelihood_works_with_gradients_enabled():
    """SiT's likelihood needs torch.set_grad_enabled(False) around it (it sets requires_grad on a non-leaf state
    otherwise); ours runs either way and gives the same numbers."""
    fn = Sampler(create_transport()).sample_ode_likelihood(sampling_method="euler", num_steps=4)
    (with_grad, _), _ = seeded(lambda: fn(X, gen.fixed_model, **KW))
    with torch.no_grad():
        (without, _), _ = seeded(lambda: fn(X, gen.fixed_model, **KW))
    torch.testing.assert_close(with_grad, without)
