"""No good state is ever lost (issue 28): only a file that is no checkpoint is set aside, and never over another;
a sound checkpoint that fails to load stops the run; rank 0 picks the checkpoint for all ranks; one writer per run
folder and no sweep whose jobs share one; a full disk leaves no temporary file and stops every rank with one message;
files a later step reads are written through a temporary file and a rename; sample.py leaves run folders alone and
never replaces samples of other settings."""

import errno
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONF, ROOT, TINY, compose_config, read_run_metrics
from utils.checkpoint import RESUME_KEYS, CheckpointError, load_for_resume, load_newest, save_checkpoint
from utils.files import sweep_temp_files, temp_name
from utils.runlock import DistinctRunDirs, RunInUse, RunLock


def a_checkpoint(step=2, **extra):
    return {"model": {"w": torch.arange(4.0) + step}, "ema": {"w": torch.zeros(4)}, "step": step,
            "config": {"seed": 0}, **extra}


def two_checkpoints(folder):
    save_checkpoint(a_checkpoint(2), folder, 2)
    return save_checkpoint(a_checkpoint(4), folder, 4)


def pickled_object(path):
    import datetime
    torch.save({**a_checkpoint(4), "when": datetime.datetime(2020, 1, 1)}, path)


def version_99(path):
    """A sound archive written by a torch newer than this one (format version 99)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            dst.writestr(item, b"99\n" if item.filename.endswith("/version") else src.read(item.filename))
    path.write_bytes(buffer.getvalue())


# ------------------------------------------------------------------------------------------------------------
# 1. Only a file that is no checkpoint is set aside; anything else stops the run
# ------------------------------------------------------------------------------------------------------------

NOT_A_CHECKPOINT = {
    "cut short": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(b"PK\x03\x04 not a checkpoint"),
    "pickled object": pickled_object,
    "missing keys": lambda p: torch.save({"model": {"w": torch.zeros(4)}}, p),
}


@pytest.mark.parametrize("damage", list(NOT_A_CHECKPOINT))
def test_only_a_file_that_is_no_checkpoint_is_set_aside_with_a_timestamp_and_never_over_another(tmp_path, damage):
    newest = two_checkpoints(tmp_path)
    asides = []
    for _ in range(2):   # damaged twice within a second: the second is set aside beside the first
        NOT_A_CHECKPOINT[damage](newest)
        with pytest.warns(UserWarning, match="0000004.pt: it does not load"):
            path, ckpt = load_newest(tmp_path, set_aside_invalid=True, required=RESUME_KEYS)
        assert path.name == "0000002.pt" and ckpt["step"] == 2
        asides = sorted(p.name for p in tmp_path.glob("0000004.pt.corrupt-*"))
        save_checkpoint(a_checkpoint(4), tmp_path, 4)
    assert len(asides) == 2 and not newest.with_name("0000004.pt.corrupt").exists()


def oom(*args, **kwargs):
    raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")


def io_error(*args, **kwargs):
    raise OSError(errno.EIO, "Input/output error")


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failure", ["out of memory", "I/O error", "newer format"])
def test_a_sound_checkpoint_that_fails_to_load_stops_the_run_and_stays(tmp_path, monkeypatch, failure):
    newest = two_checkpoints(tmp_path)
    if failure == "newer format":
        version_99(newest)
    else:
        monkeypatch.setattr(torch, "load", oom if failure == "out of memory" else io_error)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # not skipped with a warning: stopped
        with pytest.raises(CheckpointError, match="cannot load checkpoint .*0000004.pt.*it is kept"):
            load_for_resume(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000002.pt", "0000004.pt"]   # nothing set aside


def test_checkpoints_are_loaded_on_the_cpu(tmp_path, monkeypatch):
    two_checkpoints(tmp_path)
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("map_location")) or real(*a, **k))
    path, ckpt = load_for_resume(tmp_path)
    assert path.name == "0000004.pt" and seen == ["cpu"] and ckpt["model"]["w"].device.type == "cpu"


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A finished TINY run: checkpoints 2 and 4 (keep_last=0), metrics rows at 2 and 4."""
    import train as train_script
    run_dir = tmp_path_factory.mktemp("four") / "run"
    train_script.train(compose_config(overrides=[*TINY, "train.keep_last=0", "fid.at_end=false",
                                                 f"run_dir={run_dir}"]))
    return run_dir


def test_a_refused_resume_leaves_config_yaml_and_metrics_as_they_were(four_steps, tmp_path):
    import train as train_script
    run_dir = tmp_path / "run"
    shutil.copytree(four_steps, run_dir)
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    with pytest.raises(ValueError, match="was trained with model="):
        train_script.train(compose_config(overrides=[*TINY, "model=DiT-T-8", f"run_dir={run_dir}"]))
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    assert not (run_dir / "metrics.dropped.jsonl").exists()


def test_a_resume_from_an_older_step_moves_the_newer_rows_aside(four_steps, tmp_path):
    import train as train_script
    run_dir = tmp_path / "run"
    shutil.copytree(four_steps, run_dir)
    (run_dir / "checkpoints" / "0000004.pt").write_bytes(b"")   # lost: the run resumes from step 2
    stale = run_dir / "checkpoints" / temp_name(run_dir / "checkpoints" / "0000006.pt").name
    stale.write_bytes(b"half a checkpoint")   # of a process that is gone: swept at the start
    os.utime(stale, (time.time() - 3600,) * 2)
    with pytest.warns(UserWarning, match="0000004.pt: it does not load"):
        train_script.train(compose_config(overrides=[*TINY, "train.keep_last=0", "train.steps=2",
                                                     "fid.at_end=false", f"run_dir={run_dir}"]))
    dropped = [json.loads(line) for line in (run_dir / "metrics.dropped.jsonl").read_text().splitlines()]
    assert [r["step"] for r in dropped if "loss" in r] == [4]
    assert [r["step"] for r in read_run_metrics(run_dir) if "loss" in r] == [2]
    assert not stale.exists() and len(list((run_dir / "checkpoints").glob("0000004.pt.corrupt-*"))) == 1


# ------------------------------------------------------------------------------------------------------------
# Two processes: rank 0 decides, every rank stops with the same message (gloo on CPU)
# ------------------------------------------------------------------------------------------------------------

def _two_rank_worker(rank, root):
    """Scenarios on a 2-rank gloo group; each rank writes what it saw to root/rank<r>.json."""
    import torch.distributed as dist
    import utils.checkpoint as checkpoint
    sys.path.insert(0, str(ROOT))
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2)
    root, seen = Path(root), {}

    def outcome(fn):
        try:
            return ["ok", fn()]
        except Exception as error:
            return [type(error).__name__, str(error)]

    # Rank 0 picks (setting the cut-short newest aside); rank 1 loads the same file.
    seen["resume"] = outcome(lambda: (lambda p, c: [p.name, c["step"]])(*load_for_resume(root / "a")))
    # An I/O error on rank 0 only: both ranks stop with its message, nothing is set aside.
    real_load = checkpoint.load_checkpoint
    if rank == 0:
        checkpoint.load_checkpoint = io_error
    seen["io"] = outcome(lambda: load_for_resume(root / "b") and None)
    checkpoint.load_checkpoint = real_load
    # A full disk on rank 0: both ranks stop with the same message.
    real_write = checkpoint.atomic_write
    if rank == 0:
        checkpoint.atomic_write = disk_full
    seen["save"] = outcome(lambda: checkpoint.save_on_main(lambda: a_checkpoint(6), root / "b", 6) and None)
    checkpoint.atomic_write = real_write
    # The run folder is locked by the test process: both ranks are refused.
    seen["lock"] = outcome(lambda: RunLock(root / "locked").take() and None)
    (root / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


@pytest.mark.slow   # ~4.5 s; distributed: CI runs it every time
@pytest.mark.distributed
def test_rank_0_decides_for_all_and_its_failures_stop_every_rank(tmp_path):
    import multiprocessing
    two_checkpoints(tmp_path / "a")
    (tmp_path / "a" / "0000004.pt").write_bytes(b"cut")
    two_checkpoints(tmp_path / "b")
    held = RunLock(tmp_path / "locked").acquire()
    try:
        context = multiprocessing.get_context("spawn")
        procs = [context.Process(target=_two_rank_worker, args=(r, str(tmp_path))) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert all(p.exitcode == 0 for p in procs), "a rank hung or crashed"
    finally:
        held.release()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["resume"] == ranks[1]["resume"] == ["ok", ["0000002.pt", 2]]
    assert len(list((tmp_path / "a").glob("0000004.pt.corrupt-*"))) == 1   # set aside once, by rank 0
    assert ranks[0]["io"] == ranks[1]["io"] and ranks[0]["io"][0] == "CheckpointError"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["0000002.pt", "0000004.pt"]
    assert ranks[0]["save"] == ranks[1]["save"] and ranks[0]["save"][0] == "CheckpointError"
    assert "No space left" in ranks[0]["save"][1]
    assert ranks[0]["lock"] == ranks[1]["lock"] and ranks[0]["lock"][0] == "RunInUse"
    assert f"pid {os.getpid()}" in ranks[1]["lock"][1]


# ------------------------------------------------------------------------------------------------------------
# 2. One writer per run folder; no sweep whose jobs share one
# ------------------------------------------------------------------------------------------------------------

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from utils.runlock import RunLock
lock = RunLock({folder!r}).acquire()
print("locked", flush=True)
{then}
"""


def hold_lock(folder, then="time.sleep(60)"):
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT), folder=str(folder), then=then)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.slow   # ~3 s
@pytest.mark.ci
def test_a_second_writer_is_refused_with_the_holders_name_until_it_ends(tmp_path):
    proc = hold_lock(tmp_path)
    try:
        with pytest.raises(RunInUse) as refused:
            RunLock(tmp_path).acquire()
        message = str(refused.value)
        assert f"host {socket.gethostname()}, pid {proc.pid}, since " in message and "steps${train.steps}" in message
    finally:
        proc.kill()
        proc.wait()
    RunLock(tmp_path).acquire().release()   # the kernel dropped the dead holder's lock


@pytest.mark.slow   # ~4 s
@pytest.mark.ci
def test_a_lock_kept_by_a_leftover_child_of_a_dead_holder_is_taken_over(tmp_path):
    # The holder starts a child that inherits the locked file (as DataLoader workers do) and dies.
    then = ("import subprocess; child = subprocess.Popen(['sleep', '60'], pass_fds=(lock.fd,)); "
            "print(child.pid, flush=True)")
    proc = hold_lock(tmp_path, then)
    child = int(proc.stdout.readline())
    proc.wait()
    try:
        lock = RunLock(tmp_path).acquire()
        assert lock.holder()["pid"] == os.getpid()
        lock.release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_train_refuses_a_run_folder_in_use_and_touches_nothing(tmp_path):
    import train as train_script
    held = RunLock(tmp_path / "run").acquire()
    try:
        with pytest.raises(RunInUse, match="is in use by another training job"):
            train_script.train(compose_config(overrides=[*TINY, f"run_dir={tmp_path}/run"]))
        assert [p.name for p in (tmp_path / "run").iterdir()] == ["run.lock"]
    finally:
        held.release()


def multirun_master_config(overrides):
    """The master config of `python train.py -m <overrides>` with Hydra initialised, as a multirun sees it."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    context = initialize_config_dir(config_dir=CONF, version_base="1.3")
    context.__enter__()
    cfg = GlobalHydra.instance().hydra.compose_config("train", overrides, run_mode=RunMode.MULTIRUN)
    return cfg, context


@pytest.mark.parametrize("overrides, shared", [
    (["train.steps=2,4", "logger=none"], True),                          # train.steps does not name the run
    (["fid.num_samples=10,20", "sample.cfg_scale=1,2", "logger=none"], True),
    (["train.steps=2,4", "run_dir=runs/x/steps${train.steps}", "logger=none"], False),
    (["optim.lr=1e-3,2e-3", "logger=none"], False),                       # optim.lr names the run
    (["model=DiT-T-8,DiT-T-4", "train.steps=2", "logger=none"], False),
])
def test_a_sweep_whose_jobs_share_a_run_folder_is_refused_before_launch(overrides, shared, capsys):
    cfg, context = multirun_master_config(overrides)
    try:
        if shared:
            with pytest.raises(SystemExit) as stopped:
                DistinctRunDirs().on_multirun_start(config=cfg, config_name="train")
            assert stopped.value.code == 2
            assert "would share a run folder" in capsys.readouterr().err
        else:
            DistinctRunDirs().on_multirun_start(config=cfg, config_name="train")
    finally:
        context.__exit__(None, None, None)


@pytest.mark.slow
def test_train_py_refuses_such_a_sweep_and_starts_no_job(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", *TINY, "train.steps=2,4"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "would share a run folder" in result.stderr
    assert "steps${train.steps}" in result.stderr and not (tmp_path / "runs" / "digits").exists()


# ------------------------------------------------------------------------------------------------------------
# 3. Full disk, stale temporary files, atomic writes
# ------------------------------------------------------------------------------------------------------------

def test_stale_temporary_files_are_swept_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host, me = socket.gethostname(), os.getpid()
    names = {
        f".0000004.pt.tmp-{host}-{dead}-abcdef.pt": True,       # its process is gone
        f".0000004.pt.tmp-{host}-{me}-abcdef.pt": False,        # a live writer here
        f".0000006.pt.tmp-other-host-{me}-abcdef.pt": False,   # another host's, written to just now
        f".0000008.pt.tmp-other-host-{me}-123456.pt": True,    # another host's, untouched for an hour
        ".0000002.pt.tmp12345": True,                            # the older pattern, untouched for an hour
        "0000002.pt": False,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    for name in (f".0000008.pt.tmp-other-host-{me}-123456.pt", ".0000002.pt.tmp12345"):
        os.utime(tmp_path / name, (time.time() - 3600,) * 2)
    removed = {p.name for p in sweep_temp_files(tmp_path)}
    assert removed == {name for name, stale in names.items() if stale}
    assert {p.name for p in tmp_path.iterdir()} == {name for name, stale in names.items() if not stale}


FULL_DISK = """
import resource, signal, sys, torch
sys.path.insert(0, {root!r})
from utils.checkpoint import save_checkpoint
save_checkpoint({{"model": {{"w": torch.zeros(10)}}}}, {folder!r}, 2)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))   # writes past 64 KB fail: a full disk
save_checkpoint({{"model": {{"w": torch.zeros(100000)}}}}, {folder!r}, 4)
"""


@pytest.mark.slow   # ~3 s
@pytest.mark.ci
def test_a_full_disk_leaves_no_temporary_file_and_stops_with_one_message(tmp_path):
    result = subprocess.run([sys.executable, "-c", FULL_DISK.format(root=str(ROOT), folder=str(tmp_path))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "CheckpointError: could not write checkpoint 4" in result.stderr
    assert "checkpoints there are kept (newest: 0000002.pt)" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["0000002.pt"]


def test_reconstructed_emas_are_written_through_a_temporary_file(tmp_path, monkeypatch):
    import utils.phema as phema
    model = torch.nn.Linear(3, 2)
    tracker = phema.PowerEMA(model, (0.05, 0.10))
    for images in (100, 200):
        tracker.update(model, images, 100)
        phema.write_snapshots(tmp_path / "phema", tracker, model, images, {"step": images, "model_args": {},
                                                                         "config": {}})

    def fails_halfway(obj, path):
        Path(path).write_bytes(b"PK half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(phema.torch, "save", fails_halfway)
    with pytest.raises(OSError):
        phema.write_reconstructions(tmp_path, [0.07])
    assert sorted(p.name for p in (tmp_path / "phema").iterdir()) == sorted(
        p.name for p in (tmp_path / "phema").glob("phema-*.pt"))   # no reconstruction, no temporary file


def test_two_builders_of_the_digits_reference_share_one_complete_file(tmp_path, monkeypatch):
    import evaluation.real_digits as real_digits
    builds, real_build = [], real_digits.build_reference
    monkeypatch.setattr(real_digits, "build_reference", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(real_digits.digits_reference(tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(paths) == 2 and paths[0] == paths[1] and len(builds) == 1
    with np.load(paths[0]) as f:
        mu = f["mu"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # A cached file cut short (an older writer, a copy) is rebuilt rather than read forever.
    paths[0].write_bytes(paths[0].read_bytes()[:100])
    assert real_digits.digits_reference(tmp_path) == paths[0] and len(builds) == 2
    with np.load(paths[0]) as f:
        np.testing.assert_array_equal(f["mu"], mu)


# ------------------------------------------------------------------------------------------------------------
# 4. sample.py leaves run folders alone and never replaces samples of other settings
# ------------------------------------------------------------------------------------------------------------

def listing(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_sample_py_renames_nothing_in_a_run_folder(four_steps, tmp_path):
    import sample as sample_script
    run_dir = tmp_path / "run"
    shutil.copytree(four_steps, run_dir)
    (run_dir / "checkpoints" / "0000004.pt").write_bytes(b"cut short")
    before = listing(run_dir)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        sample_script.run(compose_config("sample", [f"ckpt={run_dir}", "num_samples=2", "steps=2", "device=cpu",
                                                    f"out={tmp_path}/s"]))
    assert listing(run_dir) == before


@pytest.mark.slow   # ~3 s
def test_samplers_with_other_settings_never_replace_each_others_samples(four_steps, tmp_path):
    import sample as sample_script
    run_dir = tmp_path / "run"
    shutil.copytree(four_steps, run_dir)
    base = [f"ckpt={run_dir}", "num_samples=3", "steps=2", "device=cpu"]
    outs = {}
    for name, extra in {"base": [], "interval": ["guidance_low=0.5"], "channels": ["cfg_channels=1"],
                        "raw": ["use_ema=false"], "more": ["num_samples=4"], "labels": ["class_labels=[3]"],
                        "cfg": ["cfg_scale=2"]}.items():
        outs[name] = sample_script.run(compose_config("sample", [*base, *extra]))
    assert len(set(outs.values())) == len(outs)   # each setting has its own default folder
    assert all(p.parent == run_dir / "samples" for p in outs.values())
    first = listing(outs["base"])
    again = sample_script.run(compose_config("sample", base))   # the same settings: the same folder, rewritten
    assert again == outs["base"] and listing(again).keys() == first.keys()
    with pytest.raises(ValueError, match="holds samples made with other settings.*cfg_scale"):
        sample_script.run(compose_config("sample", [*base, "cfg_scale=3", f"out={outs['base']}"]))
    assert listing(outs["base"]) == listing(again)
    assert not [p for out in outs.values() for p in out.iterdir() if p.name.startswith(".")]   # no temporaries
