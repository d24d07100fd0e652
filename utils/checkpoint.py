"""Checkpoints: plain dicts of tensors and primitives, written atomically, loadable with weights_only=True."""

import itertools
import os
import pickle
import re
import time
import warnings
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

from .collective import on_all, on_main
from .errors import ConfigError, Diverged, MissingFile, UserError
from .files import atomic_write, sweep_temp_files
from .guard import first_nonfinite_tensor

_NAME = re.compile(r"^(\d{7,})\.pt$")
RESUME_KEYS = ("model", "ema", "step", "config")   # what a resume reads: a file without them is no checkpoint of ours


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that could not be read or written for a reason other than its content (an I/O error, memory, a
    newer torch's format, a full disk): the run stops with the reason, and every checkpoint stays as it is."""


def _first_line(error):
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300]}" if str(error) else type(error).__name__


def save_checkpoint(state, folder, step, keep_last=None):
    """Write `state` to folder/<step>.pt through a temporary file in the same folder and a rename, so a kill at
    any moment leaves either the old set of checkpoints or the new one; then keep only the newest keep_last.
    A state holding NaN or inf is never written (Diverged names the tensor), so the ones kept are all finite."""
    bad = first_nonfinite_tensor({k: state[k] for k in ("model", "ema", "opt") if k in state})
    if bad is not None:
        raise Diverged(f"refusing to write checkpoint {step}: {bad} holds NaN or inf; the checkpoints in {folder} "
                       f"are kept as they are")
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = atomic_write(folder / f"{step:07d}.pt", lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as error:   # a full disk, a quota: torch's file writer raises RuntimeError
        if not isinstance(error, OSError) and not any(s in str(error) for s in ("inline_container", "StreamWriter")):
            raise
        kept = list_checkpoints(folder)
        raise CheckpointError(f"could not write checkpoint {step} to {folder} ({_first_line(error)}); its temporary "
                              f"file is removed and the checkpoints there are kept (newest: "
                              f"{kept[-1].name if kept else 'none'}). Fix the cause (free space, permissions) and "
                              f"re-run the same command to resume") from error
    if keep_last:
        for old in list_checkpoints(folder)[:-keep_last]:
            old.unlink()
    return path


def save_on_main(state, folder, step, keep_last=None):
    """save_checkpoint on rank 0 for all ranks: `state` is the dict or a function returning it (called on rank 0
    only); a failed write (a full disk) stops every rank with the same CheckpointError instead of leaving the others
    waiting in the next collective. Also a barrier."""
    return on_main(lambda: save_checkpoint(state() if callable(state) else state, folder, step, keep_last))


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


def invalid_reason(path, error=None):
    """Why the file at `path`, which failed to load with `error`, is not a checkpoint at all (cut short, damaged, or
    holding objects weights_only refuses), or None when it is a sound file that failed for another reason: an I/O
    error, memory, a format newer than this torch. Only the first kind may be set aside."""
    try:
        with zipfile.ZipFile(path) as archive:   # torch.save writes a zip archive; testzip checks every CRC
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError):
        return "not a complete checkpoint archive: cut short or damaged"
    except Exception:   # the file cannot even be read (an I/O error): the disk's problem, not the file's
        return None
    if damaged is not None:
        return f"its entry {damaged} is damaged"
    if isinstance(error, pickle.UnpicklingError):
        return "it holds objects other than tensors and primitives, which weights_only refuses"
    return None


def set_aside(path):
    """Rename a file that is no checkpoint to <name>.corrupt-<time>, never replacing an earlier one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        aside = path.with_name(f"{path.name}.corrupt-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            os.link(path, aside)   # fails if the name is taken, where os.replace would overwrite it
        except FileExistsError:
            continue
        except OSError:   # a filesystem without hard links
            if aside.exists():
                continue
            os.rename(path, aside)
            return aside
        path.unlink()
        return aside


def load_newest(folder, set_aside_invalid=False, required=()):
    """(path, checkpoint) of the newest checkpoint in `folder`, loaded on the CPU, or (None, None) when there is none.

    A file that is not a checkpoint (cut short by a full disk or a copy, damaged, holding pickled objects, or without
    the `required` keys) is skipped with a warning naming it and the reason, and with set_aside_invalid renamed to
    <name>.corrupt-<time> (never deleted), so the next resume does not trip on it again; only the process that owns
    the run folder (the trainer's rank 0) does that. A sound file that fails to load (an I/O error, memory, a newer
    format) raises CheckpointError: resuming from an older step would hide it and drop the newer steps' metrics."""
    for path in reversed(list_checkpoints(folder)):
        try:
            ckpt = load_checkpoint(path)
        except Exception as error:
            if isinstance(error, FileNotFoundError) and not path.exists():   # removed meanwhile (keep_last)
                continue
            reason = invalid_reason(path, error)
            if reason is None:
                raise CheckpointError(f"cannot load checkpoint {path} ({_first_line(error)}). It is a complete file, "
                                      f"so it is kept and nothing older is used instead: fix the cause (the disk, "
                                      f"memory, the torch version) and re-run") from error
            reason = f"{reason}; {_first_line(error)}"
        else:
            missing = [key for key in required if not isinstance(ckpt, dict) or key not in ckpt]
            if not missing:
                return path, ckpt
            reason = f"it lacks the keys {', '.join(missing)}"
            del ckpt
        aside = set_aside(path) if set_aside_invalid and path.exists() else None
        warnings.warn(f"skipping checkpoint {path}: it does not load ({reason})"
                      + (f"; renamed to {aside.name}" if aside else ""), stacklevel=2)
    return None, None


def load_for_resume(folder, required=RESUME_KEYS):
    """(path, checkpoint) to resume from, the same on every rank, loaded on the CPU (load_state_dict moves the
    weights to the model's device); (None, None) for a fresh run. Rank 0 removes temporary files of interrupted
    writes, chooses the newest checkpoint (setting aside files that are not checkpoints: load_newest) and broadcasts
    its name; the others load that file. An error on any rank stops every rank with its message."""
    chosen = {}

    def choose():
        sweep_temp_files(folder)
        path, chosen["ckpt"] = load_newest(folder, set_aside_invalid=True, required=required)
        return None if path is None else path.name

    name = on_main(choose)
    if name is None:
        return None, None
    path = Path(folder) / name

    def load():
        if "ckpt" in chosen:   # rank 0 read it already
            return chosen.pop("ckpt")
        try:
            return load_checkpoint(path)
        except Exception as error:
            raise CheckpointError(f"rank {dist.get_rank()} cannot load {path}, the checkpoint rank 0 resumes from "
                                  f"({_first_line(error)}); every rank must see the same run_dir") from error
    return path, on_all(load)


def resolve_checkpoint(path, map_location="cpu", set_aside=False):
    """(path, checkpoint): a checkpoint file, or a run folder's newest checkpoint that loads (see load_newest).
    Readers (sample.py, benchmarks) leave the folder as it is: set_aside only in the process that owns it."""
    path = Path(path)
    if path.is_dir():
        folder = path / "checkpoints" if list_checkpoints(path / "checkpoints") else path
        found, ckpt = load_newest(folder, set_aside_invalid=set_aside)
        if found is None:
            raise MissingFile(f"no checkpoint that loads in {path} or {path / 'checkpoints'}; pass a .pt file or a "
                              f"run_dir")
        return found, ckpt
    if not path.is_file():
        raise MissingFile(f"checkpoint {path} does not exist; pass a .pt file or a run_dir")
    try:
        return path, load_checkpoint(path, map_location)
    except Exception as error:
        raise ConfigError(f"checkpoint {path} does not load ({_first_line(error)}); is it complete? Pass the run "
                          f"folder to use its newest checkpoint that loads") from None


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True (no pickled code); on the CPU unless map_location says otherwise."""
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


def check_resume(saved, current, path, canonical_diffusion=lambda d: d):
    """Refuse to resume a run (`saved`: its checkpoint's config) with another model, objective, REPA or VAE than the
    `current` config's (plain dicts); settings such as train.steps may change. canonical_diffusion names the
    objective of configs from before it was recorded (diffusion.objectives.canonical_config)."""
    NORMALIZE_MODES = {None: "none", False: "none", True: "channel"}   # vae.normalize's older booleans (models/vae.py)
    REPA_BEFORE_IREPA = {"projector": "mlp", "projector_kernel": 3, "spatial_norm": False, "spatial_norm_gamma": 0.6}

    def identity(c):
        vae = c.get("vae") or {}
        normalize = NORMALIZE_MODES.get(vae.get("normalize"), vae.get("normalize"))
        # Keys added later take the value that reproduces older runs: sp (models/mup.py) at the named width, REPA's
        # MLP projector without iREPA's spatial normalisation (diffusion/repa.py).
        return {"model": {"param": "sp", "base_width": None, "width": None, **(c.get("model") or {})},
                "diffusion": canonical_diffusion(c.get("diffusion")),
                "repa": ({**REPA_BEFORE_IREPA, **c["repa"]} if (c.get("repa") or {}).get("encoder")
                         else {"encoder": None}),
                "vae": {**{k: vae.get(k) for k in ("name", "id", "scaling_factor")}, "normalize": normalize}}
    before, now = identity(saved), identity(current)
    if "vae" not in saved:   # runs from before latent diffusion: the VAE may not be compared
        before["vae"] = now["vae"]
    for key in before:
        if before[key] != now[key]:
            raise ConfigError(f"{path} was trained with {key}={before[key]} but the config now says {key}={now[key]}; "
                              f"restore those settings to resume, or set a new run_dir")

