"""Run logging: metrics.jsonl (the local source of truth) and, optionally, Weights & Biases."""

import json
import os
import secrets
from pathlib import Path
from .errors import ConfigError


def truncate_metrics(path, last_step):
    """Drop rows logged after `last_step` (a run killed after its last checkpoint logged steps it will redo)."""
    path = Path(path)
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(rows):
        path.write_text("".join(line + "\n" for line in kept))


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
