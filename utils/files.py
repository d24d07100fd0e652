"""Atomic file writes: a reader (a resume, a sampler, a second job) sees the old file or the new one, never half."""

import os
import re
import secrets
import socket
import time
from pathlib import Path

# Temporary files of atomic writes: temp_name's `.<name>.tmp-<host>-<pid>-<hex>[suffix]`, and the older
# `.<name>.tmp<pid>` of checkpoints written before it.
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{6}")
_OLD_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")


def temp_name(path):
    """A temporary name beside `path`, unique across hosts and processes sharing the folder; the leading dot and the
    `.tmp-` mark let cleanups and listings tell it from a finished file. It keeps the suffix, so writers that add one
    when it is missing (np.savez: .npz) write to this very name."""
    path = Path(path)
    unique = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    return path.with_name(f".{path.name}.tmp-{unique}{path.suffix}")


def atomic_write(path, write):
    """write(tmp) into a temporary file beside `path`, flushed to disk, then renamed over `path`. A write that fails
    (a full disk, an interrupt) removes its temporary file and re-raises, so nothing half-written is left behind.
    Returns `path`."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text):
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path, data):
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def pid_alive(pid):
    """Whether a process with this id runs on this host."""
    try:
        pid = int(pid)
        if pid <= 0:
            return False
        os.kill(pid, 0)
    except PermissionError:   # it exists, owned by another user
        return True
    except (ProcessLookupError, OverflowError, TypeError, ValueError):
        return False
    return True


def sweep_temp_files(folder, min_age=300):
    """Remove what interrupted atomic writes left in `folder` (a killed job, a full disk that failed the cleanup
    too): temporary files of a dead process on this host, and any not written to for `min_age` seconds (a write
    in progress keeps its file's mtime fresh). Returns the removed paths."""
    folder, host, removed = Path(folder), socket.gethostname(), []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMP.match(path.name) or _OLD_TEMP.match(path.name)
        if match is None:
            continue
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:   # its writer renamed or removed it meanwhile
            continue
        dead_here = match.groupdict().get("host") == host and not pid_alive(int(match["pid"]))
        if (dead_here or age > min_age) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
