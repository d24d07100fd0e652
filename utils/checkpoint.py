"""Checkpoints: plain dicts of tensors and primitives, written atomically, loadable with weights_only=True."""

import os
import re
import warnings
from pathlib import Path

import torch

from .errors import ConfigError, Diverged, MissingFile
from .guard import first_nonfinite_tensor

_NAME = re.compile(r"^(\d{7,})\.pt$")


def save_checkpoint(state, folder, step, keep_last=None):
    """Write `state` to folder/<step>.pt through a temporary file in the same folder and a rename, so a kill at
    any moment leaves either the old set of checkpoints or the new one; then keep only the newest keep_last.
    A state holding NaN or inf is never written (Diverged names the tensor), so the ones kept are all finite."""
    bad = first_nonfinite_tensor({k: state[k] for k in ("model", "ema", "opt") if k in state})
    if bad is not None:
        raise Diverged(f"refusing to write checkpoint {step}: {bad} holds NaN or inf; the checkpoints in {folder} "
                       f"are kept as they are")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{step:07d}.pt"
    tmp = folder / f".{path.name}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if keep_last:
        for old in list_checkpoints(folder)[:-keep_last]:
            old.unlink()
    return path


def list_checkpoints(folder):
    """Complete checkpoints in a folder, oldest first (temporary files of an interrupted write are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=lambda p: int(p.stem))


def latest_checkpoint(folder):
    """The newest complete checkpoint in a folder, or None."""
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_newest(folder, map_location="cpu", set_aside=True):
    """(path, checkpoint) of the newest checkpoint in `folder` that loads, or (None, None) when none does.

    A checkpoint that does not load (cut short by a full disk or a copy, damaged) is skipped with a warning naming
    it and the reason, and renamed aside to <name>.corrupt (never deleted) when set_aside, so the next resume does
    not trip on it again. Only one process should set files aside (rank 0); the others just skip them."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint(path, map_location=map_location)
        except Exception as error:  # any failure to read it: the file is not usable as a checkpoint
            reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            aside = path.with_name(path.name + ".corrupt")
            if set_aside and path.exists():
                os.replace(path, aside)
            warnings.warn(f"skipping checkpoint {path}: it does not load ({type(error).__name__}: {reason})"
                          + (f"; renamed to {aside.name}" if set_aside else ""), stacklevel=2)
    return None, None


def resolve_checkpoint(path, map_location="cpu", set_aside=True):
    """(path, checkpoint): a checkpoint file, or a run folder's newest checkpoint that loads (see load_newest;
    set_aside only on one process)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "checkpoints" if list_checkpoints(path / "checkpoints") else path
        found, ckpt = load_newest(folder, map_location, set_aside)
        if found is None:
            raise MissingFile(f"no checkpoint that loads in {path} or {path / 'checkpoints'}; pass a .pt file or a "
                              f"run_dir")
        return found, ckpt
    if not path.is_file():
        raise MissingFile(f"checkpoint {path} does not exist; pass a .pt file or a run_dir")
    try:
        return path, load_checkpoint(path, map_location)
    except Exception as error:
        raise ConfigError(f"checkpoint {path} does not load ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:200] if str(error) else ''}); is it complete? Pass the run "
                          f"folder to use its newest checkpoint that loads") from None


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True (no pickled code); map_location keeps ranks off GPU 0."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_model_weights(model, state_dict, source):
    """load_state_dict(strict=True) with an error that says what does not fit and how to fix it."""
    missing, unexpected, mismatched = [], [], []
    own = model.state_dict()
    for key, value in state_dict.items():
        if key not in own:
            unexpected.append(key)
        elif own[key].shape != value.shape:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
    missing = [key for key in own if key not in state_dict]
    if missing or unexpected or mismatched:
        lines = [f"the checkpoint {source} does not fit the model:"]
        for title, items in (("shape mismatches", mismatched), ("missing keys", missing), ("unexpected keys", unexpected)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:5]) + (" ..." if len(items) > 5 else ""))
        lines.append("  Use the model, data and diffusion settings the checkpoint was trained with "
                     "(they are in its 'config' entry and in the run_dir's config.yaml), or a new run_dir.")
        raise ConfigError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)
