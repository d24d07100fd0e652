"""Cluster launchers deliver their signals to the trainer and their world to torch.distributed (issue 28): DataLoader
workers ignore the stop signals that SLURM sends to the whole job step; plain `srun` (without submitit) sets the world
from SLURM's own variables; `srun torchrun` stops on the signal the documented batch script asks for (SIGTERM, the one
torchrun's agent passes on to its workers); the launcher config and the documentation agree with all of that."""

import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train as train_script
from conftest import SIGNAL_RUN, wait_for_rows, ROOT, assert_same_state, compose_config, final_state, image_folder, read_run_metrics
from data.batches import batch_source, ignore_stop_signals
from data.sampler import StepSampler
from utils.checkpoint import list_checkpoints
from utils.distributed import first_host, slurm_port, slurm_world
from utils.guard import STOP_SIGNALS



# ------------------------------------------------------------------------------------------------------------
# DataLoader workers ignore the stop signals (SLURM signals every process of the job step)
# ------------------------------------------------------------------------------------------------------------

class Dispositions(torch.utils.data.Dataset):
    """Each item: the worker's handlers of STOP_SIGNALS (1 where ignored) and whether the composed init ran."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        ignored = [float(signal.getsignal(sig) == signal.SIG_IGN) for sig in STOP_SIGNALS]
        return torch.tensor([*ignored, float(os.environ.get("INIT_RAN") == "1")]), 0


def mark_init(worker_id):
    os.environ["INIT_RAN"] = "1"   # in the worker only


def test_dataloader_workers_ignore_the_stop_signals_and_run_their_own_init():
    sampler = StepSampler(8, 4, seed=0)
    next_batch = batch_source(Dispositions(), sampler, num_workers=2, device=torch.device("cpu"),
                              worker_init_fn=mark_init)
    for step in range(3):   # both workers
        x, _, _ = next_batch(step)
        assert bool((x == 1).all()), f"a worker handles {x.tolist()} (columns: {STOP_SIGNALS}, init ran)"
    assert os.environ.get("INIT_RAN") is None and signal.getsignal(signal.SIGTERM) != signal.SIG_IGN
    pickle.dumps(ignore_stop_signals(mark_init))   # spawn / forkserver start methods pickle it


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    import numpy as np
    pixels = lambda c, i: np.random.default_rng([c, i]).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    return image_folder(tmp_path_factory.mktemp("images") / "imgs", classes=2, per_class=8, image=pixels)


def imagefolder_run(images):
    return [*SIGNAL_RUN, "data=imagefolder", f"data.path={images}", "data.image_size=8", "data.num_workers=2"]


@pytest.mark.slow
def test_a_signal_to_the_whole_process_group_with_dataloader_workers_checkpoints_and_resumes(tmp_path, images):
    """As SLURM signals a job step: the trainer and its 2 DataLoader workers at once. (Forked workers would also
    inherit the trainer's flag-only handler, installed before they start; workers started by spawn or forkserver,
    Python 3.14's default, would die of the signal without ignore_stop_signals: the test above checks that.)"""
    sig, steps = signal.SIGUSR1, 20
    run = [*imagefolder_run(images), f"train.steps={steps}"]
    train_script.train(compose_config(overrides=[*run, f"run_dir={tmp_path}/ref"]))
    cmd = [sys.executable, "train.py", *run, f"run_dir={tmp_path}/sig"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for_rows(tmp_path / "sig", 3, proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) >= 2, "the DataLoader workers are running"
    os.killpg(proc.pid, sig)   # the trainer and its workers, as SLURM does
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, output
    assert "DataLoader worker" not in output and "Traceback" not in output, output
    stopped = list_checkpoints(tmp_path / "sig" / "checkpoints")
    assert len(stopped) == 1 and 3 <= int(stopped[0].stem) < steps, "one checkpoint, at the step it stopped"
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    assert_same_state(final_state(tmp_path / "ref"), final_state(tmp_path / "sig"))
    assert [r["step"] for r in read_run_metrics(tmp_path / "sig") if "loss" in r] == list(range(1, steps + 1))


# ------------------------------------------------------------------------------------------------------------
# The world from SLURM: through submitit's environment, or SLURM's own variables under plain srun
# ------------------------------------------------------------------------------------------------------------

WORLD = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TASK_11_OF_16 = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
                 "SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_JOB_NODELIST": "gpu[07-08]",
                 "SLURM_NTASKS_PER_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher's variables, and everything slurm_world exports into os.environ put back afterwards."""
    for key in (*WORLD, "LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.setenv(key, "")   # recorded as it was, so that monkeypatch restores it
        monkeypatch.delenv(key)
    for key in list(os.environ):
        if key.startswith(("SLURM_", "SUBMITIT_")):
            monkeypatch.delenv(key)
    return monkeypatch


def world(env, clean_env):
    for key, value in env.items():
        clean_env.setenv(key, value)
    assert slurm_world()
    return {key: os.environ[key] for key in WORLD}


def test_plain_srun_reads_slurms_own_variables_as_submitit_does(clean_env):
    import utils.distributed
    clean_env.setattr(utils.distributed.shutil, "which", lambda name: None)   # no SLURM tools: parse the list
    plain = world(TASK_11_OF_16, clean_env)
    assert plain == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "gpu07",
                     "MASTER_PORT": str(slurm_port("4242"))}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"   # left as SLURM set it: the task uses cuda:3
    for key in WORLD:
        del os.environ[key]
    through_submitit = world({**TASK_11_OF_16, "SUBMITIT_EXECUTOR": "slurm"}, clean_env)
    assert through_submitit == plain   # the same rendezvous whichever way the job was started


def test_plain_srun_keeps_a_given_address_and_port_and_needs_several_tasks(clean_env):
    assert world({**TASK_11_OF_16, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29999"}, clean_env)["MASTER_ADDR"] \
        == "10.0.0.7" and os.environ["MASTER_PORT"] == "29999"
    for key in WORLD:
        del os.environ[key]
    clean_env.setenv("SLURM_NTASKS", "1")
    assert not slurm_world() and "RANK" not in os.environ   # one task: no process group
    clean_env.setenv("SLURM_NTASKS", "16")
    clean_env.setenv("RANK", "5")
    assert not slurm_world()   # torchrun set the world: it stays


def test_the_first_host_comes_from_scontrol_when_slurm_is_installed(clean_env, tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'from-scontrol\\nother\\n'\n")
    fake.chmod(0o755)
    clean_env.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert first_host("odd-[list]") == "from-scontrol"
    assert world(TASK_11_OF_16, clean_env)["MASTER_ADDR"] == "from-scontrol"


@pytest.mark.parametrize("nodelist, host", [
    ("gpu07", "gpu07"), ("gpu07,gpu08", "gpu07"), ("gpu[07-08]", "gpu07"), ("gpu[07-08,11],cpu3", "gpu07"),
    ("gpu[3,5-6]", "gpu3"), ("node-[001-004]-ib", "node-001-ib"), ("rack[1-2]-gpu[01-08]", "rack1-gpu01"),
])
def test_the_first_host_of_a_node_list_without_slurms_tools(nodelist, host, monkeypatch):
    import utils.distributed
    monkeypatch.setattr(utils.distributed.shutil, "which", lambda name: None)
    assert first_host(nodelist) == host


def test_a_node_list_that_cannot_be_read_is_refused(monkeypatch):
    import utils.distributed
    from utils.errors import ConfigError
    monkeypatch.setattr(utils.distributed.shutil, "which", lambda name: None)
    for bad in ("gpu[07", "[1-2", ""):
        with pytest.raises(ConfigError, match="set MASTER_ADDR"):
            first_host(bad)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_srun_tasks_without_submitit_or_torchrun_train_together(tmp_path):
    """What `srun --ntasks=2 python train.py` gives each task: SLURM's variables only (no SUBMITIT_EXECUTOR)."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "SUBMITIT_")) and key not in WORLD}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SLURM_JOB_ID="31337", SLURM_NTASKS="2",
               SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1")
    cmd = [sys.executable, "train.py", *SIGNAL_RUN, "train.steps=2", f"run_dir={tmp_path}"]
    tasks = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [task.communicate(timeout=300)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert final_state(tmp_path)["step"] == 2
    assert "starting at step 0" in outputs[0] and "starting at step 0" not in outputs[1]   # rank 0 alone prints


# ------------------------------------------------------------------------------------------------------------
# srun torchrun: SIGTERM (what the documented batch script asks SLURM for) reaches the ranks through the agent
# ------------------------------------------------------------------------------------------------------------

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
TORCHRUN_HANDLES = {"SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"}   # torchrun's agent's default --signals-to-handle


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_to_the_torchrun_agent_checkpoints_both_ranks_and_resumes_exactly(tmp_path):
    common = [*SIGNAL_RUN, "train.steps=30"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    subprocess.run([*TORCHRUN, "--master_port=29571", "train.py", *common, f"run_dir={tmp_path}/ref"], cwd=ROOT,
                   check=True, env=env, capture_output=True)
    cmd = [*TORCHRUN, "--master_port=29572", "train.py", *common, f"run_dir={tmp_path}/sig"]
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_rows(tmp_path / "sig", 3, agent)
    ranks = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    agent.send_signal(signal.SIGTERM)   # the agent only: it passes the signal on to both ranks
    output, _ = agent.communicate(timeout=120)
    assert len(re.findall(r"Sending process \d+ closing signal SIGTERM", output)) == 2, output
    assert "received signal 15" in output and "SIGKILL" not in output, output   # both ranks left in time
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks)
    stopped = list_checkpoints(tmp_path / "sig" / "checkpoints")
    assert len(stopped) == 1 and 3 <= int(stopped[0].stem) < 30, output
    assert f"checkpoint written at step {int(stopped[0].stem)}" in output
    # Both ranks stopped at that step (they agree at the step boundary); the resume equals an uninterrupted run.
    steps = [r["step"] for r in read_run_metrics(tmp_path / "sig") if "loss" in r]
    assert steps[-1] == int(stopped[0].stem)
    resume = [*TORCHRUN, "--master_port=29573", *cmd[len(TORCHRUN) + 1:]]
    subprocess.run(resume, cwd=ROOT, check=True, env=env, capture_output=True)
    assert_same_state(final_state(tmp_path / "ref"), final_state(tmp_path / "sig"))


# ------------------------------------------------------------------------------------------------------------
# The launcher config and the documented batch scripts ask for signals the trainer acts on
# ------------------------------------------------------------------------------------------------------------

def sbatch_scripts():
    """The ```bash blocks of docs/cluster.md that hold #SBATCH lines."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    return [block for block in re.findall(r"```bash\n(.*?)```", text, re.S) if "#SBATCH" in block]


def test_documented_batch_scripts_ask_for_a_signal_that_reaches_the_ranks():
    scripts = sbatch_scripts()
    assert any("torchrun" in s for s in scripts) and any("torchrun" not in s for s in scripts)
    stop = {sig.name for sig in STOP_SIGNALS}
    for script in scripts:
        asked = re.findall(r"#SBATCH[^\n]*--signal=(\S+)", script)
        assert len(asked) == 1, script
        assert not asked[0].startswith(("B:", "R:B:")), "B: signals the batch shell only, never the ranks"
        name = "SIG" + re.sub(r"^R:", "", asked[0]).split("@")[0]
        assert name in stop, f"{name}: the trainer checkpoints only on {sorted(stop)}"
        if "torchrun" in script:
            extra = re.findall(r"--signals[-_]to[-_]handle=(\S+)", script)
            handled = TORCHRUN_HANDLES | (set(extra[0].split(",")) if extra else set())
            assert name in handled, f"torchrun's agent dies of {name} and its workers with it"


def test_the_slurm_launcher_signals_what_the_trainer_and_submitit_handle():
    from hydra import compose, initialize_config_dir
    from submitit.core.job_environment import JobEnvironment
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    # submitit asks SLURM for --signal=USR2@signal_delay_s (no B:, so every task gets it) and requeues on it after
    # the trainer's checkpoint (StepBoundary.exit calls the handler installed before its own).
    assert getattr(signal, "SIG" + JobEnvironment.USR_SIG) in STOP_SIGNALS
    assert 60 <= launcher.signal_delay_s <= 900 and launcher.tasks_per_node == launcher.gpus_per_node
    assert launcher.max_num_timeout > 0


# ------------------------------------------------------------------------------------------------------------
# FSDP state: one optimizer layout per run, and nothing loaded for a resume outlives setup
# ------------------------------------------------------------------------------------------------------------

def test_an_optimizer_state_saved_under_the_other_parallelism_is_refused():
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from utils.errors import ConfigError
    from utils.parallel import load_optimizer_state, training_state

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), weight_decay=0)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    _, _, saved = training_state(model, model, opt, fsdp=False)
    assert saved["format"] == "ddp"
    with pytest.raises(ConfigError, match=r"saved with train.parallel=ddp .*Resume with train.parallel=ddp"):
        load_optimizer_state(model, opt, saved, fsdp=True)
    # FSDP's layout (keyed by parameter name), recorded or (checkpoints from before the record) recognised
    by_name = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for state in ({**by_name, "format": "fsdp"}, by_name):
        with pytest.raises(ConfigError, match=r"saved with train.parallel=fsdp .*Resume with train.parallel=fsdp"):
            load_optimizer_state(model, opt, state, fsdp=False)
    # The same layout loads, recorded or not; the record is not handed to torch.
    for state in (saved, {k: v for k, v in saved.items() if k != "format"}):
        fresh = torch.optim.AdamW(model.parameters(), weight_decay=0)
        load_optimizer_state(model, fresh, state, fsdp=False)
        assert "format" not in fresh.state_dict() and torch.equal(fresh.state_dict()["state"][0]["exp_avg"],
                                                                   opt.state_dict()["state"][0]["exp_avg"])


def test_nothing_loaded_for_a_resume_is_kept_after_setup(tmp_path, monkeypatch):
    """The checkpoint's weights, EMA, optimizer, post-hoc EMA and REPA states: each tensor loaded is freed once setup
    has copied it, or is itself the tensor an optimizer now holds (torch.optim keeps loaded CPU tensors as they are)."""
    import gc
    import weakref

    from conftest import TINY

    run = [*TINY, "train.steps=2", "ema.posthoc=true", "ema.snapshot_every=32", "repa.encoder=digits",
           "repa.depth=2", "repa.projector_dim=64", f"run_dir={tmp_path}"]
    train_script.train(compose_config(overrides=run))
    loaded, real_load = [], torch.load

    def load(*args, **kwargs):
        ckpt = real_load(*args, **kwargs)
        if isinstance(ckpt, dict) and "opt" in ckpt:
            stack = [("", ckpt)]
            while stack:
                name, value = stack.pop()
                if torch.is_tensor(value):
                    loaded.append((name, weakref.ref(value)))
                elif isinstance(value, (dict, list, tuple)):
                    items = value.items() if isinstance(value, dict) else enumerate(value)
                    stack.extend((f"{name}.{key}", item) for key, item in items)
        return ckpt

    class Checked(Exception):
        pass

    def check(run, boundary):
        gc.collect()
        assert run.step == 2 and loaded and run.phema is not None and run.repa is not None
        held = {id(value) for opt in (run.opt, run.repa.opt) for state in opt.state.values()
                for value in state.values() if torch.is_tensor(value)}
        kept = [name for name, ref in loaded if ref() is not None and id(ref()) not in held]
        assert not kept, f"still referenced after setup: {kept[:10]}"
        raise Checked

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(train_script, "fit", check)
    with pytest.raises(Checked):
        train_script.train(compose_config(overrides=[*run, "train.steps=4"]))
