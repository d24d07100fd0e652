"""The pieces a scaling study is built from: a width per run (model.width), a compute budget per run (train.flops),
the learning-rate transfer analysis (python -m evaluation.scaling lr) and the study's configs."""

import json
import math

import pytest
import torch
import yaml

import train as train_script
from conftest import ROOT, compose_config
from evaluation import lr_transfer
from evaluation.scaling import main as scaling_main
from models import build_model, model_stats, with_width
from utils.errors import ConfigError
from utils.schedule import budget_steps

DIGITS = dict(input_size=8, in_channels=1, num_classes=10, learn_sigma=False)


def test_a_dit_widens_by_heads_of_the_named_sizes_width():
    assert with_width("DiT-Mini/2", {}, 96) == {"hidden_size": 96, "num_heads": 3}   # DiT-Mini: 4 heads of 32
    assert with_width("DiT-S/2", {"qk_norm": True}, 768) == {"qk_norm": True, "hidden_size": 768, "num_heads": 12}
    assert with_width("LightningDiT-B/1", {}, 128) == {"hidden_size": 128, "num_heads": 2}
    assert with_width("UNet-T8", {"norm_groups": 8}, 48) == {"norm_groups": 8, "model_channels": 48}
    assert with_width("DiT-Mini/2", {"depth": 2}, None) == {"depth": 2}
    assert with_width("DiT-Mini/2", {}, 24, head_width=8) == {"hidden_size": 24, "num_heads": 3}
    model = build_model(dict(name="DiT-Mini/2", **DIGITS, **with_width("DiT-Mini/2", {}, 64)))
    assert model.blocks[0].attn.num_heads == 2 and model.x_embedder.proj.out_channels == 64
    with pytest.raises(ConfigError, match="multiple of 32"):
        with_width("DiT-Mini/2", {}, 48)
    with pytest.raises(ConfigError, match="multiple of 16"):
        with_width("DiT-Mini/2", {}, 24, head_width=16)
    with pytest.raises(ConfigError, match="set model.width too"):
        with_width("DiT-Mini/2", {}, None, head_width=8)
    with pytest.raises(ConfigError, match="head_channels"):
        with_width("UNet-T8", {}, 16, head_width=8)
    with pytest.raises(ConfigError, match="drop model.kwargs.hidden_size"):
        with_width("DiT-Mini/2", {"hidden_size": 64}, 64)
    with pytest.raises(ConfigError, match="not JiT-H/16"):   # no size table of its own: widths go in model.kwargs
        with_width("JiT-H/16", {}, 160)


def test_a_budget_buys_the_steps_of_the_papers_unit():
    train = {"steps": 7, "flops": None}
    assert budget_steps(train, 0.01, 32) == 7
    gflops = model_stats(lambda: build_model(dict(name="DiT-Mini/2", **DIGITS)), (1, 8, 8))["gflops"]
    steps = budget_steps({"steps": 7, "flops": 1e12}, gflops, 32)
    assert steps == round(1e12 / (3 * gflops * 1e9 * 32))
    assert abs(3 * gflops * 1e9 * 32 * steps - 1e12) <= 3 * gflops * 1e9 * 32 / 2   # within half a step
    with pytest.raises(ConfigError, match="buys no step"):
        budget_steps({"steps": 7, "flops": 1e3}, gflops, 32)
    with pytest.raises(ConfigError, match="positive"):
        budget_steps({"steps": 7, "flops": -1.0}, gflops, 32)


def test_a_run_with_a_width_and_a_budget_trains_the_steps_it_buys(tmp_path):
    overrides = ["logger=none", "device=cpu", "precision=fp32", "model.width=64", "model.param=mup",
                 "model.base_width=32", "train.flops=2e9", "train.batch_size=8", "train.log_every=1",
                 "eval.every=1000", "eval.num_images=16", "eval.times=2", "sample.steps=2", "sample.per_class=1",
                 "fid.at_end=false", f"run_dir={tmp_path}/run"]
    train_script.train(compose_config(overrides=overrides))
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    gflops = next(r["gflops"] for r in rows if "gflops" in r)
    assert config["train"]["steps"] == round(2e9 / (3 * gflops * 1e9 * 8)) > 1
    assert [r["step"] for r in rows if "eval_loss" in r] == [config["train"]["steps"]]   # evaluated at the end
    ckpt = torch.load(sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert ckpt["model_args"]["hidden_size"] == 64 and ckpt["model_args"]["num_heads"] == 2
    assert ckpt["model_args"]["param"] == "mup" and ckpt["model_args"]["base_width"] == 32


def write_point(root, family_model, param, width, lr, loss, steps=400, finished=True):
    run = root / f"{family_model}_param={param},width={width},lr={lr}"
    run.mkdir(parents=True)
    config = {"model": {"name": family_model, "param": param, "width": width, "base_width": 32, "kwargs": {}},
              "train": {"steps": steps, "batch_size": 32}, "optim": {"lr": lr}, "seed": 0}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    last = steps if finished else steps // 2
    rows = [{"step": last // 2, "eval_loss": loss + 0.1, "eval_loss_se": 0.01},
            {"step": last, "eval_loss": loss, "eval_loss_se": 0.01}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_lr_transfer_finds_each_widths_best_rate_and_whether_it_moves(tmp_path, capsys):
    lrs = [2.0 ** k for k in range(-12, -5)]
    for width, shift in ((32, 0), (64, 0), (128, 1)):          # mup: the optimum moves by one step at most
        for i, lr in enumerate(lrs):
            write_point(tmp_path / "runs", "DiT-Mini/2", "mup", width, lr, 0.5 + 0.02 * (i - 3 - shift) ** 2)
    for width, shift in ((32, 0), (64, -1), (128, -3)):         # sp: it falls with width
        for i, lr in enumerate(lrs):
            write_point(tmp_path / "runs", "DiT-Mini/2", "sp", width, lr, 0.5 + 0.02 * (i - 4 - shift) ** 2,
                        finished=not (width == 128 and i == 6))   # a run that stopped: missing, not a best
    groups = scaling_main(["lr", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    by = {(g["param"]): g for g in groups}
    assert [c["best_lr"] for c in by["mup"]["curves"]] == [lrs[3], lrs[3], lrs[4]]
    assert by["mup"]["transfers"] and by["mup"]["spread_steps"] == pytest.approx(1.0)
    assert [c["best_lr"] for c in by["sp"]["curves"]] == [lrs[4], lrs[3], lrs[1]]
    assert not by["sp"]["transfers"] and by["sp"]["spread_steps"] == pytest.approx(3.0)
    assert by["sp"]["curves"][2]["losses"][6] is None                             # the stopped run
    assert by["mup"]["curves"][0]["refined_lr"] == pytest.approx(lrs[3], rel=1e-6)  # a symmetric parabola
    assert "stopped" in capsys.readouterr().err
    assert (tmp_path / "out" / "lr_transfer.png").stat().st_size > 10_000
    assert "within one grid step" in (tmp_path / "out" / "lr_transfer.md").read_text()


def test_lr_transfer_refuses_runs_without_a_width(tmp_path):
    write_point(tmp_path / "runs", "DiT-Mini/2", "sp", None, 1e-3, 0.5)
    with pytest.raises(ConfigError, match="model.width"):
        lr_transfer.load_points([tmp_path / "runs"])


def test_refine_is_the_parabolas_vertex():
    lrs = [1e-3, 2e-3, 4e-3]
    losses = [(math.log2(lr) - math.log2(2.5e-3)) ** 2 for lr in lrs]
    assert lr_transfer.refine(lrs, losses, 1) == pytest.approx(2.5e-3)
    assert lr_transfer.refine(lrs, losses, 0) is None


@pytest.mark.parametrize("name, widths", [("mup-lr-digits", "32,64,128"), ("mup-lr-digits-unet", "16,32,64")])
def test_the_lr_sweeps_compose(name, widths):
    cfg = compose_config(overrides=[f"experiment={name}"])
    params = yaml.safe_load((ROOT / "conf" / "experiment" / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]
    assert params["model.width"] == widths and len(params["optim.lr"].split(",")) >= 5
    assert cfg.logger.group == name and cfg.threads == 1 and cfg.eval.every > 0
    ws = [int(w) for w in widths.split(",")]
    assert max(ws) / min(ws) >= 4 and cfg.model.base_width == min(ws)
    with_width(cfg.model.name, cfg.model.kwargs, max(ws))   # every width builds


@pytest.mark.parametrize("name, budgets", [("isoflop-digits", 4), ("isoflop-digits-unet", 4),
                                           ("isoflop-imagenet256", 5), ("isoflop-imagenet256-unet", 5)])
def test_the_isoflop_sweeps_compose_with_budgets_sizes_and_seeds_as_the_protocol_asks(name, budgets):
    overrides = [f"experiment={name}"] + (["data.path=/nowhere", "eval.path=/nowhere"] if "imagenet" in name else [])
    cfg = compose_config(overrides=overrides)
    params = yaml.safe_load((ROOT / "conf" / "experiment" / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]
    flops = sorted(float(f) for f in params["train.flops"].split(","))
    assert len(flops) == budgets and all(b / a >= 3 for a, b in zip(flops, flops[1:]))
    widths = [int(w) for w in params["model.width"].split(",")]
    assert len(widths) >= 5 and len(params["seed"].split(",")) >= 2
    assert cfg.model.param == "mup" and min(widths) <= cfg.model.base_width <= max(widths)
    assert cfg.optim.cooldown_fraction > 0 and cfg.eval.every > 0 and cfg.logger.group == name.removesuffix("-unet")
    for width in widths:   # every width of the grid builds, and every budget buys a step of the widest
        kwargs = with_width(cfg.model.name, cfg.model.kwargs, width, cfg.model.head_width)
    size = 32 if "imagenet" in name else 8
    shape = (4, size, size) if "imagenet" in name else (1, 8, 8)
    gflops = model_stats(lambda: build_model(dict(name=cfg.model.name, input_size=size, in_channels=shape[0],
                                                  num_classes=10, learn_sigma=False, **kwargs)), shape)["gflops"]
    assert budget_steps({"steps": 1, "flops": flops[0]}, gflops, cfg.train.batch_size) >= 10


def test_the_mup_proxy_sweeps_five_base_rates_a_factor_two_apart():
    cfg = compose_config(overrides=["experiment=mup-proxy-imagenet256", "data.path=/nowhere", "eval.path=/nowhere"])
    params = yaml.safe_load((ROOT / "conf" / "experiment" / "mup-proxy-imagenet256.yaml").read_text())["hydra"][
        "sweeper"]["params"]
    lrs = sorted(float(v) for v in params["optim.lr"].split(","))
    assert len(lrs) == 5 and all(b / a == 2 for a, b in zip(lrs, lrs[1:]))
    assert cfg.model.width == cfg.model.base_width == 288 and cfg.model.param == "mup"
    assert with_width(cfg.model.name, {}, 288) == {"hidden_size": 288, "num_heads": 4}   # μP-DiT's base: 4 x 72


def test_the_collector_prefers_the_evaluation_loss_and_never_averages_it(tmp_path):
    from evaluation import scaling
    for name, gflops, losses in (("DiT-T-2", 0.04, [0.9, 0.6, 0.5]), ("DiT-S-2", 0.35, [0.8, 0.5, 0.4])):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": name.replace("-2", "/2")},
                                                         "train": {"batch_size": 32}}))
        rows = [{"step": 100 * (i + 1), "loss": 1.0, "gflops": gflops, "fid": 3.0 - i} for i in range(3)]
        rows += [{"step": 100 * (i + 1), "eval_loss": v, "eval_loss_se": 0.01} for i, v in enumerate(losses)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = scaling.collect([tmp_path / "runs"], out_dir=tmp_path / "out", last=3)
    assert result["metric"] == "eval_loss" and result["label"] == "evaluation loss"
    assert sorted(r["value"] for r in result["records"]) == [0.4, 0.5]     # the last row's, not a mean of three
    assert result["fits"]["gflops"]["b"] < 0
    assert scaling.collect([tmp_path / "runs"], out_dir=tmp_path / "fid", metric="fid")["metric"] == "fid"


@pytest.mark.slow   # a subprocess, ~15 s
@pytest.mark.ci
def test_the_collectors_command_line_reports_a_users_mistake_in_one_line(tmp_path):
    import subprocess
    import sys
    # One subcommand: `lr` goes through the same wrapper (evaluation.scaling's __main__), and each call costs ~10 s.
    done = subprocess.run([sys.executable, "-m", "evaluation.scaling", "isoflop", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done
