"""Run logging: metrics.jsonl (the local source of truth) and, optionally, Weights & Biases."""

import json
import os
import secrets
import time
import warnings
from pathlib import Path

import torch

from .errors import ConfigError
from .files import atomic_write_text


def read_metrics(path, warn=True):
    """The rows of a metrics.jsonl, in order; [] when it does not exist. A line that is not a JSON object (the last
    one torn by a run killed mid-write) is skipped with a warning, never a crash: the one reader of the codebase."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        row = read_metrics_line(line)
        if row is not None:
            rows.append(row)
        elif line.strip() and warn:
            warnings.warn(f"{path}:{number} is not a JSON object (a write cut short?); the line is skipped",
                          stacklevel=2)
    return rows


def logged_row(path, step, key):
    """The last metrics.jsonl row of `step` that has `key`, or None."""
    return next((r for r in reversed(read_metrics(path)) if r.get("step") == step and key in r), None)


def truncate_metrics(path, last_step):
    """Rows logged after `last_step` (a run killed after its last checkpoint logged steps it will redo) and torn
    lines leave metrics.jsonl; they are appended to metrics.dropped.jsonl beside it, never deleted."""
    path = Path(path)
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept, dropped = [], []
    for line in lines:
        row = read_metrics_line(line)
        (kept if row is not None and row.get("step", 0) <= last_step else dropped).append(line)
    if dropped:
        with open(path.with_name("metrics.dropped.jsonl"), "a") as f:
            f.write("".join(line + "\n" for line in dropped))
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_metrics_line(line):
    """One metrics.jsonl line as a dict, or None when it is not a JSON object."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


class MetricsWindow:
    """Running sums of the logged quantities between two log lines; `means()` averages them over the steps and, on
    several processes, over the ranks (one all-reduce), then starts a new window."""

    def __init__(self):
        self.start, self.steps, self.sums = time.perf_counter(), 0, {}

    def add(self, values):
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().mean()
        self.steps += 1

    def means(self, device, world_size=1):
        """({name: mean}, seconds per step) of the window; resets it."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.start
        means = {k: float(v) / self.steps for k, v in self.sums.items()}
        if world_size > 1:
            packed = torch.tensor(list(means.values()), device=device)
            torch.distributed.all_reduce(packed)
            means = dict(zip(means, (packed / world_size).tolist()))
        step_time = elapsed / self.steps
        self.__init__()
        return means, step_time


def _has_wandb_key():
    """An API key in the environment or from `wandb login` (stored in ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class RunLogger:
    """Appends one JSON object per logged step to run_dir/metrics.jsonl and mirrors it to W&B when enabled.

    W&B runs offline when no API key is configured, resumes the same run id (stored in run_dir/wandb_id.txt),
    and plots every metric against our own "step" key, because W&B's internal step must only increase and a
    resume from an older checkpoint revisits steps.
    """

    @classmethod
    def for_run(cls, run_dir, config, settings):
        """The logger of a run: `settings` as conf/logger gives them (backend, project, ...); W&B names the run after
        its run_dir."""
        settings = dict(settings)
        backend = settings.pop("backend")
        if backend == "none":
            return cls(run_dir, config)
        return cls(run_dir, config, backend=backend, name=Path(run_dir).as_posix().replace("/", "_"), **settings)

    def __init__(self, run_dir, config, backend="none", project="dit", group=None, tags=(), name=None, mode=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        if backend == "wandb":
            import wandb

            id_file = Path(run_dir) / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id)
            if mode is None:
                mode = os.environ.get("WANDB_MODE") or ("online" if _has_wandb_key() else "offline")
            self.wandb = wandb.init(project=project, group=group, tags=list(tags or ()), name=name, id=run_id,
                                    resume="allow", dir=str(run_dir), config=config, mode=mode)
            self.wandb.define_metric("step")
            self.wandb.define_metric("*", step_metric="step")
        elif backend != "none":
            raise ConfigError(f"unknown logger {backend!r}; valid loggers: wandb, none")

    def log(self, metrics):
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics)

    def log_image(self, key, path, step, caption=None):
        if self.wandb is not None:
            import wandb
            self.wandb.log({key: wandb.Image(str(path), caption=caption), "step": step})

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
