"""The EMA of the weights that samples are drawn from, and the post-hoc EMA tracker (EDM2) beside it."""

import torch

from .errors import ConfigError
from .phema import PowerEMA


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, over parameters (buffers are fixed)."""
    ema_params = [p for p in ema.parameters()]
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)


def build_posthoc_ema(model, stds, snapshot_every, batch_size, fsdp=False, state=None):
    """EDM2's power-function EMAs of `model` at these sigma_rel (utils/phema.py), restored from a checkpoint's
    `state`; snapshots are taken every `snapshot_every` images, at step boundaries."""
    if fsdp:
        raise ConfigError("ema.posthoc=true is not supported with train.parallel=fsdp yet; use train.parallel=ddp")
    if snapshot_every % batch_size:
        raise ConfigError(f"ema.snapshot_every={snapshot_every} images must be a multiple of "
                          f"train.batch_size={batch_size} (snapshots are taken at step boundaries)")
    tracker = PowerEMA(model, stds)
    if state is not None:
        tracker.load_state_dict(state)
    return tracker
