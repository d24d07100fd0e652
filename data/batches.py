"""Step-indexed batches: what a training step reads and every random draw it makes are functions of (seed, step),
so a resumed run replays exactly and any number of processes sees the same global batch."""

import functools
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader

from utils.guard import STOP_SIGNALS


def step_generator(seed, step, device):
    """The RNG for one training step: every draw of the step comes from here, so a resume replays it."""
    state = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint64)
    return torch.Generator(device=device).manual_seed(int(state[0] >> np.uint64(1)))


def apply_flips(x, flip, cached):
    """This step's horizontal flips: mirror images, or pick each latent-cache item's (b, 2, 2C, h, w) posterior
    of the image as is (index 0) or mirrored (index 1)."""
    if cached:
        return torch.where(flip[:, None, None, None], x[:, 1], x[:, 0])
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _quiet_worker(init, worker_id):
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if init is not None:
        init(worker_id)


def ignore_stop_signals(init=None):
    """A DataLoader worker_init_fn that makes the worker ignore utils.guard.STOP_SIGNALS, then runs `init` (a
    worker_init_fn of its own, or None). SLURM signals every process of a job step, DataLoader workers included: a
    worker must neither die of the signal (the main process would then raise instead of checkpointing) nor run a
    handler meant for the main process (submitit's requeue). Only the main process acts on it, at a step boundary.
    Picklable, so it works with any multiprocessing start method."""
    return functools.partial(_quiet_worker, init)


def batch_source(dataset, sampler, num_workers, device, worker_init_fn=None):
    """A function step -> (x, y, REPA features stored in a latent cache or None) for this rank. In-memory datasets
    are indexed directly; others stream through a DataLoader driven by the same step-indexed sampler, whose workers
    ignore the stop signals (ignore_stop_signals, composed with worker_init_fn)."""
    if hasattr(dataset, "images"):
        images, labels = dataset.images.to(device), dataset.labels.to(device)

        def indexed_batch(step):
            index = sampler.indices(step).to(device)
            return images[index], labels[index], None
        return indexed_batch
    loader = DataLoader(dataset, batch_size=sampler.b, sampler=sampler, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0, drop_last=True,
                        worker_init_fn=ignore_stop_signals(worker_init_fn))
    iterator = iter(loader)

    def next_batch(step):
        x, y, *stored = next(iterator)
        stored = stored[0].to(device, non_blocking=True) if stored else None
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True), stored
    return next_batch
