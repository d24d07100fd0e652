"""A data order that is a pure function of (seed, step), so a resumed run continues exactly."""

import torch
from torch.utils.data import Sampler
from utils.errors import ConfigError


class StepSampler(Sampler):
    """Infinite stream of dataset indices for one rank, starting at training step `start_step`.

    The global stream is epoch after epoch of permutations seeded by (seed, epoch); global batch s is stream
    positions [s*B, (s+1)*B), and rank r of W takes the r-th contiguous slice of B/W. So the global batch at a
    step is the same for any number of ranks, and resuming needs only the step.
    """

    def __init__(self, dataset_size, global_batch_size, rank=0, world_size=1, seed=0, start_step=0):
        if global_batch_size % world_size:
            raise ConfigError(f"train.batch_size {global_batch_size} is not divisible by the {world_size} processes")
        self.n, self.B = dataset_size, global_batch_size
        self.b = global_batch_size // world_size
        self.rank, self.seed, self.start_step = rank, seed, start_step
        self._perms = {}

    def _permutation(self, epoch):
        """The order of epoch `epoch`; the last two are kept, as a batch can straddle an epoch boundary."""
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=generator)
        return self._perms[epoch]

    def indices(self, step):
        """This rank's dataset indices for a global step."""
        start = step * self.B + self.rank * self.b
        positions = torch.arange(start, start + self.b)
        epochs, offsets = positions // self.n, positions % self.n
        out = torch.empty(self.b, dtype=torch.long)
        for epoch in epochs.unique().tolist():  # at most a few epochs per batch
            mask = epochs == epoch
            out[mask] = self._permutation(epoch)[offsets[mask]]
        return out

    def __iter__(self):
        step = self.start_step
        while True:
            yield from self.indices(step).tolist()
            step += 1
