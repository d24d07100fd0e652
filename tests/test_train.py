"""train.py and sample.py end to end on CPU: configs, checkpoints, exact resume, DDP, errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf
from PIL import Image

import sample as sample_script
import train as train_script
from conftest import (
    CONF,
    PINNED,
    ROOT,
    TINY,
    assert_same_state,
    compose_config,
    final_state,
    image_folder,
    read_run_metrics,
    run_script,
)
from models import MODELS
from utils.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, load_model_weights
from utils.errors import ConfigError
from utils.schedule import learning_rate, schedule


def group_options(group):
    return sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))


# ------------------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [   # models and experiments: 49 and 27 files, 22 s; the sweeps' and the latent
    pytest.param("model", marks=pytest.mark.slow),   # recipes' experiments also compose in test_scaling_study.py and
    "data", "diffusion", "optim", "logger",          # test_latent_experiments.py
    pytest.param("experiment", marks=pytest.mark.slow)])
def test_every_config_composes(group, tmp_path):
    options = group_options(group)
    assert options, f"conf/{group} is empty"
    for option in options:
        cfg = compose_config(overrides=[f"{group}={option}", f"run_dir={tmp_path}", "data.path=/nowhere"])
        resolved = OmegaConf.to_container(cfg, resolve=True)
        assert resolved["run_dir"]
        assert resolved["model"]["name"] in MODELS, f"{group}={option}: unknown model {resolved['model']['name']}"
        assert resolved["logger"]["backend"] in ("wandb", "none")


def test_model_configs_cover_the_size_table():
    names = {OmegaConf.load(p).name for p in (Path(CONF) / "model").glob("*.yaml")}
    for size in ("S", "B", "L", "XL"):
        for patch in (2, 4, 8):
            assert f"DiT-{size}/{patch}" in names


def test_sample_config_composes():
    cfg = compose_config("sample", ["ckpt=x.pt"])
    assert cfg.sampler == "auto" and cfg.num_samples > 0


def test_unknown_group_options_list_the_valid_ones():
    for override in ("model=DiT-Q-2", "data=cifar", "logger=tensorboard"):
        with pytest.raises(MissingConfigException) as error:
            compose_config(overrides=[override])
        group = override.split("=")[0]
        # Hydra names the valid options of the group in its message.
        assert group_options(group)[0] in str(error.value)


@pytest.mark.slow   # subprocesses: over 10 s on 2 cores (the default suite stays near 5 minutes)
def test_dry_run_prints_the_resolved_config(tmp_path):
    result = run_script(["train.py", "dry_run=true", f"run_dir={tmp_path}/r"])
    printed = OmegaConf.create(result.stdout)
    assert printed.run_dir == f"{tmp_path}/r" and printed.model.name == "DiT-Mini/2"
    assert not (tmp_path / "r" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_config(overrides=[*TINY, "diffusion=ddpm", f"run_dir={run_dir}"])   # DDPM: the DiT paper's objective
    train_script.train(cfg)
    return run_dir


def test_training_writes_checkpoint_metrics_grid_and_config(trained_run):
    ckpts = list_checkpoints(trained_run / "checkpoints")
    assert [int(p.stem) for p in ckpts] == [2, 4]  # keep_last=2
    ckpt = load_checkpoint(ckpts[-1])  # weights_only=True
    assert {"model", "ema", "opt", "step", "config", "model_args", "rng"} <= set(ckpt)
    assert ckpt["step"] == 4 and ckpt["config"]["train"]["steps"] == 4
    assert ckpt["rng"]["samples_seen"] == 4 * 16
    rows = read_run_metrics(trained_run)
    final = rows.pop()  # the end of the run: the digits default scores its EMA on the digits network's features
    assert final["step"] == 4 and final["fid_features"] == "digits" and final["fid"] > final["fid_floor"] > 0
    assert 0 <= final["class_accuracy"] <= 1 and final["fid_samples"] == 50
    assert [r["step"] for r in rows] == [2, 4]
    for key in ("loss", "mse", "vb", "grad_norm", "images_per_sec", "step_time", "lr"):
        assert np.isfinite(rows[-1][key]), key
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["mse"] + rows[-1]["vb"], rel=1e-5)
    assert rows[-1]["train_compute_gflops"] == pytest.approx(rows[-1]["gflops"] * 3 * 16 * 4)
    assert Image.open(trained_run / "samples" / "0000004.png").size[0] > 0
    assert OmegaConf.load(trained_run / "config.yaml").train.steps == 4


def test_ema_differs_from_model_and_both_moved(trained_run):
    ckpt = load_checkpoint(latest_checkpoint(trained_run / "checkpoints"))
    w = "final_layer.linear.weight"  # zero at initialisation
    assert ckpt["model"][w].abs().sum() > 0 and ckpt["ema"][w].abs().sum() > 0
    assert not torch.equal(ckpt["model"][w], ckpt["ema"][w])


def test_sample_script_writes_adm_npz(trained_run, tmp_path):
    cfg = compose_config("sample", [f"ckpt={trained_run}", "num_samples=13", "batch_size=5", "steps=3",
                                    f"out={tmp_path}/s", "device=cpu"])
    out = sample_script.run(cfg)
    data = np.load(out / "samples.npz")
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (13, 8, 8, 1)
    assert data["arr_1"].dtype == np.int64 and data["arr_1"].tolist() == [i % 10 for i in range(13)]
    assert (out / "grid.png").exists() and not (out / "shards").exists()
    provenance = json.loads((out / "samples.json").read_text())
    assert provenance["step"] == 4 and provenance["steps"] == 3 and provenance["num_samples"] == 13


def test_sample_noise_does_not_depend_on_batch_size(trained_run, tmp_path):
    arrays = []
    for batch_size in (2, 7):
        cfg = compose_config("sample", [f"ckpt={trained_run}", "num_samples=7", f"batch_size={batch_size}",
                                        "steps=3", "sampler=ddim", f"out={tmp_path}/b{batch_size}", "device=cpu"])
        arrays.append(np.load(sample_script.run(cfg) / "samples.npz")["arr_0"])
    np.testing.assert_array_equal(arrays[0], arrays[1])


@pytest.mark.slow
@pytest.mark.distributed
def test_sampling_under_torchrun_equals_one_process(trained_run, tmp_path):
    """Two ranks draw contiguous blocks of the same per-sample noise; rank 0 merges them in order."""
    common = [f"ckpt={trained_run}", "num_samples=7", "batch_size=3", "steps=3", "sampler=ddim", "device=cpu"]
    run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29539", "sample.py", *common,
                f"out={tmp_path}/two"], env={"OMP_NUM_THREADS": "1"})
    one = np.load(sample_script.run(compose_config("sample", [*common, f"out={tmp_path}/one"])) / "samples.npz")
    two = np.load(tmp_path / "two" / "samples.npz")
    np.testing.assert_array_equal(two["arr_1"], one["arr_1"])
    np.testing.assert_array_equal(two["arr_0"], one["arr_0"])
    assert json.loads((tmp_path / "two" / "samples.json").read_text())["world_size"] == 2
    assert not (tmp_path / "two" / "shards").exists()


def test_finished_run_extends_when_steps_are_raised(tmp_path):
    overrides = [*TINY, f"run_dir={tmp_path}"]
    train_script.train(compose_config(overrides=overrides))
    train_script.train(compose_config(overrides=[*overrides, "train.steps=6"]))
    assert load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))["step"] == 6
    rows = read_run_metrics(tmp_path)
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in rows if "fid" in r] == [4, 6]  # each run's end


def test_flow_training_logs_its_terms_and_samples_with_a_flow_sampler(tmp_path):
    run_dir = tmp_path / "flow"
    train_script.train(compose_config(overrides=[*TINY, "diffusion=flow", f"run_dir={run_dir}"]))
    ckpt = final_state(run_dir)
    assert ckpt["config"]["diffusion"]["objective"] == "flow" and ckpt["model_args"]["learn_sigma"] is False
    assert ckpt["model"]["final_layer.linear.weight"].shape[0] == 2 * 2 * 1   # p^2 * C: no variance channels
    row = [r for r in read_run_metrics(run_dir) if "loss" in r][-1]
    assert np.isfinite(row["loss"]) and "vb" not in row and "mse" not in row
    out = sample_script.run(compose_config("sample", [f"ckpt={run_dir}", "num_samples=6", "steps=3",
                                                      "device=cpu", "cfg_scale=2", "guidance_low=0.5"]))
    assert out.name.startswith("ode-heun3-cfg2-seed0-n6-step4-")  # sampler=auto picks the flow default
    provenance = json.loads((out / "samples.json").read_text())
    assert provenance["objective"] == "flow" and provenance["sampler"] == "ode" and provenance["guidance_low"] == 0.5
    assert np.load(out / "samples.npz")["arr_0"].shape == (6, 8, 8, 1)
    sde = sample_script.run(compose_config("sample", [f"ckpt={run_dir}", "num_samples=4", "sampler=sde", "steps=4",
                                                      "device=cpu", f"out={tmp_path}/sde"]))
    assert json.loads((sde / "samples.json").read_text())["sde"]["diffusion_form"] == "sigma"
    with pytest.raises(ValueError, match="does not fit a model trained with diffusion.objective=flow"):
        sample_script.run(compose_config("sample", [f"ckpt={run_dir}", "sampler=ddpm", "device=cpu"]))


def test_flow_with_the_cosine_loss_on_rgb_logs_both_terms(tmp_path):
    folder = image_folder(tmp_path / "imgs")
    run_dir = tmp_path / "cos"
    train_script.train(compose_config(overrides=[*TINY, "data=imagefolder", f"data.path={folder}", "data.image_size=8",
                                                 "data.num_workers=0", "train.batch_size=4", "diffusion=flow",
                                                 "diffusion.cosine_loss=true", f"run_dir={run_dir}"]))
    row = [r for r in read_run_metrics(run_dir) if "loss" in r][-1]
    assert row["loss"] == pytest.approx(row["mse"] + row["cos"], rel=1e-5) and 0 <= row["cos"] <= 2


def test_ddpm_model_refuses_flow_samplers(trained_run):
    with pytest.raises(ValueError, match="probability-flow ODE is what ddim"):
        sample_script.run(compose_config("sample", [f"ckpt={trained_run}", "sampler=ode", "device=cpu"]))


def test_resume_with_another_objective_is_refused(trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "run")
    with pytest.raises(ValueError, match="diffusion="):
        train_script.train(compose_config(overrides=[*TINY, "diffusion=flow", f"run_dir={tmp_path}/run"]))


# ------------------------------------------------------------------------------------------------------------
# Exact resume
# ------------------------------------------------------------------------------------------------------------





@pytest.mark.parametrize("objective", [pytest.param("ddpm", marks=pytest.mark.slow),
                                       pytest.param("flow", marks=[pytest.mark.slow, pytest.mark.ci]),
                                       pytest.param("meanflow", marks=pytest.mark.slow),
                                       pytest.param("shortcut", marks=pytest.mark.slow)])
def test_resume_after_sigkill_is_bit_exact(tmp_path, objective):
    overrides = [*PINNED, f"diffusion={objective}", "logger=none", "device=cpu", "train.steps=12", "train.batch_size=16",
                 "train.log_every=1", "train.ckpt_every=3", "train.keep_last=10", "sample.steps=2", "sample.per_class=1",
                 "fid.at_end=false"]
    # The reference: one uninterrupted run.
    train_script.train(compose_config(overrides=[*overrides, f"run_dir={tmp_path}/ref"]))

    # The same command, killed with SIGKILL once its second checkpoint is on disk, then re-run twice.
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "train.py", *overrides, f"run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(list_checkpoints(run_dir / "checkpoints")) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest_checkpoint(run_dir / "checkpoints")
    assert killed_at is not None and int(killed_at.stem) < 12, "the run finished before it could be killed"
    # A leftover temporary file from a write cut short must be ignored.
    (run_dir / "checkpoints" / ".0000099.pt.tmp123").write_bytes(b"partial")
    run_script(cmd[1:])
    assert_same_state(final_state(tmp_path / "ref"), final_state(run_dir))
    rows = read_run_metrics(run_dir)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 13)), "metrics.jsonl must have each step exactly once after the resume"


def test_learning_rate_warms_up_holds_and_cools_down():
    lr = lambda step, cooldown: learning_rate(step, 2.0, 4, cooldown, 20)
    assert [lr(s, 0) for s in range(20)] == pytest.approx([0.5, 1.0, 1.5] + [2.0] * 17)
    # The last 5 of 20 updates fall linearly, step 19 (the 20th update) at base / 5; before them warm-up and hold.
    assert [lr(s, 5) for s in range(20)] == pytest.approx([0.5, 1.0, 1.5] + [2.0] * 13 + [1.6, 1.2, 0.8, 0.4])
    # A cool-down longer than the run after warm-up: the smaller of the two factors.
    assert lr(0, 20) == pytest.approx(0.5) and lr(10, 20) == pytest.approx(1.0)


def test_learning_rate_decays_to_a_floor_and_holds_it_after_the_decays_end():
    optim = lambda **kw: OmegaConf.create({"lr": 2.0, "warmup_steps": 0, "cooldown_fraction": 0.5, **kw})
    # Decay over the last 4 of 8 steps to 0.4, then the floor to step 12; the rate falls by (2 - 0.4) / 4 a step.
    rate = schedule(optim(cooldown_end=8, final_lr=0.4), 12)
    assert [rate(s) for s in range(12)] == pytest.approx([2.0] * 5 + [1.6, 1.2, 0.8] + [0.4] * 4)
    # No floor and no end: today's decay to base / cooldown at the last step, unchanged.
    assert [schedule(optim(), 8)(s) for s in range(8)] == [learning_rate(s, 2.0, 0, 4, 8) for s in range(8)]
    # A run shorter than the schedule is its prefix.
    assert [schedule(optim(cooldown_end=8, final_lr=0.4), 6)(s) for s in range(6)] == [rate(s) for s in range(6)]
    for bad, match in [(dict(final_lr=3.0), "final_lr=3.0 must be between 0 and optim.lr"),
                       (dict(cooldown_end=0), "cooldown_end=0 must be a positive step"),
                       (dict(cooldown_fraction=0.0, final_lr=0.1), "needs a decay to end at it")]:
        with pytest.raises(ConfigError, match=match):
            schedule(optim(**bad), 8)


@pytest.mark.slow   # ~4 s; the schedule itself is tested fast above
def test_cooldown_is_logged_and_resumes_exactly(tmp_path):
    overrides = [*TINY, "train.steps=6", "train.log_every=1", "optim.warmup_steps=0", "optim.cooldown_fraction=0.67"]  # 4 of 6 steps
    train_script.train(compose_config(overrides=[*overrides, f"run_dir={tmp_path}/ref"]))
    rows = read_run_metrics(tmp_path / "ref")
    base = compose_config(overrides=overrides).optim.lr
    assert [r["lr"] for r in rows if "loss" in r] == pytest.approx([base, base, base, 0.75 * base, 0.5 * base,
                                                                     0.25 * base])
    # Resumed from the step-4 checkpoint (mid-cool-down, the same train.steps): the uninterrupted run's bits.
    shutil.copytree(tmp_path / "ref", tmp_path / "resumed")
    (tmp_path / "resumed" / "checkpoints" / "0000006.pt").unlink()
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").stem == "0000004"
    train_script.train(compose_config(overrides=[*overrides, f"run_dir={tmp_path}/resumed"]))
    assert_same_state(final_state(tmp_path / "ref"), final_state(tmp_path / "resumed"))


# ------------------------------------------------------------------------------------------------------------
# Distributed
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective, param", [   # slow (25 s and more each); CI runs them all in every run
    ("flow", "sp"), ("ddpm", "sp"), ("flow", "mup"), ("meanflow", "sp"), ("shortcut", "sp")])
@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_gloo_processes_match_one_process(tmp_path, objective, param):
    """Two processes train what one does; under μP too (its per-group learning rates, readout multiplier)."""
    overrides = [*PINNED, f"diffusion={objective}", f"model.param={param}", "model.base_width=32", "logger=none", "device=cpu", "train.steps=2", "train.batch_size=16", "train.log_every=1",
                 "train.ckpt_every=2", "sample.steps=2", "sample.per_class=1"]
    run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "train.py",
                *overrides, f"run_dir={tmp_path}/ddp"], env={"OMP_NUM_THREADS": "1"})
    train_script.train(compose_config(overrides=[*overrides, f"run_dir={tmp_path}/single"]))
    ddp, single = final_state(tmp_path / "ddp"), final_state(tmp_path / "single")
    for name in single["model"]:
        torch.testing.assert_close(ddp["model"][name], single["model"][name], rtol=1e-5, atol=1e-6)
    assert ddp["config"]["train"]["batch_size"] == 16 and ddp["model_args"]["param"] == param


# ------------------------------------------------------------------------------------------------------------
# Clear errors
# ------------------------------------------------------------------------------------------------------------

def test_imagefolder_trains(tmp_path):
    folder = image_folder(tmp_path / "imgs")
    cfg = compose_config(overrides=[*TINY, "data=imagefolder", f"data.path={folder}", "data.image_size=8",
                                    "data.num_workers=0", "train.batch_size=4", f"run_dir={tmp_path}/run"])
    train_script.train(cfg)
    args = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))["model_args"]
    assert args["in_channels"] == 3 and args["num_classes"] == 2 and args["input_size"] == 8


def test_image_size_not_divisible_by_patch(tmp_path):
    folder = image_folder(tmp_path / "imgs")
    cfg = compose_config(overrides=[*TINY, "data=imagefolder", f"data.path={folder}", "data.image_size=6",
                                    "model=DiT-T-4", f"run_dir={tmp_path}/run"])
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        train_script.train(cfg)


def test_missing_and_empty_data_folders(tmp_path):
    cfg = compose_config(overrides=[*TINY, "data=imagefolder", f"data.path={tmp_path}/absent", f"run_dir={tmp_path}/r"])
    with pytest.raises(FileNotFoundError, match="does not exist; set data.path"):
        train_script.train(cfg)
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    cfg = compose_config(overrides=[*TINY, "data=imagefolder", f"data.path={tmp_path}/empty", f"run_dir={tmp_path}/r"])
    with pytest.raises(FileNotFoundError, match="no images found"):
        train_script.train(cfg)


def test_unreadable_image_names_the_file(tmp_path):
    from data import ImageFolderDataset
    folder = image_folder(tmp_path / "imgs")
    broken = folder / "class1" / "broken.png"
    broken.write_bytes(b"not a png")
    dataset = ImageFolderDataset(folder, 8)
    index = [i for i, (path, _) in enumerate(dataset.samples) if path.endswith("broken.png")][0]
    with pytest.raises(RuntimeError, match="broken.png"):
        dataset[index]


def test_resume_with_another_model_is_refused(trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "run")
    cfg = compose_config(overrides=[*TINY, "diffusion=ddpm", "model=DiT-T-4", f"run_dir={tmp_path}/run"])
    with pytest.raises(ValueError, match="restore those settings to resume, or set a new run_dir"):
        train_script.train(cfg)


def test_checkpoint_that_does_not_fit_the_model(trained_run):
    from models import create_model
    ckpt = load_checkpoint(latest_checkpoint(trained_run / "checkpoints"))
    model = create_model("DiT-T/4", input_size=8, in_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="does not fit the model") as error:
        load_model_weights(model, ckpt["ema"], "ckpt.pt")
    assert "x_embedder.proj.weight" in str(error.value)


def test_bad_device_and_precision(tmp_path):
    with pytest.raises(ValueError, match="choose auto, cpu or cuda"):
        train_script.train(compose_config(overrides=[*TINY, "device=tpu", f"run_dir={tmp_path}"]))
    with pytest.raises(ValueError, match="choose one of fp32, bf16, auto"):
        train_script.train(compose_config(overrides=[*TINY, "precision=fp16", f"run_dir={tmp_path}"]))


# ------------------------------------------------------------------------------------------------------------
# Logging and sweeps
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.slow   # ~5 s
def test_wandb_offline_run(tmp_path):
    overrides = [o for o in TINY if not o.startswith("logger")] + ["logger=wandb", "logger.mode=offline",
                                                                  f"run_dir={tmp_path}"]
    os.environ["WANDB_SILENT"] = "true"
    train_script.train(compose_config(overrides=overrides))
    assert (tmp_path / "wandb_id.txt").exists()
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline W&B run folder"


@pytest.mark.slow   # subprocesses: over 10 s on 2 cores (the default suite stays near 5 minutes)
def test_multirun_gives_each_run_its_own_run_dir(tmp_path):
    run_script([str(ROOT / "train.py"), "-m", "model=DiT-T-2,DiT-T-4", *TINY], cwd=tmp_path)
    run_dirs = sorted(p.name for p in (tmp_path / "runs" / "digits").iterdir())
    assert [d.split("_")[0] for d in run_dirs] == ["DiT-T-2", "DiT-T-4"]
    for name in run_dirs:
        assert latest_checkpoint(tmp_path / "runs" / "digits" / name / "checkpoints") is not None


@pytest.mark.slow
def test_fid_during_training(tmp_path):
    from evaluation import ImageSource, build_reference, write_random_inception_weights
    from data import DigitsDataset
    weights = tmp_path / "inception.pth"
    write_random_inception_weights(weights)
    real = DigitsDataset().images[:16]
    reference = tmp_path / "ref.npz"
    build_reference(ImageSource.from_array(((real + 1) * 127.5).round().to(torch.uint8)), reference,
                    inception_weights=str(weights), progress=False)
    cfg = compose_config(overrides=[*TINY, f"run_dir={tmp_path}/run", "fid.every=2", "fid.num_samples=12",
                                    "fid.features=inception", f"fid.reference={reference}", f"fid.inception_weights={weights}"])
    train_script.train(cfg)
    rows = read_run_metrics(tmp_path / "run")
    fids = [r for r in rows if "fid" in r]
    assert [r["step"] for r in fids] == [2, 4] and all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in fids)


@pytest.mark.parametrize("precision", [pytest.param("fp32", marks=pytest.mark.slow), "bf16"])   # bf16 is the case
def test_grids_and_fid_samples_are_drawn_in_the_training_precision(precision, tmp_path, monkeypatch):
    """train.py's own sampling (grids, FD samples) runs the network under the training precision's autocast; what
    it decodes and scores is fp32 either way."""
    autocast = []

    def spy(*args, **kwargs):
        autocast.append(torch.is_autocast_enabled("cpu"))
        return sample(*args, **kwargs)

    import diffusion.sampling

    sample = diffusion.sampling.sample
    monkeypatch.setattr(diffusion.sampling, "sample", spy)
    train_script.train(compose_config(overrides=[*TINY, f"precision={precision}", "train.sample_every=2",
                                                 f"run_dir={tmp_path}"]))
    assert len(autocast) == 3  # the grid at step 2, the final grid, the final FD samples (50: one batch)
    assert autocast == [precision == "bf16"] * 3


def test_fid_without_reference_is_refused(tmp_path):
    """Digits features need no file (the train split is the reference); other networks need a reference."""
    cfg = compose_config(overrides=[*TINY, f"run_dir={tmp_path}", "fid.every=2", "fid.features=inception"])
    with pytest.raises(ValueError, match="needs fid.reference"):
        train_script.train(cfg)
    folder = image_folder(tmp_path / "imgs")
    cfg = compose_config(overrides=[*TINY, "data=imagefolder", f"data.path={folder}", "data.image_size=8",
                                    "fid.features=digits", "fid.every=2", f"run_dir={tmp_path}/r"])
    with pytest.raises(ValueError, match="fid.features=digits measures 8x8 digits"):
        train_script.train(cfg)


def test_official_style_checkpoint_loads_with_its_heads(tmp_path):
    """A bare state_dict (the official DiT-XL-2-256x256.pt format) is rebuilt with the right number of heads:
    heads leave no trace in the shapes, so a wrong count would load and silently compute something else."""
    from models import create_model
    torch.manual_seed(0)
    model = create_model("DiT-Mini/2", input_size=8, in_channels=4, num_classes=10)  # 4 heads of width 32
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    torch.save(model.state_dict(), tmp_path / "official.pt")
    loaded, info = sample_script.load_sampling_model(tmp_path / "official.pt")
    assert info["model_args"]["num_heads"] == 4 and info["model_args"]["num_classes"] == 10
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)


def test_step_sampler_is_a_permutation_per_epoch_across_batches_and_ranks():
    from data import StepSampler
    n, B = 10, 4  # batches straddle epoch boundaries
    ranks = [StepSampler(n, B, rank=r, world_size=2, seed=3) for r in range(2)]
    stream = torch.cat([torch.cat([s.indices(step) for s in ranks]) for step in range(5)])  # 20 = 2 epochs
    for epoch in range(2):
        assert sorted(stream[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    one = StepSampler(n, B, seed=3)
    assert torch.equal(torch.cat([one.indices(s) for s in range(5)]), stream)  # same global order, any world size
