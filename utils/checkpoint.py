"""Checkpoints: plain dicts of tensors and primitives, written atomically, loadable with weights_only=True."""

import os
import re
from pathlib import Path

import torch

_NAME = re.compile(r"^(\d{7,})\.pt$")


def save_checkpoint(state, folder, step, keep_last=None):
    """Write `state` to folder/<step>.pt through a temporary file in the same folder and a rename, so a kill at
    any moment leaves either the old set of checkpoints or the new one; then keep only the newest keep_last."""
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


def resolve_checkpoint(path):
    """A checkpoint file, or a run folder (then its newest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {path} or {path / 'checkpoints'}; pass a .pt file or a run_dir")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a .pt file or a run_dir")
    return path


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
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)
