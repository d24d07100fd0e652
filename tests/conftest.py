"""Shared fixtures and helpers: compose the real Hydra config and shrink it for CPU tests, run scripts, compare
checkpoints and tensors, read metrics, load the reference scripts, build tiny models and write image folders."""

import functools
import importlib.util
import os
import subprocess
import sys
import time
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


def read_run_metrics(run_dir):
    """The rows of a run folder's metrics.jsonl, through the codebase's one reader (utils.logger.read_metrics)."""
    from utils.logger import read_metrics
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def rel_err(actual, expected):
    """max |actual - expected| / max |expected|, in float64 (elementwise relative error is meaningless where a value
    is near zero); the shapes must agree."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@functools.lru_cache(maxsize=None)
def load_reference_script(name):
    """tests/reference/<name>.py as a module (loaded once): its inputs, configurations and model functions are the
    single definition both the recording of a reference file and the tests comparing against it use."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "reference" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_dit(**kwargs):
    """A CPU-sized DiT on 4x8x8 latents with 10 classes, for behaviour tests; kwargs override its arguments."""
    from models import DiT
    config = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    return DiT(**{**config, **kwargs})


def tiny_digits_dit(**kwargs):
    """A one-block DiT of width 32 on the digits' 1x8x8 images with 10 classes; kwargs override its arguments."""
    from models import DiT
    config = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    return DiT(**{**config, **kwargs})


def tiny_unet(**kwargs):
    """UNet-T on 8x8 single-channel input with 10 classes (the digits)."""
    from models import create_model
    return create_model("UNet-T", **{"input_size": 8, "in_channels": 1, "num_classes": 10, **kwargs})


def tiny_ldm(**kwargs):
    """A two-level LDM-style (cross-attention conditioned) U-Net on 8x8 single-channel input."""
    from models.unet import UNet
    config = dict(input_size=8, in_channels=1, num_classes=10, model_channels=32, channel_mult=(1, 2),
                  attention_levels=(1,), head_channels=None, resblock_updown=False, conditioning="cross-attn",
                  context_dim=32)
    return UNet(**{**config, **kwargs})


def image_folder(root, classes=2, per_class=2, size=12, image=None):
    """An image folder as data=imagefolder reads it: one sub-folder per class (class0, class1, ...) of PNGs named
    0.png, 1.png, ...; `image(c, i)` gives image i of class c (uint8, HxWx3), by default a flat size x (size + 4)
    image of level 40 * (c + i)."""
    import numpy as np
    from PIL import Image
    root = Path(root)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = image(c, i) if image else np.full((size, size + 4, 3), 40 * (c + i), np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


# A 40-step run that logs every step and checkpoints only when stopped: what the stop-signal tests interrupt.
SIGNAL_RUN = [*PINNED, "logger=none", "device=cpu", "train.steps=40", "train.batch_size=16", "train.log_every=1",
              "train.ckpt_every=1000", "train.keep_last=0", "sample.steps=2", "sample.per_class=1", "fid.at_end=false"]


def wait_for_rows(run_dir, n, proc, timeout=180):
    """Wait until a training subprocess has logged `n` metrics rows (it is under way), or fail with its output."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        path = Path(run_dir) / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not get going:\n{proc.communicate()[0] if proc.poll() is not None else ''}")


# ------------------------------------------------------------------------------------------------------------
# A time budget for a run (CI's slow tests): `--budget S` runs the tests every CI run must have first (marked
# `distributed` or `ci`), then the others in their order until S seconds have passed since the session began; a
# test that would start later is skipped, and the summary lists each one left out by name.
# ------------------------------------------------------------------------------------------------------------

def pytest_addoption(parser):
    parser.addoption("--budget", type=float, default=None, metavar="SECONDS",
                     help="start no test but those marked distributed or ci after SECONDS; skip the rest by name")


def _always(item):
    return item.get_closest_marker("distributed") is not None or item.get_closest_marker("ci") is not None


def pytest_collection_modifyitems(config, items):
    if config.getoption("--budget") is not None:
        items.sort(key=lambda item: not _always(item))   # stable: each group keeps its order


def pytest_sessionstart(session):
    session.config._budget_start = time.monotonic()


def pytest_runtest_setup(item):
    budget = item.config.getoption("--budget")
    if budget is not None and not _always(item) and time.monotonic() - item.config._budget_start > budget:
        item.config._budget_left_out = [*getattr(item.config, "_budget_left_out", []), item.nodeid]
        pytest.skip(f"left out: this run's time budget (--budget {budget:.0f} s) was spent")


def pytest_terminal_summary(terminalreporter, config):
    left_out = getattr(config, "_budget_left_out", [])
    if left_out:
        terminalreporter.section(f"{len(left_out)} test(s) left out by --budget {config.getoption('--budget'):.0f}")
        for nodeid in left_out:
            terminalreporter.line(f"  {nodeid}")
