"""Decisions one rank makes for all: rank 0 does something (chooses the checkpoint to resume, takes the run folder's
lock, writes a checkpoint) and every rank learns the outcome, its failure included, so that one rank's error stops
every rank with the same message instead of leaving the others in a collective until the NCCL timeout. Without a
process group both run the function as it is."""

import pickle

import torch.distributed as dist


def _portable(error):
    """The exception itself when it survives pickling (its type and message reach the other ranks), else a
    RuntimeError with its message."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def on_main(fn, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0 only; every rank returns its result (picklable), and when it raises every rank
    raises it (rank 0 the original, the others a copy). The broadcast is also a barrier."""
    if not dist.is_initialized():
        return fn(*args, **kwargs)
    outcome, error = [None], None
    if dist.get_rank() == 0:
        try:
            outcome = [(True, fn(*args, **kwargs))]
        except Exception as e:
            error, outcome = e, [(False, _portable(e))]
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def on_all(fn, *args, **kwargs):
    """fn(*args, **kwargs) on every rank; when it raises on any rank, every rank raises (the lowest failing rank's
    exception: the original there, a copy elsewhere)."""
    if not dist.is_initialized():
        return fn(*args, **kwargs)
    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except Exception as e:
        error = e
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else _portable(error))
    for rank, other in enumerate(errors):
        if other is not None:
            raise error if rank == dist.get_rank() else other
    return result
