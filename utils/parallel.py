"""Speed and scale applied from outside the network: compiled blocks, activation checkpointing, DDP / FSDP2, and the
optimizer step over processes (gathering state, gradient accumulation without sync, joint clipping).

Each function changes a model in place and keeps its state_dict keys, so checkpoints stay interchangeable
between eager, compiled, checkpointed and (gathered) FSDP runs.
"""

import math
from contextlib import ExitStack, contextmanager

import torch
from torch.utils.checkpoint import checkpoint


def _blocks(model):
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks` to compile / checkpoint / shard one by one")
    return blocks


def compile_blocks(model, **compile_kwargs):
    """torch.compile each transformer block separately: identical blocks share one compiled graph, so
    compilation takes seconds rather than minutes, and the keys stay "blocks.i.*" (Module.compile is in place)."""
    for block in _blocks(model):
        block.compile(**compile_kwargs)
    return model


def checkpoint_activations(model):
    """Recompute each block's activations in the backward pass instead of storing them (less memory, ~1/3 more
    compute). Gradients are unchanged."""
    for block in _blocks(model):
        forward = block.forward
        block.forward = lambda *args, _forward=forward: checkpoint(_forward, *args, use_reentrant=False)
    return model


def shard_model(model, param_dtype=torch.bfloat16, reduce_dtype=torch.float32):
    """FSDP2: fully_shard every block, then the root; parameters computed in param_dtype, gradients reduced in
    reduce_dtype (bf16 compute with fp32 reductions by default). Needs an initialised process group.

    Forward inputs are not cast (FSDP2's default cast_forward_inputs=True would round the residual stream, the
    conditioning and the time to param_dtype at every block): autocast decides the dtype of each operation, as it
    does under DDP, so both train the same numerics (tests/test_speed.py compares them in bf16)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for block in _blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def full_state_dict(model, all_ranks=False):
    """A plain (unsharded) state_dict of an FSDP-sharded model; a collective, so call it on every rank. Rank 0
    gets it on the CPU (the others an empty dict), or every rank gets it on its device with all_ranks=True."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks)
    return get_model_state_dict(model, options=options)


#################################################################################
#                    Wrapping, gathering and the optimizer step                 #
#################################################################################

def parallelize(model, ema, *, parallel="ddp", grad_checkpoint=False, compile=False, param_dtype=torch.float32,
                world_size=1, device=None):
    """Apply activation checkpointing, compiled blocks and DDP or FSDP2 (`parallel`); returns the module the loop
    calls. Under FSDP the EMA is sharded the same way; gradients are always reduced in fp32."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .errors import ConfigError

    if grad_checkpoint:
        checkpoint_activations(model)
    if compile:
        compile_blocks(model)
    if parallel == "fsdp":
        if not torch.distributed.is_initialized():
            raise ConfigError("train.parallel=fsdp shards the model over processes: launch with torchrun "
                              "(torchrun --nproc_per_node=N train.py ...), or use train.parallel=ddp")
        shard_model(model, param_dtype=param_dtype)
        shard_model(ema, param_dtype=param_dtype)
        return model
    if parallel != "ddp":
        raise ConfigError(f"train.parallel={parallel!r}; choose ddp or fsdp")
    if world_size > 1:
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


# The two layouts of a saved optimizer state, by train.parallel; recorded in it as state["format"].
OPTIMIZER_FORMATS = {"ddp": "torch.optim's state_dict, keyed by parameter position",
                     "fsdp": "torch.distributed.checkpoint's full optimizer state dict, keyed by parameter name"}


def optimizer_format(state):
    """The layout of a saved optimizer state: the recorded one, else (checkpoints from before it was recorded) read
    from its keys: parameter names under FSDP, positions under DDP."""
    if state.get("format") is not None:
        return state["format"]
    keys = [*state.get("state", {}), *(p for group in state.get("param_groups", ()) for p in group.get("params", ()))]
    return "fsdp" if keys and all(isinstance(key, str) for key in keys) else "ddp"


def training_state(model, ema, opt, fsdp):
    """(model, ema, optimizer) state dicts to save: plain and unsharded (gathered to rank 0 under FSDP; a
    collective then, so every rank calls it); the optimizer's records its layout (OPTIMIZER_FORMATS)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if not fsdp:
        return model.state_dict(), ema.state_dict(), {**opt.state_dict(), "format": "ddp"}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (full_state_dict(model), full_state_dict(ema),
            {**get_optimizer_state_dict(model, opt, options=options), "format": "fsdp"})


def load_optimizer_state(model, opt, state, fsdp):
    """Load a plain optimizer state dict (training_state's) into `opt`, resharding it under FSDP. A state saved
    under the other parallelism (another layout) is refused with a ConfigError: a run keeps its train.parallel."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from .errors import ConfigError

    saved, now = optimizer_format(state), "fsdp" if fsdp else "ddp"
    if saved != now:
        raise ConfigError(f"the checkpoint's optimizer state was saved with train.parallel={saved} "
                          f"({OPTIMIZER_FORMATS.get(saved, 'unknown layout')}); this run has train.parallel={now}, "
                          f"which keeps it as {OPTIMIZER_FORMATS[now]}. Resume with train.parallel={saved}, or start "
                          f"a new run_dir")
    state = {key: value for key, value in state.items() if key != "format"}
    if fsdp:
        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def sampling_model(ema, build, fsdp, device, all_ranks):
    """The EMA network as one plain module; under FSDP its shards are gathered (a collective on every rank) into a
    fresh copy from `build()` on rank 0, or on every rank when all of them sample (None on the others)."""
    if not fsdp:
        return ema
    state = full_state_dict(ema, all_ranks=all_ranks)
    if not state:  # ranks other than 0 when only rank 0 samples
        return None
    network = build().to(device)
    network.load_state_dict(state)
    return network.eval().requires_grad_(False)


@contextmanager
def gradient_sync(modules, enabled):
    """Gradient accumulation under DDP or FSDP2: reduce the gradients across processes only when `enabled`."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    with ExitStack() as stack:
        for model in modules if not enabled else ():
            if isinstance(model, DDP):
                stack.enter_context(model.no_sync())
            elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
                model.set_requires_gradient_sync(False)
                stack.callback(model.set_requires_gradient_sync, True)
        yield                                                   # one process: nothing to reduce


def clip_gradients(groups, max_norm):
    """Clip the gradients of one or more parameter lists (the network; REPA's projector) by their joint norm, as
    one list would be, and return that norm. The lists may be sharded differently (FSDP DTensors beside plain
    tensors), so with several the norms are combined as plain tensors."""
    full = lambda norm: norm.full_tensor() if hasattr(norm, "full_tensor") else norm   # a DTensor under FSDP
    if len(groups) == 1:
        return full(torch.nn.utils.clip_grad_norm_(groups[0], max_norm))
    norms = [full(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])) for params in groups]
    total = torch.linalg.vector_norm(torch.stack(norms))
    if math.isfinite(max_norm):
        scale = min(1.0, max_norm / (float(total) + 1e-6))   # as clip_grad_norm_ scales (one host copy)
        for params in groups:
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], scale)
    return total


class Trainables:
    """What one training step updates: parts of (parameters, their optimizer, the module whose gradients are
    reduced across processes). The network is the first part; an auxiliary term with weights of its own (REPA's
    projector) adds one with `add`, so the loop treats them as one: zero, no_sync, joint clipping, step."""

    def __init__(self):
        self.parts = []

    def add(self, params, optimizer, synced):
        self.parts.append((list(params), optimizer, synced))
        return self

    def zero_grad(self, lr):
        """Set this update's learning rate (times a group's lr_scale: muP's per-group factors) and clear the
        gradients."""
        for _, opt, _ in self.parts:
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            opt.zero_grad(set_to_none=True)

    def sync(self, enabled):
        """Within a micro-batch: reduce gradients across processes only in the last one (see gradient_sync)."""
        return gradient_sync([synced for _, _, synced in self.parts], enabled)

    def clip(self, max_norm):
        """The joint gradient norm of every part, after clipping all of them by it (max_norm=inf: only measured)."""
        return clip_gradients([params for params, _, _ in self.parts], max_norm)

    def step(self):
        for _, opt, _ in self.parts:
            opt.step()

    def discard(self):
        """A skipped step: the gradients go, the weights and optimizer states stay as they were."""
        for _, opt, _ in self.parts:
            opt.zero_grad(set_to_none=True)
