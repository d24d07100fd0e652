"""Scaling studies: the collector (evaluation/scaling.py) on run folders written here, its figures and table,
the compute accounting, and the sweep configs under conf/experiment/scaling-*.yaml."""

import json
import math

import numpy as np
import pytest
import yaml

from conftest import ROOT, compose_config, read_run_metrics, run_script
from evaluation import scaling
from utils.errors import ConfigError


def write_run(folder, model, gflops, batch, steps, values, metric="loss"):
    """A run folder as train.py leaves it: config.yaml and one metrics.jsonl row per logged step."""
    folder.mkdir(parents=True)
    config = {"model": {"name": model, "kwargs": {}}, "train": {"batch_size": batch}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": int(s), metric: float(v), "gflops": gflops, "train_compute_gflops": gflops * 3 * batch * int(s)}
            for s, v in zip(steps, values)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# Synthetic sweep: final loss = 0.5 * Gflops^-0.3 exactly, reached after a decay over the run.
EXPONENT, COEF = -0.3, 0.5
SIZES = {"DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06, "DiT-B/2": 23.01, "DiT-XL/2": 118.6}


@pytest.fixture
def sweep(tmp_path):
    steps = np.arange(10, 110, 10)
    for model, gflops in SIZES.items():
        final = COEF * gflops ** EXPONENT
        values = final * (1 + 2.0 * np.exp(-steps / 15.0))
        values[-5:] = final  # the last five rows (what --last 5 averages) sit at the final value
        write_run(tmp_path / "sweep" / model.replace("/", "-"), model, gflops, 32, steps, values)
    return tmp_path / "sweep"


def test_fit_power_law_recovers_exponent_and_coefficient():
    x = np.geomspace(0.1, 100, 7)
    a, b, r2 = scaling.fit_power_law(x, 3.0 * x ** -0.42)
    assert b == pytest.approx(-0.42, abs=1e-12) and a == pytest.approx(3.0, rel=1e-12) and r2 == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    a, b, r2 = scaling.fit_power_law(x, 3.0 * x ** -0.42 * np.exp(rng.normal(0, 0.05, len(x))))
    assert b == pytest.approx(-0.42, abs=0.05) and 0.9 < r2 < 1.0
    assert all(math.isnan(v) for v in scaling.fit_power_law([1.0], [2.0]))  # one point: no fit


def test_train_compute_is_gflops_times_three_times_batch_times_steps():
    assert scaling.train_compute(118.6, 256, 400_000) == pytest.approx(118.6 * 3 * 256 * 400_000)
    # DiT-XL/2's 400K-step run in the paper is ~3.6e10 Gflops of training compute (Fig. 9's right end).
    assert scaling.train_compute(118.6, 256, 400_000) == pytest.approx(3.64e10, rel=0.01)


def test_collector_on_synthetic_sweep(sweep, capsys):
    result = scaling.main([str(sweep)])
    out = sweep / "scaling"
    assert result["out_dir"] == out and result["metric"] == "loss"
    for name in ("metric_vs_steps", "metric_vs_gflops", "metric_vs_compute", "scaling"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, png
    fit = result["fits"]["gflops"]
    assert fit["b"] == pytest.approx(EXPONENT, abs=1e-9) and fit["a"] == pytest.approx(COEF, rel=1e-9)
    assert fit["r2"] == pytest.approx(1.0)
    # Same batch and steps for every run: compute is proportional to Gflops, so the same exponent.
    assert result["fits"]["train_compute_gflops"]["b"] == pytest.approx(EXPONENT, abs=1e-9)

    table = (out / "scaling.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| DiT")]
    assert [line.split(" | ")[0][2:] for line in lines] == list(SIZES)  # one row per run, by Gflops
    first = [c.strip() for c in lines[0].strip("|").split("|")]
    assert first[:6] == ["DiT-S/8", "DiT", "–", "0.36", "100", "32"]  # no checkpoint: params unknown
    assert float(first[6]) == pytest.approx(0.36 * 3 * 32 * 100, rel=1e-3)
    assert float(first[7]) == pytest.approx(COEF * 0.36 ** EXPONENT, abs=1e-4)
    assert "x^-0.3000" in table and "training loss (mean of last 5 logged rows)" in table
    assert table in capsys.readouterr().out
    saved = json.loads((out / "scaling.json").read_text())
    assert [r["model"] for r in saved["records"]] == list(SIZES)


def test_collector_fits_each_family_on_a_two_family_sweep(tmp_path):
    """DiT and U-Net runs with different planted power laws of FID in Gflops: one fit per family recovers each."""
    planted = {"DiT": (40.0, -0.35), "U-Net": (60.0, -0.2)}
    models = {"DiT-T/8": 0.05, "DiT-T/4": 0.21, "DiT-T/2": 0.83, "UNet-T": 0.76, "UNet-S": 6.46, "UNet-B": 25.3}
    for model, gflops in models.items():
        a, b = planted["U-Net" if model.startswith("UNet") else "DiT"]
        folder = tmp_path / "sweep" / model.replace("/", "-")
        write_run(folder, model, gflops, 64, [100, 200], [1.0, 0.9])
        with open(folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 200, "fid": a * gflops ** b, "fid_features": "digits"}) + "\n")
    result = scaling.collect([tmp_path / "sweep"], out_dir=tmp_path / "out")
    assert result["metric"] == "fid" and result["label"] == "FD (digits features)"
    assert result["families"] == ["DiT", "U-Net"]
    for family, (a, b) in planted.items():
        fit = result["family_fits"][family]["gflops"]
        assert fit["b"] == pytest.approx(b, abs=1e-9) and fit["a"] == pytest.approx(a, rel=1e-9) and fit["runs"] == 3
    assert {r["model"]: r["family"] for r in result["records"]}["UNet-S"] == "U-Net"
    table = result["table"]
    assert "DiT: Power-law fit against Gflops" in table and "U-Net: Power-law fit against Gflops" in table
    assert "x^-0.3500" in table and "x^-0.2000" in table and "| UNet-B | U-Net |" in table
    # FID in two feature spaces cannot share one axis.
    with open(tmp_path / "sweep" / "UNet-B" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 200, "fid": 3.0, "fid_features": "inception"}) + "\n")
    with pytest.raises(ValueError, match="different feature spaces"):
        scaling.collect([tmp_path / "sweep"], out_dir=tmp_path / "out")


@pytest.mark.slow   # ~6 s (three collections, twelve figures)
def test_collector_prefers_fid_and_recomputes_missing_compute(tmp_path):
    # FID rows (as train.py logs them) in every run: FID is the metric; no train_compute_gflops logged: the
    # collector computes it from config.yaml's batch size and the logged Gflops.
    for model, gflops, fid in (("DiT-S/2", 6.06, 68.4), ("DiT-B/2", 23.01, 43.5), ("DiT-L/2", 80.7, 23.3)):
        folder = tmp_path / "runs" / model.replace("/", "-")
        write_run(folder, model, gflops, 256, [100, 200], [1.0, 0.9])
        rows = read_run_metrics(folder)
        rows = [{k: v for k, v in r.items() if k != "train_compute_gflops"} for r in rows]
        rows.append({"step": 200, "fid": fid, "fid_samples": 5000})
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3')  # torn line
    result = scaling.collect([tmp_path / "runs"], out_dir=tmp_path / "plots")
    assert result["metric"] == "fid" and result["label"] == "FID"
    assert [r["value"] for r in result["records"]] == [68.4, 43.5, 23.3]
    assert result["records"][0]["train_compute_gflops"] == pytest.approx(6.06 * 3 * 256 * 200)
    assert result["fits"]["gflops"]["b"] < 0
    assert (tmp_path / "plots" / "metric_vs_gflops.png").stat().st_size > 0
    # The loss instead, at a chosen step; and by default at the last step every run reached.
    loss = scaling.collect([tmp_path / "runs"], out_dir=tmp_path / "loss", metric="loss", last=1, max_step=100)
    assert [r["steps"] for r in loss["records"]] == [100, 100, 100]
    assert [r["value"] for r in loss["records"]] == [1.0, 1.0, 1.0]
    with open(tmp_path / "runs" / "DiT-L-2" / "metrics.jsonl", "a") as f:
        f.write("\n" + json.dumps({"step": 300, "loss": 0.5, "gflops": 80.7}) + "\n")
    loss = scaling.collect([tmp_path / "runs"], out_dir=tmp_path / "loss", metric="loss", last=2)
    assert loss["step"] == 200 and [r["steps"] for r in loss["records"]] == [200, 200, 200]
    assert [r["value"] for r in loss["records"]] == [pytest.approx(0.95)] * 3


def test_score_final_averages_noise_draws_in_place_of_the_in_loop_fid(tmp_path, monkeypatch):
    """--score-final without sample.py: draw k samples with seed k into a folder of its own; the run's FID becomes the
    mean of the draws with their standard error; cached scores are reused, other sampler settings are not."""
    import subprocess

    import evaluation.evaluator
    for model, gflops in (("DiT-S/2", 6.06), ("DiT-B/2", 23.01)):
        folder = tmp_path / "runs" / model.replace("/", "-")
        write_run(folder, model, gflops, 32, [100, 200], [1.0, 0.9])
        with open(folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 200, "fid": 99.0, "fid_samples": 500}) + "\n")   # one in-loop draw
            f.write(json.dumps({"step": 200, "eval_loss": 0.5, "eval_loss_se": 0.004}) + "\n")  # auto's first choice
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "0000200.pt").write_bytes(b"")
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: calls.append(args))
    fd = lambda samples: (10.0 if "DiT-S-2" in str(samples) else 5.0) + int(samples.parent.name.split("seed")[1][0])
    monkeypatch.setattr(evaluation.evaluator, "evaluate",
                        lambda samples, ref, **kw: {"fid": fd(samples), "class_accuracy": 0.9})
    score = dict(reference="ref.npz", num_samples=100, draws=2)
    result = scaling.collect([tmp_path / "runs"], out_dir=tmp_path / "plots", score=score)
    assert result["metric"] == "fid" and [r["value"] for r in result["records"]] == [10.5, 5.5]
    assert "| 10.5000 ± 0.50 |" in result["table"] and "| 5.5000 ± 0.50 |" in result["table"]
    assert scaling.collect([tmp_path / "runs"], out_dir=tmp_path / "loss")["metric"] == "eval_loss"  # unscored
    assert [a[4] for a in calls] == ["seed=0", "seed=1"] * 2 and len({a[5] for a in calls}) == 4
    run = scaling.load_runs([tmp_path / "runs"])[0]
    row = scaling.score_final(run, **score)
    assert row["fid_se"] == pytest.approx(0.5) and row["fid_draws"] == 2 and row["class_accuracy"] == 0.9
    assert len(calls) == 4   # both draws from the cache
    scaling.score_final(run, **score, sample_args=["steps=10"])
    assert len(calls) == 6 and calls[-1][-1] == "steps=10"
    with pytest.raises(ConfigError, match="--fd-draws 0"):
        scaling.score_final(run, **{**score, "draws": 0})


def models_of(name):
    return yaml.safe_load((ROOT / "conf" / "experiment" / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"][
        "model"].split(",")


def test_sweep_configs_compose():
    # (experiment, models in its sweep, the file whose list it uses: the SiT studies inherit the DiT ones')
    for name, n_models, source in (("scaling-digits", 6, "scaling-digits"), ("scaling-dit", 12, "scaling-dit"),
                                   ("scaling-digits-unet", 6, "scaling-digits-unet"),
                                   ("scaling-dit-unet", 8, "scaling-dit-unet"), ("scaling-sit", 12, "scaling-dit"),
                                   ("scaling-sit-unet", 8, "scaling-sit-unet")):
        cfg = compose_config(overrides=[f"experiment={name}"])
        assert cfg.logger.group == name.removesuffix("-unet") if "digits" in name else cfg.logger.group == name
        models = models_of(source)
        assert len(models) == n_models and all((ROOT / "conf" / "model" / f"{m}.yaml").exists() for m in models)
    cfg = compose_config(overrides=["experiment=scaling-dit"])  # the paper's ImageNet 256 recipe, no guidance
    assert cfg.vae.name == "sd-vae-ft-ema" and cfg.train.batch_size == 256 and cfg.optim.lr == 1e-4
    assert cfg.sample.cfg_scale == 1.0 and cfg.fid.every == 50000 and cfg.fid.num_samples == 5000
    cfg = compose_config(overrides=["experiment=scaling-sit"])  # the same study trained as SiT flows
    assert cfg.diffusion.objective == "flow" and cfg.diffusion.time_sampling == "uniform" and cfg.sample.sampler == "sde"
    for name, family, base in (("scaling-digits", "DiT", 32), ("scaling-digits-unet", "UNet", 16)):  # the CPU study
        cfg = compose_config(overrides=[f"experiment={name}"])      # μP, the evaluation loss, final FD, one thread
        assert cfg.model.param == "mup" and cfg.model.base_width == base and cfg.eval.every and cfg.fid.at_end
        assert cfg.threads == 1 and all(m.startswith(family) for m in models_of(name))


@pytest.mark.slow   # subprocesses: over 10 s on 2 cores (the default suite stays near 5 minutes)
def test_sweep_launches_every_model_with_group_and_tags(tmp_path):
    """`python train.py -m experiment=...` alone expands the file's model list (dry runs: nothing trains)."""
    result = run_script([str(ROOT / "train.py"), "-m", "experiment=scaling-dit-unet", "dry_run=true"], cwd=tmp_path)
    run_dirs = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("run_dir: ")]
    assert run_dirs == [f"runs/scaling-dit-unet/{m}" for m in ("DiT-S-2", "DiT-B-2", "DiT-L-2", "DiT-XL-2",
                                                                 "UNet-S", "UNet-B", "UNet-L", "UNet-XL")]
    assert result.stdout.count("group: scaling-dit-unet") == 8 and "  - UNet-L\n" in result.stdout


@pytest.mark.slow
def test_multirun_on_cpu_then_collector(tmp_path):
    overrides = ["logger=none", "device=cpu", "train.steps=2", "train.batch_size=16", "train.log_every=1",
                 "sample.steps=2", "sample.per_class=1"]
    run_script([str(ROOT / "train.py"), "-m", "experiment=scaling-digits", "model=DiT-T-8,DiT-T-4", *overrides],
               cwd=tmp_path)
    sweep = tmp_path / "runs" / "scaling-digits"
    runs = sorted(p for p in sweep.iterdir() if (p / "metrics.jsonl").exists())
    assert [p.name.split("_")[0] for p in runs] == ["DiT-T-4", "DiT-T-8"]
    for run in runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["logger"]["group"] == "scaling-digits"
        assert config["logger"]["tags"][-1] == run.name.split("_")[0]
        rows = read_run_metrics(run)
        rows = [r for r in rows if "loss" in r]   # (the FD rows at the end come on top)
        assert [r["step"] for r in rows] == [1, 2]
        for r in rows:  # the compute accounting train.py logs: Gflops x 3 x batch x steps
            assert r["train_compute_gflops"] == pytest.approx(r["gflops"] * 3 * 16 * r["step"], rel=1e-12)

    result = run_script(["-m", "evaluation.scaling", str(sweep), "--last", "1"], cwd=ROOT)
    assert "| DiT-T/8 |" in result.stdout and "| DiT-T/4 |" in result.stdout
    summary = json.loads((sweep / "scaling" / "scaling.json").read_text())
    records = {r["model"]: r for r in summary["records"]}
    assert records["DiT-T/8"]["gflops"] < records["DiT-T/4"]["gflops"]
    for r in records.values():
        assert r["steps"] == 2 and r["batch_size"] == 16
        assert r["train_compute_gflops"] == pytest.approx(r["gflops"] * 3 * 16 * 2)
        assert r["params"] > 4e6  # counted from the checkpoint
    assert (sweep / "scaling" / "scaling.png").stat().st_size > 0


@pytest.mark.slow
def test_collector_logs_to_wandb_offline(sweep, tmp_path):
    run_script(["-m", "evaluation.scaling", str(sweep), "--out", str(tmp_path / "out"), "--wandb"], cwd=ROOT)
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = {p.name.split("_")[0] for p in (runs[0] / "files" / "media").rglob("*") if p.is_file()}
    assert {"metric", "scaling"} <= media  # the figures and the table
