"""Shared fixtures: compose the real Hydra config and shrink it for CPU tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

# What the digits default sets by machine (precision=auto: bf16 on CPUs with bf16 instructions) or by run length
# (the cool-down over the last half of train.steps), pinned so that runs stopped early and extended, and runs
# compared across processes, are exact on any CPU. Tests of those settings set them themselves.
PINNED = ["precision=fp32", "optim.cooldown_fraction=0"]
# Small enough for seconds on 2 CPU cores, large enough to exercise every code path.
TINY = [*PINNED, "logger=none", "device=cpu", "train.steps=4", "train.batch_size=16", "train.log_every=2",
        "train.ckpt_every=2", "sample.steps=4", "sample.per_class=2", "fid.num_samples=50", "fid.batch_size=50"]


def compose_config(name="train", overrides=()):
    """The real config, composed as a Hydra run would see it: `${hydra:...}` interpolations resolve."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


def run_script(args, cwd=ROOT, timeout=300, check=True, env=None):
    """Run a repository script in a fresh interpreter (as a user would)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture
def tiny():
    return list(TINY)


def final_state(run_dir):
    """The newest checkpoint of a run folder."""
    from utils.checkpoint import latest_checkpoint, load_checkpoint
    return load_checkpoint(latest_checkpoint(Path(run_dir) / "checkpoints"))


def assert_same_state(a, b):
    """Two checkpoints hold bit-identical weights, EMA and optimizer state."""
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for i, state in a["opt"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["opt"]["state"][i][name]), f"opt state {i}.{name} differs"
