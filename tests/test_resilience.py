"""Long runs lose nothing: divergence guard, stop signals, wall-clock and corrupt checkpoints, SLURM launchers,
and user mistakes reported without a traceback."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import train as train_script
from conftest import SIGNAL_RUN, wait_for_rows, ROOT, TINY, assert_same_state, compose_config, final_state, read_run_metrics, run_script
from utils.checkpoint import list_checkpoints, load_checkpoint
from utils.errors import Diverged
from utils.guard import first_nonfinite_tensor

DIVERGE = [*TINY, "train.steps=30", "train.ckpt_every=2", "train.keep_last=3", "optim.lr=1e6"]


# ------------------------------------------------------------------------------------------------------------
# Divergence
# ------------------------------------------------------------------------------------------------------------

def test_a_diverging_run_stops_before_the_update_and_keeps_its_good_checkpoints(tmp_path):
    with pytest.raises(Diverged) as error:
        train_script.train(compose_config(overrides=[*DIVERGE, f"run_dir={tmp_path}"]))
    message = str(error.value)
    assert "is not finite" in message and "last good checkpoint is" in message and "optim.lr" in message
    step = int(message.split(":")[0].split()[1])
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert kept and int(kept[-1].stem) < step
    for path in kept:  # every checkpoint written is finite; the newest finite one is still there
        ckpt = load_checkpoint(path)
        assert first_nonfinite_tensor({k: ckpt[k] for k in ("model", "ema", "opt")}) is None, path
    assert str(kept[-1]) in message


def test_skip_nonfinite_skips_and_logs_then_stops(tmp_path):
    with pytest.raises(Diverged, match="train.skip_nonfinite"):
        train_script.train(compose_config(overrides=[*DIVERGE, "train.skip_nonfinite=3", f"run_dir={tmp_path}"]))
    skipped = [r for r in read_run_metrics(tmp_path) if r.get("skipped")]
    assert len(skipped) == 3 and [r["skipped_steps"] for r in skipped] == [1, 2, 3]
    assert all(r["nonfinite"] in ("loss", "gradient norm") for r in skipped)
    assert [r["step"] for r in skipped] == sorted(r["step"] for r in skipped)


@pytest.mark.slow   # a subprocess, ~20 s; the in-process divergence tests stay in the default suite
@pytest.mark.ci
def test_a_diverging_command_exits_with_a_message_and_no_traceback(tmp_path):
    result = run_script(["train.py", *DIVERGE, f"run_dir={tmp_path}"], check=False)
    assert result.returncode == 2 and "error: step" in result.stderr and "Traceback" not in result.stderr


def test_a_nonfinite_checkpoint_is_never_written(tmp_path):
    from utils.checkpoint import save_checkpoint
    state = {"model": {"w": torch.tensor([1.0, float("nan")])}, "ema": {}, "opt": {}, "step": 3}
    with pytest.raises(Diverged, match="model.w holds NaN or inf"):
        save_checkpoint(state, tmp_path, 3)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------------------
# Stop signals: a checkpoint at that step, the exit code, and a resume equal to an uninterrupted run
# ------------------------------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train_script.train(compose_config(overrides=[*SIGNAL_RUN, f"run_dir={run_dir}"]))
    return run_dir


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow),
                                 pytest.param(signal.SIGUSR1, marks=[pytest.mark.slow, pytest.mark.ci])])
def test_a_stop_signal_checkpoints_exits_and_resumes_bit_exactly(tmp_path, uninterrupted, sig):
    cmd = [sys.executable, "train.py", *SIGNAL_RUN, f"run_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_rows(tmp_path, 3, proc)
    proc.send_signal(sig)
    proc.send_signal(sig)  # a second signal while it saves changes nothing
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, output
    stopped = list_checkpoints(tmp_path / "checkpoints")
    assert len(stopped) == 1 and 3 <= int(stopped[0].stem) < 40, "one checkpoint, at the step it stopped"
    assert f"received signal {int(sig)}" in output
    run_script(cmd[1:])
    assert_same_state(final_state(uninterrupted), final_state(tmp_path))
    steps = [r["step"] for r in read_run_metrics(tmp_path) if "loss" in r]
    assert steps == list(range(1, 41))


@pytest.mark.slow
@pytest.mark.distributed
def test_a_signal_to_one_of_two_gloo_ranks_stops_both_and_resumes_exactly(tmp_path):
    common = [*SIGNAL_RUN, "train.steps=30"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    subprocess.run([*torchrun, "--master_port=29561", "train.py", *common, f"run_dir={tmp_path}/ref"], cwd=ROOT,
                   check=True, env=env, capture_output=True)
    cmd = [*torchrun, "--master_port=29562", "train.py", *common, f"run_dir={tmp_path}/sig"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_rows(tmp_path / "sig", 3, proc)
    workers = subprocess.run(["pgrep", "-f", f"run_dir={tmp_path}/sig"], capture_output=True, text=True).stdout.split()
    workers = [int(p) for p in workers if int(p) != proc.pid]
    os.kill(max(workers), signal.SIGUSR1)  # one rank only: the other must learn of it at the step boundary
    proc.wait(timeout=120)
    stopped = list_checkpoints(tmp_path / "sig" / "checkpoints")
    assert len(stopped) == 1 and int(stopped[0].stem) < 30
    resume = [*torchrun, "--master_port=29563", *cmd[len(torchrun) + 1:]]   # the same 2 processes, a fresh port
    assert resume.count("--nproc_per_node=2") == 1 and "--master_port=29562" not in resume
    subprocess.run(resume, cwd=ROOT, check=True, env=env, capture_output=True)
    assert_same_state(final_state(tmp_path / "ref"), final_state(tmp_path / "sig"))


def test_wall_clock_checkpoints(tmp_path):
    train_script.train(compose_config(overrides=[*TINY, "train.steps=5", "train.ckpt_every=1000", "train.keep_last=0",
                                                 "train.ckpt_every_minutes=1e-6", f"run_dir={tmp_path}"]))
    assert [int(p.stem) for p in list_checkpoints(tmp_path / "checkpoints")] == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------------------------------------
# Corrupt checkpoints
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.slow   # ~5 s
@pytest.mark.ci
def test_a_truncated_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(tmp_path):
    overrides = [*TINY, "train.keep_last=0"]
    train_script.train(compose_config(overrides=[*overrides, "train.steps=6", f"run_dir={tmp_path}/ref"]))
    train_script.train(compose_config(overrides=[*overrides, f"run_dir={tmp_path}/run"]))   # checkpoints 2, 4
    newest = tmp_path / "run" / "checkpoints" / "0000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])                 # a copy cut short
    with pytest.warns(UserWarning, match="0000004.pt: it does not load"):
        train_script.train(compose_config(overrides=[*overrides, "train.steps=6", f"run_dir={tmp_path}/run"]))
    assert len(list((tmp_path / "run" / "checkpoints").glob("0000004.pt.corrupt-*"))) == 1   # kept, renamed aside
    assert_same_state(final_state(tmp_path / "ref"), final_state(tmp_path / "run"))


def test_sample_py_uses_the_newest_checkpoint_that_loads(tmp_path):
    import sample as sample_script
    train_script.train(compose_config(overrides=[*TINY, f"run_dir={tmp_path}/run"]))
    (tmp_path / "run" / "checkpoints" / "0000004.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        out = sample_script.run(compose_config("sample", [f"ckpt={tmp_path}/run", "num_samples=2", "steps=2",
                                                          "device=cpu", f"out={tmp_path}/s"]))
    assert json.loads((out / "samples.json").read_text())["step"] == 2
    assert (tmp_path / "run" / "checkpoints" / "0000004.pt").exists()   # a reader renames nothing in a run folder


# ------------------------------------------------------------------------------------------------------------
# Clean errors
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("small")
    train_script.train(compose_config(overrides=[*TINY, f"run_dir={run_dir}"]))
    return run_dir


@pytest.mark.parametrize("args, says", [
    pytest.param(["sample.py", "ckpt={run}", "sampler=euler"], "unknown sampler 'euler'",
                 marks=[pytest.mark.slow, pytest.mark.ci]),
    pytest.param(["sample.py", "ckpt=/no/such/ckpt.pt"], "does not exist", marks=pytest.mark.slow),
    pytest.param(["sample.py", "ckpt={run}", "class_labels=[42]"], "outside 0..10", marks=pytest.mark.slow),
    pytest.param(["train.py", *TINY, "run_dir={run}", "model=DiT-T-4"], "restore those settings to resume",
                 marks=[pytest.mark.slow, pytest.mark.ci]),
    pytest.param(["train.py", *TINY, "run_dir={tmp}/x", "precision=fp16"], "choose one of fp32, bf16, auto",
                 marks=pytest.mark.slow),
    pytest.param(["train.py", *TINY, "run_dir={tmp}/x", "optim.cooldown_fraction=1.5"],
                 "optim.cooldown_fraction=1.5 must be between 0", marks=pytest.mark.slow),
    pytest.param(["train.py", *TINY, "run_dir={tmp}/x", "data=imagefolder", "data.path=/no/such/folder",
                  "data.image_size=8"], "does not exist; set data.path", marks=pytest.mark.slow),
    pytest.param(["extract_latents.py", "data=digits", "out={tmp}/cache"], "latent caches are made from image folders",
                 marks=pytest.mark.slow),
    pytest.param(["-m", "evaluation", "fid", "{tmp}/none.npz", "--ref", "{tmp}/none_ref.npz", "--features",
                  "digits"], "expected a samples .npz", marks=[pytest.mark.slow, pytest.mark.ci]),
])
def test_user_mistakes_print_one_message_without_a_traceback(args, says, small_run, tmp_path):
    args = [a.format(run=small_run, tmp=tmp_path) for a in args]
    result = run_script(args, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert says in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


@pytest.mark.slow   # subprocesses: over 10 s on 2 cores (the default suite stays near 5 minutes)
def test_hydra_full_error_shows_the_traceback(small_run):
    result = run_script(["sample.py", f"ckpt={small_run}", "sampler=euler"], check=False, env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr and "unknown sampler" in result.stderr


@pytest.mark.slow   # subprocesses: over 10 s on 2 cores (the default suite stays near 5 minutes)
def test_evaluation_debug_flag_shows_the_traceback(tmp_path):
    result = run_script(["-m", "evaluation", "fid", str(tmp_path / "x.npz"), "--ref", str(tmp_path / "r.npz"),
                         "--debug"], check=False)
    assert result.returncode != 0 and "Traceback" in result.stderr


# ------------------------------------------------------------------------------------------------------------
# SLURM through Hydra; the same sweep on a laptop through submitit_local
# ------------------------------------------------------------------------------------------------------------

def test_slurm_launcher_config_composes_for_a_gpu_node():
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8 and launcher.signal_delay_s == 300
    assert launcher.max_num_timeout > 0 and launcher.account is None


def test_ranks_come_from_slurm_without_torchrun():
    from utils.distributed import slurm_world
    saved = dict(os.environ)  # slurm_world exports RANK etc. into this process: put everything back afterwards
    try:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
        os.environ.update({"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2",
                           "SLURM_NODEID": "1", "SLURM_PROCID": "11", "SLURM_LOCALID": "3",
                           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS_PER_NODE": "8",
                           "SUBMITIT_EXECUTOR": "slurm", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})
        assert slurm_world()
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("11", "16", "3")
        assert os.environ["MASTER_ADDR"] == "gpu07" and 20000 <= int(os.environ["MASTER_PORT"]) <= 60000
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"   # left as SLURM set it: the task uses cuda:3
        os.environ["SLURM_NTASKS"] = "1"
        del os.environ["RANK"]
        assert not slurm_world()   # one task: no process group
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert "RANK" not in os.environ


@pytest.mark.slow
def test_a_two_job_sweep_through_submitit_local_trains_and_resumes(tmp_path):
    common = ["-m", "hydra/launcher=submitit_local", "model=DiT-T-8,DiT-T-4", *TINY]
    run_script([str(ROOT / "train.py"), *common], cwd=tmp_path, timeout=600)
    runs = sorted((tmp_path / "runs" / "digits").iterdir())
    assert [p.name.split("_")[0] for p in runs] == ["DiT-T-4", "DiT-T-8"]
    assert all(int(list_checkpoints(p / "checkpoints")[-1].stem) == 4 for p in runs)
    run_script([str(ROOT / "train.py"), *common, "train.steps=6"], cwd=tmp_path, timeout=600)
    for p in runs:
        assert [r["step"] for r in read_run_metrics(p) if "loss" in r] == [2, 4, 6]  # resumed, not restarted
