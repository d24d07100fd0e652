"""One writer per run folder. Two jobs training in one run_dir would resume from, prune (train.keep_last) and
truncate each other's files: this happens when a sweep varies a key that does not name the run (train.steps,
train.grad_accum, fid.*, sample.*: conf/train.yaml's exclude_keys), since every job then gets the same run_dir.

- RunLock: an fcntl.flock on run_dir/run.lock, held for the whole training (train.py: take() on rank 0 for all ranks,
  release() however the run ends). A second writer is refused with a
  message naming the holder (host, pid, start time, command). The kernel drops the lock of a process that ends; a
  lock still held on this host although its recorded process is gone (a leftover child holding the file) is taken
  over.
- DistinctRunDirs: a Hydra callback (conf/train.yaml hydra.callbacks) that, before a multirun launches any job,
  works out every job's run_dir and refuses the sweep when two jobs would share one.
"""

import datetime
import fcntl
import json
import os
import socket
import sys
import warnings
from collections import defaultdict
from pathlib import Path

from hydra.experimental.callback import Callback

from .collective import on_main
from .errors import UserError
from .files import pid_alive

LOCK_NAME = "run.lock"
PER_JOB_FOLDER = "give each job its own folder, e.g. 'run_dir=runs/x/steps${train.steps}'"


class RunInUse(UserError, RuntimeError):
    """Another process trains in this run folder, or a sweep would give two jobs one folder."""


class RunLock:
    """The lock of one run folder (see the module's docstring); release() lets it go."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd = None

    def holder(self):
        """What the lock file says of its holder: {host, pid, started, command}, or {}."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):   # a stale lock replaced by another process at the same time: try again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self.holder()
                if holder.get("host") == socket.gethostname() and not pid_alive(holder.get("pid")):
                    self.path.unlink(missing_ok=True)   # its process is gone: a new file, a lock of our own
                    continue
                raise RunInUse(self.refusal(holder)) from None
            except OSError as error:   # a filesystem without flock: go on unguarded rather than not at all
                os.close(fd)
                warnings.warn(f"cannot lock {self.path} ({error}); nothing stops a second job from using "
                              f"{self.path.parent} at the same time", stacklevel=2)
                return self
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:   # we locked a file another process has just removed as stale
                os.close(fd)
                continue
            info = {"host": socket.gethostname(), "pid": os.getpid(),
                    "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "command": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return self
        raise RunInUse(self.refusal(self.holder()))

    def take(self):
        """acquire() on rank 0 only, for all ranks: when it is refused every rank raises RunInUse (release() is a
        no-op on the other ranks)."""
        on_main(lambda: self.acquire() and None)
        return self

    def refusal(self, holder):
        who = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('started', '?')}: "
               f"{holder.get('command', '?')}") if holder else "a process that left no details"
        return (f"{self.path.parent} is in use by another training job ({who}). Two jobs in one run folder resume "
                f"from, prune and truncate each other's files: wait for it to end, or {PER_JOB_FOLDER}. If that job "
                f"is gone, delete {self.path}")

    def release(self):
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)   # the file stays (removing it races with a waiting process); the lock goes
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None




def sweep_run_dirs(config, config_name):
    """{run_dir: [job overrides, ...]} of every job a BasicSweeper multirun of `config` (its master config) will
    launch, each job's config composed as the launcher will (None for another sweeper: its jobs are not known
    ahead)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from omegaconf import OmegaConf, open_dict

    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    loader = GlobalHydra.instance().config_loader()
    raw = lambda node: OmegaConf.to_container(node, resolve=False) if node is not None else None
    params = [f"{k}={v}" for k, v in (raw(config.hydra.sweeper.get("params")) or {}).items()]
    task = raw(config.hydra.overrides.task)   # as typed: an interpolation in a value resolves in each job
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(params + task)
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    found, hydra_config = defaultdict(list), HydraConfig.instance()
    saved = hydra_config.cfg
    try:
        for num, overrides in enumerate(jobs):
            job = loader.load_sweep_config(config, list(overrides))
            with open_dict(job):
                job.hydra.job.num, job.hydra.job.id = num, f"check_{num}"
            hydra_config.set_config(job)   # ${hydra:...} in run_dir reads this job's values
            found[str(Path(OmegaConf.select(job, "run_dir")).resolve())].append(list(overrides))
    finally:
        hydra_config.cfg = saved
    return dict(found)


class DistinctRunDirs(Callback):
    """Refuse, before any job starts, a multirun in which two jobs would train in the same run_dir."""

    def on_multirun_start(self, config, config_name=None, **kwargs):
        shared = {d: jobs for d, jobs in (sweep_run_dirs(config, config_name) or {}).items() if len(jobs) > 1}
        if shared:
            lines = [f"  {d}: " + " | ".join(" ".join(job) or "(no overrides)" for job in jobs)
                     for d, jobs in shared.items()]
            print("error: jobs of this sweep would share a run folder, where they would resume from, prune and "
                  "truncate each other's files:\n" + "\n".join(lines) + "\nThe keys they differ in do not name the run "
                  f"(conf/train.yaml hydra.job.config.override_dirname.exclude_keys): {PER_JOB_FOLDER}",
                  file=sys.stderr, flush=True)
            sys.exit(2)
