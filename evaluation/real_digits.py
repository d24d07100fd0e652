"""What real digits score, the numbers every digits generator is read against: the train split's reference
statistics in the digits network's features (built on first use and cached), and the held-out split's FD and
class accuracy against them (the floor)."""

import fcntl
import os
from pathlib import Path

import numpy as np

from models.digits_net import load_digits_net

from .digits import digits_source
from .evaluator import build_reference, evaluate


def cache_dir():
    """Where built reference statistics are cached: $DIT_CACHE, else ~/.cache/dit-research."""
    return Path(os.environ.get("DIT_CACHE") or Path.home() / ".cache" / "dit-research")


def digits_reference(folder=None):
    """Path of the train-split reference statistics in the shipped digits network's features, built on first use
    (a second) and cached under a name carrying the weights' hash, so a retrained network never meets stale ones.
    Builders (jobs sharing the cache) take turns on a lock beside it, the file is written through a temporary one and
    a rename (evaluation.stats.save_reference), and a cached file that does not read (cut short) is rebuilt."""
    _, info = load_digits_net()
    path = Path(folder or cache_dir()) / f"digits-train-{info['sha256'][:12]}.npz"
    if _readable(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)   # a second builder waits here, then finds the first one's file
        except OSError:   # a filesystem without locks: both build, each renaming a complete file into place
            pass
        if not _readable(path):
            build_reference(digits_source("train"), path, features="digits", progress=False)
    return path


def _readable(path):
    """Whether a cached reference is there and complete (mu and sigma read, of matching sizes)."""
    try:
        with np.load(path) as f:
            return f["sigma"].shape == (len(f["mu"]), len(f["mu"]))
    except Exception:   # missing, cut short, garbled
        return False


def digits_floor(reference=None):
    """What real digits score: FD and class accuracy of the held-out split against the train-split reference, the
    floor to read every generator's number against."""
    result = evaluate(digits_source("heldout"), reference or digits_reference(), features="digits", progress=False)
    return {"fid": result["fid"], "class_accuracy": result["class_accuracy"], "num_samples": result["num_samples"]}
