"""Speed and scale applied from outside the network: compiled blocks, activation checkpointing, FSDP2.

Each function changes a model in place and keeps its state_dict keys, so checkpoints stay interchangeable
between eager, compiled, checkpointed and (gathered) FSDP runs.
"""

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
    reduce_dtype (bf16 compute with fp32 reductions by default). Needs an initialised process group."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
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
