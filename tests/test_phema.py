"""EDM2's post-hoc EMA math (utils/phema.py): the sigma_rel <-> gamma map, the profiles' inner products, the
reconstruction of one EMA from the snapshots of others, and the tracker."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from utils.errors import ConfigError
from utils.phema import (SIGMA_REL_MAX, PowerEMA, gamma_to_sigma_rel, power_beta, profile_inner, sigma_rel_to_gamma,
                         solve_coefficients)


@pytest.mark.parametrize("sigma_rel, gamma", [(0.010, 97.0), (0.050, 16.97), (0.100, 6.94), (0.200, 1.83)])
def test_sigma_rel_and_gamma_convert_both_ways(sigma_rel, gamma):
    assert sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, abs=0.01)        # EDM2's std_to_exp
    assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)


def test_the_longest_ema_is_the_uniform_average():
    assert gamma_to_sigma_rel(0.0) == pytest.approx(1 / math.sqrt(12))
    profile_std = lambda g: math.sqrt(quad(lambda u: (g + 1) * u ** g * u * u, 0, 1)[0]
                                      - quad(lambda u: (g + 1) * u ** g * u, 0, 1)[0] ** 2)
    assert gamma_to_sigma_rel(6.94) == pytest.approx(profile_std(6.94), rel=1e-8)   # std(p_t) / t, t = 1
    for bad in (0.0, SIGMA_REL_MAX, 0.3, -0.1):
        with pytest.raises(ConfigError, match="outside"):
            sigma_rel_to_gamma(bad)


def test_inner_products_match_numerical_integration():
    profile = lambda t, g: (lambda tau: (g + 1) / t * (tau / t) ** g if tau <= t else 0.0)
    for t_a, g_a, t_b, g_b in [(3.0, 6.94, 5.0, 16.97), (5.0, 16.97, 3.0, 6.94), (4.0, 2.0, 4.0, 7.0)]:
        numeric = quad(lambda tau: profile(t_a, g_a)(tau) * profile(t_b, g_b)(tau), 0, min(t_a, t_b), limit=200)[0]
        assert profile_inner(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-8)


def test_a_stored_profile_is_reconstructed_by_itself():
    times = np.repeat([100.0, 200.0, 300.0, 400.0], 2)
    gammas = np.tile([sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)], 4)
    x = solve_coefficients(times, gammas, 400.0, gammas[-1])
    np.testing.assert_allclose(x, np.eye(8)[-1], atol=1e-9)
    assert sum(x) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="no later than the target"):
        solve_coefficients(times, gammas, 300.0, gammas[0])


def test_power_beta_starts_by_copying_the_network():
    assert power_beta(6.94, 32, 32) == 0.0
    assert power_beta(0.0, 64, 32) == pytest.approx(0.5)        # gamma 0: the running mean


def test_a_reconstructed_ema_matches_one_tracked_directly():
    """Train a 'network' that wanders (a fixed random walk), track sigma_rel 0.05 and 0.10 with snapshots, and a
    third EMA (0.07) directly; the 0.07 reconstructed from the snapshots agrees with the tracked one."""
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Linear(8, 8, bias=False)
    stored, third = PowerEMA(net, (0.05, 0.10)), PowerEMA(net, (0.07,))
    batch, steps, every = 32, 2000, 100
    snapshots, walk = [], torch.zeros(8, 8)
    with torch.no_grad():
        for step in range(1, steps + 1):
            walk += torch.randn(8, 8, generator=g) * 0.05
            net.weight.copy_(walk + torch.sin(torch.tensor(step / 300.0)))   # drift plus a slow oscillation
            stored.update(net, step * batch, batch)
            third.update(net, step * batch, batch)
            if step % every == 0:
                snapshots += [(step * batch, gamma, ema[0].clone()) for gamma, ema in zip(stored.gammas, stored.emas)]
    times, gammas, weights = zip(*snapshots)
    x = solve_coefficients(times, gammas, steps * batch, sigma_rel_to_gamma(0.07))
    rebuilt = sum(float(c) * w for c, w in zip(x, weights))
    direct, last_raw, short = third.emas[0][0], net.weight, stored.emas[0][0]
    error = (rebuilt - direct).norm() / (direct - last_raw).norm()
    assert error < 0.01, f"reconstruction off by {error:.4f} of the EMA distance from the raw weights"   # measured 0.0003
    assert (short - direct).norm() > 3 * (rebuilt - direct).norm()   # closer than the nearest stored EMA


def test_the_tracker_state_round_trips():
    net = torch.nn.Linear(3, 3)
    ema = PowerEMA(net, (0.05,))
    ema.update(net, 10, 10)
    other = PowerEMA(net, (0.05,))
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ema.emas[0], other.emas[0]))
    with pytest.raises(ConfigError, match="track sigma_rel"):
        PowerEMA(net, (0.10,)).load_state_dict(ema.state_dict())


# ------------------------------------------------------------------------------------------------------------
# In training: snapshots, exact resume, reconstruction into a checkpoint sample.py reads
# ------------------------------------------------------------------------------------------------------------

def posthoc_run(run_dir, steps=6):
    import train as train_script
    from conftest import TINY, compose_config
    train_script.train(compose_config(overrides=[*TINY, f"train.steps={steps}", "train.ckpt_every=3",
                                                 "ema.posthoc=true", "ema.snapshot_every=32", f"run_dir={run_dir}"]))


def test_training_writes_snapshots_resumes_them_exactly_and_reconstructs_a_stored_one(tmp_path):
    from utils.phema import list_snapshots, main, reconstruct
    posthoc_run(tmp_path / "whole")
    posthoc_run(tmp_path / "split", steps=3)
    posthoc_run(tmp_path / "split")
    whole = list_snapshots(tmp_path / "whole" / "phema")
    assert [(images, s) for images, s, _ in whole] == [(i, s) for i in (32, 64, 96) for s in (0.05, 0.10)]
    for (_, _, a), (_, _, b) in zip(whole, list_snapshots(tmp_path / "split" / "phema")):   # batch 16: 2 steps each
        sa, sb = torch.load(a, weights_only=True)["ema"], torch.load(b, weights_only=True)["ema"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not list((tmp_path / "whole" / "phema").glob(".*tmp*"))
    stored = torch.load(whole[-1][2], weights_only=True)["ema"]            # sigma_rel 0.10 at 96 images
    state, info = reconstruct(tmp_path / "whole" / "phema", 0.10)
    assert info["coefficients"][-1] == pytest.approx(1.0, abs=1e-6)
    for k, v in stored.items():
        torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="no snapshot time"):
        reconstruct(tmp_path / "whole" / "phema", 0.07, images=50)
    with pytest.raises(ConfigError, match="no post-hoc EMA snapshots"):
        reconstruct(tmp_path / "nothing", 0.07)
    written = main([str(tmp_path / "whole"), "--sigma-rel", "0.07"])
    import sample as sample_script
    from conftest import compose_config
    out = sample_script.run(compose_config("sample", [f"ckpt={written[0]}", "num_samples=2", "steps=2",
                                                      f"out={tmp_path}/s", "device=cpu"]))
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 2


def test_snapshots_must_fall_on_step_boundaries(tmp_path):
    import train as train_script
    from conftest import TINY, compose_config
    with pytest.raises(ConfigError, match="multiple of train.batch_size"):
        train_script.train(compose_config(overrides=[*TINY, "ema.posthoc=true", "ema.snapshot_every=40",
                                                     f"run_dir={tmp_path}"]))


@pytest.mark.slow   # ~2.5 s
def test_the_sweep_scores_every_reconstruction_and_marks_the_best(tmp_path):
    import json

    from benchmarks.phema_sweep import main
    posthoc_run(tmp_path / "run")
    main([str(tmp_path / "run"), "--sigma-rel", "0.05", "0.08", "--sample-args", "num_samples=20",
          "batch_size=20", "steps=2", "device=cpu"])
    result = json.loads((tmp_path / "run" / "phema" / "phema_sweep.json").read_text())
    assert [r["sigma_rel"] for r in result["rows"]] == [0.05, 0.08]
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 and r["features"] == "digits" for r in result["rows"])
    assert result["best"]["fid"] == min(r["fid"] for r in result["rows"])
    assert (tmp_path / "run" / "phema" / "phema_sweep.png").stat().st_size > 0


@pytest.mark.slow   # subprocesses: over 10 s on 2 cores (the default suite stays near 5 minutes)
def test_the_reconstruction_command_points_a_sweep_to_its_new_home(tmp_path):
    """utils/ imports nothing above it, so the sweep (sampling, scoring) is benchmarks/phema_sweep.py; --sweep on the
    reconstruction command says so in one line and fails, before reading anything."""
    from conftest import run_script
    from utils.phema import main
    with pytest.raises(ConfigError, match="python -m benchmarks.phema_sweep"):
        main([str(tmp_path), "--sigma-rel", "0.05", "--sweep"])
    result = run_script(["-m", "utils.phema", str(tmp_path), "--sigma-rel", "0.05", "--sweep", "--sample-args",
                         "steps=2"], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("error: --sweep moved") and "python -m benchmarks.phema_sweep" in message
    assert len(message.splitlines()) == 1
    usage = run_script(["-m", "benchmarks.phema_sweep", "--help"])
    assert "--sigma-rel" in usage.stdout and "--sample-args" in usage.stdout


@pytest.mark.slow   # ~5 s
def test_a_third_ema_tracked_in_the_same_run_is_rebuilt_from_the_other_two(tmp_path):
    import train as train_script
    from conftest import TINY, compose_config
    from utils.phema import list_snapshots, reconstruct
    train_script.train(compose_config(overrides=[*TINY, "train.steps=40", "train.log_every=20", "train.ckpt_every=40",
                                                 "ema.posthoc=true", "ema.stds=[0.05,0.10,0.07]",
                                                 "ema.snapshot_every=64", f"run_dir={tmp_path}"]))
    folder = tmp_path / "phema"
    direct = torch.load([p for i, s, p in list_snapshots(folder) if i == 640 and s == 0.07][0], weights_only=True)
    rebuilt, info = reconstruct(folder, 0.07, sources=(0.05, 0.10))
    assert info["snapshots"] == 20                                    # 10 times x the two other lengths
    raw = final_state_model(tmp_path)
    for name, value in direct["ema"].items():
        if value.is_floating_point() and value.ndim == 2:
            error = (rebuilt[name] - value).norm() / (value - raw[name]).norm().clamp_min(1e-12)
            assert error < 0.05, f"{name}: off by {error:.3f} of the EMA's distance from the raw weights"


def final_state_model(run_dir):
    from conftest import final_state
    return final_state(run_dir)["model"]


@pytest.mark.slow
@pytest.mark.distributed
def test_posthoc_snapshots_over_two_gloo_processes_match_one_process(tmp_path):
    import train as train_script
    from conftest import TINY, compose_config, run_script
    from utils.phema import list_snapshots
    common = [*TINY, "train.steps=4", "ema.posthoc=true", "ema.snapshot_every=32"]
    run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29597", "train.py", *common,
                f"run_dir={tmp_path}/two"], env={"OMP_NUM_THREADS": "1"})
    train_script.train(compose_config(overrides=[*common, f"run_dir={tmp_path}/one"]))
    one, two = list_snapshots(tmp_path / "one" / "phema"), list_snapshots(tmp_path / "two" / "phema")
    assert [(i, s) for i, s, _ in one] == [(i, s) for i, s, _ in two] and len(one) == 4
    for (_, _, a), (_, _, b) in zip(one, two):
        sa, sb = torch.load(a, weights_only=True)["ema"], torch.load(b, weights_only=True)["ema"]
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6)
