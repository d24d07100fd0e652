"""torchrun / single-process setup. Rank checks live here and in the scripts' logging and checkpointing only."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def pick_device(setting):
    """'auto' -> cuda when available, else cpu."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting not in ("cpu", "cuda"):
        raise ValueError(f"device={setting!r}; choose auto, cpu or cuda")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    return setting


def setup_distributed(device_setting="auto", tf32=True):
    """Join the process group when launched by torchrun (NCCL on GPU, gloo on CPU); else a 1-process world.
    tf32: allow TF32 matrix products on Ampere and newer GPUs."""
    kind = pick_device(device_setting)
    if kind == "cuda" and tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "RANK" not in os.environ:
        return DistInfo(0, 1, 0, torch.device(kind))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if kind == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", device_id=device if kind == "cuda" else None)
    return DistInfo(rank, world, local, device)


def cleanup_distributed():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()
