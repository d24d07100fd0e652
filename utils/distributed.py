"""torchrun / single-process setup. Rank checks live here and in the scripts' logging and checkpointing only."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from .errors import ConfigError


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
        raise ConfigError(f"device={setting!r}; choose auto, cpu or cuda")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    return setting


def slurm_world():
    """Tasks of a SLURM job started without torchrun (srun, or submitit's hydra/launcher=submitit_slurm): set RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from the job's environment with submitit's
    TorchDistributedEnvironment (the port derives from the job id, the same on every task). True when it did."""
    tasks = int(os.environ.get("SLURM_NTASKS") or os.environ.get("SUBMITIT_LOCAL_NTASKS") or 1)
    if "RANK" in os.environ or tasks < 2:
        return False
    from submitit.helpers import TorchDistributedEnvironment
    # One task per GPU: each task sees its own GPU as cuda:0 only when SLURM has not already split them.
    TorchDistributedEnvironment().export(set_cuda_visible_devices="CUDA_VISIBLE_DEVICES" not in os.environ)
    return True


def setup_distributed(device_setting="auto", tf32=True):
    """Join the process group when launched by torchrun, by srun or by submitit (one task per GPU; NCCL on GPU,
    gloo on CPU); else a 1-process world. tf32: allow TF32 matrix products on Ampere and newer GPUs."""
    kind = pick_device(device_setting)
    if kind == "cuda" and tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    slurm_world()
    if "RANK" not in os.environ:
        return DistInfo(0, 1, 0, torch.device(kind))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if kind == "cuda":
        local = local if torch.cuda.device_count() > local else 0  # one visible GPU per task: it is cuda:0
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
