"""The isoFLOP analysis (evaluation/isoflop.py) on synthetic sweeps written as real run folders: losses drawn from a
planted L(N, D) = E + A/N^alpha + B/D^beta with tiny seeded noise, at budgets 3x apart with 7 sizes each around the
true optimum; the fits must recover the planted exponents, E and the optimum, predict a held-out budget and cover
the truth with their bootstrap intervals."""

import json
import math
import subprocess

import numpy as np
import pytest
import yaml

from evaluation import isoflop
from utils.errors import ConfigError

LAW = dict(E=0.5, A=30.0, alpha=0.45, B=60.0, beta=0.35)
TOKENS = 64                   # multiply-adds per image per parameter: gflops = 64 N / 1e9, so C = 192 N D
BUDGETS = [2e14 * 3 ** i for i in range(5)]
STEP_DEX = 0.2                # the size ladder: 10^0.2 apart (about 1.6x)
BATCH = 32


def planted_loss(law, N, D):
    return law["E"] + law["A"] / np.asarray(N, float) ** law["alpha"] + law["B"] / np.asarray(D, float) ** law["beta"]


def proportional(N):
    return TOKENS * np.asarray(N, float) / 1e9


def true_optimum(law, C, gflops_of):
    """The N minimising the planted loss at budget C (a dense log grid, then a parabola through its best three)."""
    lnN = np.linspace(np.log(1e2), np.log(1e11), 200001)
    N = np.exp(lnN)
    L = planted_loss(law, N, C / (3 * gflops_of(N) * 1e9))
    i = int(np.argmin(L))
    return float(N[i]), float(L[i])


def write_run(folder, model, N, gflops, C, seed, loss, *, steps, complete=True, fds=()):
    """A run folder as train.py leaves it: the resolved config and training, eval-loss and FID rows."""
    folder.mkdir(parents=True)
    width = int(round(math.sqrt(N / 48)))
    config = {"model": {"name": model, "width": width, "param": "mup"}, "seed": seed, "optim": {"lr": 1e-3},
              "train": {"flops": C, "batch_size": BATCH, "steps": steps}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": steps // 2, "loss": 2 * loss, "params": int(N), "gflops": gflops},
            {"step": steps // 2, "eval_loss": 1.1 * loss, "eval_loss_se": 0.002, "eval_loss_ema": 1.05 * loss,
             "eval_loss_ema_se": 0.002}]
    if complete:
        rows += [{"step": steps, "loss": 1.5 * loss, "params": int(N), "gflops": gflops},
                 {"step": steps, "eval_loss": loss, "eval_loss_se": 0.001 * loss, "eval_loss_ema": 0.98 * loss,
                  "eval_loss_ema_se": 0.001 * loss}]
        rows += [{"step": steps, "fid": fd, "fid_features": "digits", "fid_samples": 1000} for fd in fds]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_sweep(root, law=LAW, family="DiT", budgets=BUDGETS, sizes=7, seeds=(0, 1), noise=1e-3,
                gflops_of=proportional, rng_seed=0, fd=None, sizes_at=None):
    """An isoFLOP sweep: at each budget the `sizes` ladder sizes nearest the true optimum, every size at every
    seed, losses from `law` times exp(noise * z). fd: (k, p) writes two FID rows per run, FD = k loss^p (1 +- 2%).
    Returns {budget: true N*}."""
    rng = np.random.default_rng(rng_seed)
    model = "UNet-S4" if family == "U-Net" else f"{family}-Mini/2"
    optima = {}
    for C in budgets:
        N_opt, _ = true_optimum(law, C, gflops_of)
        optima[C] = N_opt
        centre = round(math.log10(N_opt) / STEP_DEX)
        count = sizes if sizes_at is None else sizes_at.get(C, sizes)
        for j in range(count):
            N = int(round(10 ** ((centre + j - count // 2) * STEP_DEX)))
            g = float(gflops_of(N))
            steps = int(round(C / (3 * g * 1e9 * BATCH)))
            for seed in seeds:
                loss = float(planted_loss(law, N, steps * BATCH) * math.exp(noise * rng.standard_normal()))
                fds = () if fd is None else [fd[0] * loss ** fd[1] * (1 + 0.02 * s) for s in (-1, 1)]
                write_run(root / f"{family}-C{C:.2e}-N{N}-s{seed}", model, N, g, C, seed, loss, steps=steps,
                          fds=fds)
    return optima


def closed_form(law):
    """Compute exponents for C ∝ N D: a = beta / (alpha + beta), b = alpha / (alpha + beta)."""
    s = law["alpha"] + law["beta"]
    return law["beta"] / s, law["alpha"] / s


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("isoflop") / "sweep"
    optima = write_sweep(root, fd=(50.0, 3.0))
    records, left_out = isoflop.load_isoflop_runs([root])
    result = isoflop.fit_isoflop(records, bootstrap=50, seed=0, progress=False)
    return root, optima, records, left_out, result


def test_recovers_planted_exponents_E_and_optimum(sweep):
    root, optima, records, left_out, result = sweep
    assert len(records) == 5 * 7 * 2 and left_out == []
    fit = result["fits"]["DiT"]
    a, b = closed_form(LAW)
    a2, a3 = fit["approach2"], fit["approach3"]
    assert a2["a"] == pytest.approx(a, abs=0.03) and a2["b"] == pytest.approx(b, abs=0.03)
    assert a3["a"] == pytest.approx(a, abs=0.03) and a3["b"] == pytest.approx(b, abs=0.03)
    assert a3["alpha"] == pytest.approx(LAW["alpha"], abs=0.05) and a3["beta"] == pytest.approx(LAW["beta"], abs=0.05)
    assert a3["E"] == pytest.approx(LAW["E"], abs=0.02) and a2["frontier"]["E"] == pytest.approx(LAW["E"], abs=0.05)
    for p in fit["budgets"]:   # the vertex within a grid step of the true optimum, at every budget
        assert abs(math.log10(p["N_star"] / optima[p["C"]])) < STEP_DEX
        assert p["spacing_dex"] == pytest.approx(STEP_DEX, abs=1e-3)
    for o in a3["optima"]:
        assert abs(math.log10(o["N"] / optima[o["C"]])) < STEP_DEX / 4
    for p in fit["budgets"]:   # D* = C / (192 N*) at the optimum
        assert abs(math.log10(p["D_star"] * 192 * optima[p["C"]] / p["C"])) < STEP_DEX


def test_holdout_predicts_the_largest_budget(sweep):
    _, optima, _, _, result = sweep
    held = result["fits"]["DiT"]["holdout"]
    assert held["C"] == BUDGETS[-1] and held["trained_budgets"] == BUDGETS[:-1]
    for approach in ("approach2", "approach3"):
        p = held[approach]
        assert abs(p["loss_pct"]) < 0.5 and abs(p["reducible_pct"]) < 10 and p["grid_steps"] < 1, (approach, p)
        assert abs(p["vertex_loss_pct"]) < 0.5 and all(p["passed"].values())
        vertex = held["observed"]["L_vertex"]   # the error against the held-out parabola's vertex, as defined
        assert p["vertex_loss_pct"] == pytest.approx(100 * (p["L"] - vertex) / vertex)
        assert abs(math.log10(p["N"] / optima[BUDGETS[-1]])) < STEP_DEX
    # The observed side: the best size's mean over both seeds, and that budget's own vertex.
    best = held["observed"]["best_loss"]
    assert best == pytest.approx(planted_loss(LAW, held["observed"]["best_N"], _images(held)), rel=3e-3)


def _images(held):
    """D of the held-out budget's best size (what its runs trained on, steps rounded)."""
    g = proportional(held["observed"]["best_N"])
    return round(held["C"] / (3 * g * 1e9 * BATCH)) * BATCH


def test_bootstrap_intervals_cover_the_planted_values(sweep):
    *_, result = sweep
    boot = result["fits"]["DiT"]["bootstrap"]
    assert boot["resamples"] == 50 and boot["succeeded"] + boot["failed"] == 50 and boot["succeeded"] >= 45
    a, b = closed_form(LAW)
    truth = {"approach2.a": a, "approach2.b": b, "approach3.a": a, "approach3.b": b, "approach3.alpha": LAW["alpha"],
             "approach2.frontier.E": LAW["E"]}
    for key, value in truth.items():
        lo, hi = boot["ci"][key]
        assert lo <= value <= hi, (key, lo, value, hi)
        assert 0 < hi - lo < 0.05, (key, lo, hi)   # an interval, and a narrow one at 0.1% noise
    # Approach 3's beta and E: resampling runs within budgets gives intervals about 0.65x as wide as the spread of
    # the estimates over fresh noise on this design (measured over 10 noise seeds: beta 0.0021 vs 0.0032), because a
    # few edge runs carry them; so this seed's 95% intervals may just miss, and the check allows 1.6x their width.
    for key in ("approach3.beta", "approach3.E"):
        lo, hi = boot["ci"][key]
        centre, half = (lo + hi) / 2, (hi - lo) / 2
        value = LAW[key.split(".")[1]]
        assert abs(value - centre) <= 1.6 * half and 0 < half < 0.01, (key, lo, value, hi)
    # The predicted optimum at the largest budget: approach 3's interval holds the true N*; approach 2's parabolas
    # sit a constant ~0.01 decade off it (the asymmetric profile: Open-Athena's bias), within a quarter grid step.
    truth = math.log10(true_optimum(LAW, BUDGETS[-1], proportional)[0])
    lo, hi = np.log10(boot["ci"][f"predictions.{len(BUDGETS) - 1}.approach3.N"])
    assert lo <= truth <= hi
    lo, hi = np.log10(boot["ci"][f"predictions.{len(BUDGETS) - 1}.approach2.N"])
    assert lo - STEP_DEX / 4 <= truth <= hi + STEP_DEX / 4 and hi - lo < STEP_DEX / 2


def test_different_planted_exponents_give_different_fits(tmp_path):
    law = dict(E=0.3, A=10.0, alpha=0.30, B=200.0, beta=0.50)
    optima = write_sweep(tmp_path / "sweep", law=law, budgets=BUDGETS[:4], seeds=(0,), rng_seed=1)
    records, _ = isoflop.load_isoflop_runs([tmp_path / "sweep"])
    fit = isoflop.fit_isoflop(records, bootstrap=0, holdout=False, progress=False)["fits"]["DiT"]
    a, b = closed_form(law)                       # 0.625, 0.375: far from LAW's 0.4375, 0.5625
    assert fit["approach2"]["a"] == pytest.approx(a, abs=0.03) and fit["approach3"]["a"] == pytest.approx(a, abs=0.03)
    assert fit["approach3"]["alpha"] == pytest.approx(0.30, abs=0.05)
    assert fit["approach3"]["beta"] == pytest.approx(0.50, abs=0.05)
    assert fit["approach3"]["E"] == pytest.approx(0.3, abs=0.02)
    assert abs(fit["approach2"]["a"] - closed_form(LAW)[0]) > 0.15
    for p in fit["budgets"]:
        assert abs(math.log10(p["N_star"] / optima[p["C"]])) < STEP_DEX
    assert fit["holdout"] is None and fit["bootstrap"] is None


def test_non_proportional_gflops_are_interpolated(tmp_path):
    """gflops(N) = 64 N (1 + sqrt(3e6 / N)) / 1e9 (an attention-like term that dominates small models): approach 3's
    optimum must follow the runs' own gflops(N), where Chinchilla's closed form for C ∝ N D misses it."""
    def gflops_of(N):
        N = np.asarray(N, float)
        return TOKENS * N * (1 + np.sqrt(3e6 / N)) / 1e9

    optima = write_sweep(tmp_path / "sweep", gflops_of=gflops_of, budgets=BUDGETS[:4], seeds=(0,), rng_seed=2)
    records, _ = isoflop.load_isoflop_runs([tmp_path / "sweep"])
    fit = isoflop.fit_isoflop(records, bootstrap=0, holdout=False, progress=False)["fits"]["DiT"]
    a3 = fit["approach3"]
    assert a3["alpha"] == pytest.approx(LAW["alpha"], abs=0.05) and a3["beta"] == pytest.approx(LAW["beta"], abs=0.05)
    # The closed form N* = G (C/k)^(beta/(alpha+beta)), k = the runs' median C/(N D): what ignoring gflops(N) gives.
    k = np.median([r["flops"] / (r["params"] * r["D"]) for r in records])
    G = (a3["alpha"] * a3["A"] / (a3["beta"] * a3["B"])) ** (1 / (a3["alpha"] + a3["beta"]))
    naive_off = []
    for o, p in zip(a3["optima"], fit["budgets"]):
        assert abs(math.log10(o["N"] / optima[o["C"]])) < STEP_DEX / 4       # the true optimum of this gflops(N)
        assert abs(math.log10(p["N_star"] / optima[o["C"]])) < STEP_DEX       # the parabola: within a grid step
        assert o["D"] == pytest.approx(o["C"] / (3 * gflops_of(o["N"]) * 1e9), rel=0.02)
        naive_off.append(abs(math.log10(G * (o["C"] / k) ** a3["a_closed"] / optima[o["C"]])))
    assert min(naive_off) > STEP_DEX          # so the check above tells the two apart
    # The exponent of N*(C) bends away from beta / (alpha + beta); both approaches see the same bent exponent.
    assert a3["a"] - a3["a_closed"] > 0.02 and fit["approach2"]["a"] == pytest.approx(a3["a"], abs=0.03)


def test_flagged_parabolas_are_reported_and_the_fit_goes_on(tmp_path, capsys):
    write_sweep(tmp_path / "sweep", budgets=BUDGETS[:4], seeds=(0,), rng_seed=5)
    records, _ = isoflop.load_isoflop_runs([tmp_path / "sweep"])
    bent = [r for r in records if isoflop.budget_of(r) == BUDGETS[1]]
    centre = np.median([math.log10(r["params"]) for r in bent])
    for r in bent:   # a profile that opens downward: no minimum at this budget
        r["loss"] = 0.9 - 0.1 * (math.log10(r["params"]) - centre) ** 2
    result = isoflop.fit_isoflop(records, bootstrap=0, holdout=False, progress=False)
    fit = result["fits"]["DiT"]
    flagged = fit["budgets"][1]
    assert flagged["flags"][0] == "N: opens downward" and math.isnan(flagged["N_star"])
    assert f"DiT at C={BUDGETS[1]:.3g}: parabola in N: opens downward; left out of the fits" in capsys.readouterr().err
    assert fit["approach2"]["a"] == pytest.approx(closed_form(LAW)[0], abs=0.03)   # from the other three budgets
    assert "N: opens downward" in isoflop.markdown_report(result)
    for r in records:   # every budget upside down: nothing to fit, one clear error
        r["loss"] = 0.9 - 0.1 * (math.log10(r["params"]) - 5.5) ** 2
    with pytest.raises(ConfigError, match="DiT: only 0 budget"):
        isoflop.fit_isoflop(records, bootstrap=0, progress=False)


def test_incomplete_runs_are_named_and_left_out(tmp_path, capsys):
    root = tmp_path / "sweep"
    write_sweep(root, budgets=BUDGETS[:3], seeds=(0,))
    write_run(root / "DiT-stopped", "DiT-Mini/2", 123456, float(proportional(123456)), BUDGETS[1], 0, 0.9,
              steps=1000, complete=False)
    records, left_out = isoflop.load_isoflop_runs([root])
    assert "DiT-stopped" not in {r["run"] for r in records} and len(records) == 3 * 7
    assert left_out == [{"run": "DiT-stopped", "reason": "last 'eval_loss' at step 500 of 1000"}]
    assert "DiT-stopped is incomplete" in capsys.readouterr().err
    result = isoflop.main([str(root), "--bootstrap", "0", "--out", str(tmp_path / "out")])
    assert "DiT-stopped (last 'eval_loss' at step 500 of 1000)" in result["markdown"]
    assert 123456 not in {r["params"] for r in result["records"]}
    # --metric eval_loss_ema reads the EMA's final loss (0.98 x here) of the same runs.
    ema, _ = isoflop.load_isoflop_runs([root], metric="eval_loss_ema")
    assert [r["loss"] for r in ema] == pytest.approx([0.98 * r["loss"] for r in records])
    # A run that is no isoFLOP run (no train.flops) is an error naming it.
    config = yaml.safe_load((root / "DiT-stopped" / "config.yaml").read_text())
    del config["train"]["flops"]
    (root / "DiT-stopped" / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="no train.flops.*DiT-stopped"):
        isoflop.load_isoflop_runs([root])


def test_bad_input_gives_one_clear_error(tmp_path):
    few = tmp_path / "few"
    write_sweep(few, budgets=BUDGETS[:3], seeds=(0,), sizes_at={BUDGETS[1]: 2})
    records, _ = isoflop.load_isoflop_runs([few])
    with pytest.raises(ConfigError, match=r"DiT at C=6e\+14 has 2 model size\(s\).*a parabola needs at least 3"):
        isoflop.fit_isoflop(records, bootstrap=0)
    one = tmp_path / "one"
    write_sweep(one, budgets=BUDGETS[:1], seeds=(0,))
    with pytest.raises(ConfigError, match="at least 2 budgets"):
        isoflop.main([str(one), "--bootstrap", "0"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no run folders"):
        isoflop.main([str(tmp_path / "empty")])
    with pytest.raises(ConfigError, match="no complete isoFLOP runs"):
        isoflop.fit_isoflop([])


@pytest.mark.slow   # ~4 s
def test_two_families_give_two_frontiers_and_their_crossover(tmp_path):
    unet = dict(E=0.6, A=15.0, alpha=0.45, B=30.0, beta=0.35)   # better at small budgets, a higher floor
    write_sweep(tmp_path / "sweep", seeds=(0,), rng_seed=3)
    write_sweep(tmp_path / "sweep", law=unet, family="U-Net", seeds=(0,), rng_seed=4)
    out = tmp_path / "out"
    result = isoflop.main([str(tmp_path / "sweep"), "--bootstrap", "0", "--out", str(out)])
    assert result["families"] == ["DiT", "U-Net"]
    assert result["fits"]["U-Net"]["approach3"]["E"] == pytest.approx(0.6, abs=0.02)
    assert result["fits"]["DiT"]["approach3"]["E"] == pytest.approx(0.5, abs=0.02)
    # The planted crossover: where the two true frontiers (min over N at fixed C) meet.
    grid = np.geomspace(BUDGETS[0], BUDGETS[-1], 41)
    diff = [true_optimum(LAW, C, proportional)[1] - true_optimum(unet, C, proportional)[1] for C in grid]
    j = int(np.flatnonzero(np.diff(np.sign(diff)))[0])
    planted = math.sqrt(grid[j] * grid[j + 1])
    for curve in ("approach2", "approach3"):
        (cross,) = result["crossovers"][curve]
        assert cross["C"] == pytest.approx(planted, rel=0.3), curve
        assert cross["better_below"] == "U-Net" and cross["better_above"] == "DiT" and cross["within"]
    assert f"cross at C = {result['crossovers']['approach2'][0]['C']:.3g}" in result["markdown"]
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("power", [1.5, 3.0])
def test_loss_to_fd_mapping(tmp_path, power):
    write_sweep(tmp_path / "sweep", budgets=BUDGETS[:3], seeds=(0,), fd=(50.0, power), noise=1e-2)
    records, _ = isoflop.load_isoflop_runs([tmp_path / "sweep"])
    assert all(r["fd_draws"] == 2 for r in records)      # two final-step fid rows: two draws, averaged
    assert records[0]["fd"] == pytest.approx(50.0 * records[0]["loss"] ** power, rel=1e-9)
    m = isoflop.fd_mapping(records)["all"]
    assert m["p"] == pytest.approx(power, abs=1e-6) and m["k"] == pytest.approx(50.0, rel=1e-5)
    assert m["r2"] == pytest.approx(1.0) and m["spearman"] == pytest.approx(1.0) and m["runs"] == 21
    for r in records:   # scramble the FDs: the rank correlation must notice
        r["fd"] = 50.0 * (2.0 - r["loss"])
    assert isoflop.fd_mapping(records)["all"]["spearman"] == pytest.approx(-1.0)


def test_main_end_to_end(sweep, tmp_path, capsys):
    root, *_ = sweep
    out = tmp_path / "report"
    result = isoflop.main([str(root), "--out", str(out), "--bootstrap", "20", "--seed", "3"])
    for name in ("isoflop", "frontier", "optimal", "loss_vs_fd"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
    md = (out / "isoflop.md").read_text()
    fit = result["fits"]["DiT"]
    for value in (fit["approach2"]["a"], fit["approach2"]["b"], fit["approach3"]["alpha"], fit["approach3"]["beta"]):
        assert f"{value:.4f}" in md
    assert "20 of 20 resamples (seed 3)" in md and "pass" in md and "FAIL" not in md
    assert "FD = " in md and "Spearman" in md
    assert md in capsys.readouterr().out
    saved = json.loads((out / "isoflop.json").read_text())
    assert saved["fits"]["DiT"]["approach2"]["a"] == pytest.approx(fit["approach2"]["a"])
    assert saved["fits"]["DiT"]["bootstrap"]["ci"]["approach3.alpha"] == fit["bootstrap"]["ci"]["approach3.alpha"]
    assert len(saved["records"]) == 70 and saved["left_out"] == []
    # W&B: the exponents as flat keys (disabled mode: no network, no files).
    scalars = isoflop.log_to_wandb(result, result["images"], out, mode="disabled")
    assert scalars["isoflop/DiT/approach2/a"] == fit["approach2"]["a"]
    assert "isoflop/DiT/ci/approach3.alpha/lo" in scalars


def test_pure_fits_on_exact_curves():
    x = np.linspace(4.0, 6.0, 7)
    fit = isoflop.fit_parabola(x, 2.0 * (x - 5.2) ** 2 + 0.7)
    assert fit["vertex_x"] == pytest.approx(5.2) and fit["vertex_y"] == pytest.approx(0.7) and fit["flag"] is None
    assert isoflop.fit_parabola(x, 2.0 * (x - 7.0) ** 2)["flag"] == "vertex outside the sampled range"
    assert isoflop.fit_parabola(x, -(x - 5.0) ** 2)["flag"] == "opens downward"
    with pytest.raises(isoflop.FitFailed):
        isoflop.fit_parabola([1.0, 2.0, 2.0], [1.0, 0.0, 0.1])
    C = np.geomspace(1e15, 1e18, 6)
    fr = isoflop.fit_frontier(C, 0.4 + 800.0 * C ** -0.2)
    assert (fr["E"], fr["A"], fr["alpha"]) == pytest.approx((0.4, 800.0, 0.2), rel=1e-4)
    fr = isoflop.fit_frontier(C, 800.0 * C ** -0.2)        # no floor: E stays at its bound 0
    assert fr["E"] == pytest.approx(0.0, abs=1e-6) and fr["alpha"] == pytest.approx(0.2, abs=1e-4)
    g = isoflop.gflops_interpolator([1e5, 1e6, 1e7], [1.0, 20.0, 100.0])
    assert g([1e5, 1e6, 1e7]) == pytest.approx([1.0, 20.0, 100.0])
    assert g(1e8) == pytest.approx(500.0) and g(1e4) == pytest.approx(0.05)   # the end segments' slopes
    rng = np.random.default_rng(0)
    N, D = 10 ** rng.uniform(5, 7, 40), 10 ** rng.uniform(6, 8, 40)
    p3 = isoflop.fit_approach3(N, D, planted_loss(LAW, N, D))
    assert [p3[k] for k in ("E", "A", "alpha", "B", "beta")] == pytest.approx(
        [LAW[k] for k in ("E", "A", "alpha", "B", "beta")], rel=1e-3)


def test_fd_draws_sample_each_seed_once_and_cache_the_score(tmp_path, monkeypatch):
    """--fd-draws without sample.py: its call is recorded, the scorer returns a number per draw; a second call
    reads the cached scores and samples nothing."""
    import evaluation.evaluator
    write_sweep(tmp_path / "sweep", budgets=BUDGETS[:2], seeds=(0,), sizes=3)
    records, _ = isoflop.load_isoflop_runs([tmp_path / "sweep"])
    record = records[0]
    (tmp_path / "sweep" / record["run"] / "checkpoints").mkdir()
    (tmp_path / "sweep" / record["run"] / "checkpoints" / "0001000.pt").write_bytes(b"")
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: calls.append(args))
    monkeypatch.setattr(evaluation.evaluator, "evaluate",
                        lambda samples, ref, **kw: {"fid": 2.0 + int(samples.parent.name.split("seed")[1][0])})
    assert isoflop.score_fd_draws(record, 3, num_samples=500, reference="ref.npz") == [2.0, 3.0, 4.0]
    # Paths quoted: Hydra's override grammar would split a sweep folder's name ("...,seed=0,...") at '=' and ','.
    assert [a[2:6] for a in calls] == [[f"ckpt='{tmp_path / 'sweep' / record['run'] / 'checkpoints' / '0001000.pt'}'",
                                        "num_samples=500", f"seed={k}",
                                        f"out='{tmp_path / 'sweep' / record['run'] / 'samples'}"
                                        f"/isoflop-fd-step1000-seed{k}-n500'"] for k in range(3)]
    assert record["fd"] == 3.0 and record["fd_draws"] == 3 and record["fd_se"] == pytest.approx(1 / math.sqrt(3))
    calls.clear()
    assert isoflop.score_fd_draws(record, 3, num_samples=500, reference="ref.npz") == [2.0, 3.0, 4.0]
    assert calls == []   # all three from the cache beside each sample folder
    # Other sampler settings are other samples: not read from that cache, written to folders of their own.
    isoflop.score_fd_draws(record, 2, num_samples=500, reference="ref.npz", sample_args=["steps=10"])
    assert [a[-1] for a in calls] == ["steps=10", "steps=10"]
    assert len({a[5] for a in calls}) == 2 and all("-n500-" in a[5] and "seed" in a[5] for a in calls)


def test_a_profile_whose_vertex_is_decades_away_is_a_failed_fit_not_an_overflow():
    """A nearly straight profile (a bootstrap resample can draw one) puts the parabola's vertex at 10^hundreds: that
    is no minimum near the sizes, reported as FitFailed (counted in the bootstrap), not an OverflowError."""
    N = np.array([1e4, 2e4, 4e4, 8e4, 1.6e5])
    runs = [dict(params=n, D=1e12 / n, loss=0.5 - 0.01 * math.log10(n) + 1e-9 * (math.log10(n) - 4.6) ** 2)
            for n in N]
    with pytest.raises(isoflop.FitFailed, match="decades outside"):
        isoflop.isoflop_profile(runs, 1e12)
    kept = [dict(r, loss=0.4 + 0.1 * (math.log10(r["params"]) - 3.7) ** 2) for r in runs]   # vertex half a decade out
    assert isoflop.isoflop_profile(kept, 1e12)["flags"] == ["N: vertex outside the sampled range",
                                                            "D: vertex outside the sampled range"]
