"""What keeps a long run safe: stop signals, wall-clock checkpoints and the non-finite guard, each decided by all
ranks together at a step boundary (one small all-reduce per step under DDP/FSDP; nothing when alone).

- Signals. SIGTERM, SIGUSR1 and SIGUSR2 (what SLURM and submitit send before a time limit or a preemption) only set
  a flag. At the next step boundary every rank learns whether any rank got one; the loop then writes a checkpoint
  at that step, flushes its logs and exits with 128 + the signal's number (143 for SIGTERM), the code a shell or
  SLURM reports for a job ended by that signal. A handler that was installed before ours (submitit's, which
  requeues the job) is called after the checkpoint. A second signal while saving changes nothing. SLURM signals
  every process of a job step: DataLoader workers ignore these signals (data/batches.py ignore_stop_signals), and
  train.py installs the handlers before it starts them. Under torchrun only SIGTERM passes through torchrun's agent
  (docs/cluster.md).
- Wall clock. `train.ckpt_every_minutes` writes a checkpoint when that long has passed since the last one.
- Non-finite. A loss or gradient norm that is NaN or inf on any rank stops the step before the optimizer touches
  the weights; up to `train.skip_nonfinite` such steps are skipped (and logged) instead, then the run stops.
"""

import math
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def _agree_max(values, device):
    """Elementwise max of a few numbers over all ranks (the numbers themselves when alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    packed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return packed.tolist()


class StepBoundary:
    """The stop flag and the wall-clock timer, agreed across ranks once per step."""

    def __init__(self, ckpt_every_minutes=0, device="cpu"):
        self.signum = 0
        self.previous = {}
        self.interval = 60.0 * ckpt_every_minutes if ckpt_every_minutes else math.inf
        self.last_save = time.monotonic()
        self.device = device

    def install(self):
        """Install the flag-setting handlers (main thread only, as Python requires); returns self."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if not self.signum:  # the first signal decides; later ones (e.g. while saving) change nothing
            self.signum = signum

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def check(self, loss, grad_norm):
        """One agreement per step, before the optimizer update: (which of loss / gradient norm is not finite on some
        rank, or None; the stop signal of any rank, or 0; whether a wall-clock checkpoint is due). One small
        all-reduce and one device-to-host copy, the only synchronisation the guard adds to a step."""
        finite = torch.stack([loss.detach().float(), grad_norm.detach().float()]).isfinite().tolist()
        due = time.monotonic() - self.last_save >= self.interval
        loss_bad, grad_bad, signum, due = _agree_max(
            [float(not finite[0]), float(not finite[1]), float(self.signum), float(due)], self.device)
        bad = "loss" if loss_bad else "gradient norm" if grad_bad else None
        return bad, int(signum), bool(due)

    def saved(self):
        self.last_save = time.monotonic()

    def exit(self, signum):
        """After the checkpoint: hand over to a handler installed before ours (submitit requeues the job and
        exits), else exit with 128 + signum."""
        previous = self.previous.get(signum)
        self.restore()
        if callable(previous):
            previous(signum, None)
        sys.exit(128 + signum)


def first_nonfinite_tensor(state, prefix=""):
    """The name of the first floating-point tensor holding NaN or inf in a nested dict/list, else None."""
    if torch.is_tensor(state):
        return prefix if state.is_floating_point() and not bool(torch.isfinite(state).all()) else None
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for key, value in items:
        found = first_nonfinite_tensor(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def divergence_message(step, quantity, checkpoints, allowed):
    """What stopped the run at `step`, where its good state is (`checkpoints`: the complete ones, oldest first) and
    what to try."""
    last = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
    return (f"step {step}: the {quantity} is not finite (NaN or inf), so training stopped before the optimizer "
            f"update ({allowed} such step(s) may be skipped: train.skip_nonfinite); {last}, and re-running the same "
            f"command resumes from it. Lower optim.lr, set optim.grad_clip, or use precision=fp32")

