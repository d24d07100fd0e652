"""Process-group setup under torchrun, SLURM (plain srun or submitit) or alone. Rank checks live here and in the
scripts' logging and checkpointing only."""

import os
import random
import re
import shutil
import socket
import subprocess
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


def first_host(nodelist):
    """The first host of a SLURM node list ("gpu[07-08,11],cpu3" -> "gpu07"): from `scontrol show hostnames` where
    SLURM's tools are installed, else read here from the forms SLURM writes (comma-separated groups, each a name
    with bracketed ranges: "node-[001-004]-ib", "rack[1-2]-gpu[01-08]")."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            hosts = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                   timeout=30, check=True).stdout.split()
            if hosts:
                return hosts[0]
        except (OSError, subprocess.SubprocessError):
            pass   # read it here instead
    nodelist = nodelist.strip()
    group = re.match(r"(?:[^,\[\]]|\[[^\[\]]*\])*", nodelist).group(0)   # up to the first comma outside brackets
    first = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0].strip(), group)
    if not first or nodelist[len(group):len(group) + 1] not in ("", ","):
        raise ConfigError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR")
    return first


def slurm_port(job_id):
    """The rendezvous port of a SLURM job, the same on every task: drawn from the job id as submitit's
    TorchDistributedEnvironment draws it (20000-60000), so either path gives the same port."""
    return random.Random(job_id).randint(20000, 60000)


def slurm_world():
    """Tasks of a SLURM job started without torchrun (`srun python train.py`, one task per GPU, or submitit's
    hydra/launcher=slurm | submitit_local): set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from the
    job's environment (the port derives from the job id, the same on every task). In a submitit job through
    submitit's TorchDistributedEnvironment; under plain srun from SLURM's own variables (SLURM_PROCID, the step's
    SLURM_STEP_NUM_TASKS or SLURM_NTASKS, SLURM_LOCALID, the first host of the step's node list, where rank 0
    runs: SLURM_STEP_NODELIST or SLURM_JOB_NODELIST). MASTER_ADDR and MASTER_PORT already set are kept. True when it
    set the world."""
    if "RANK" in os.environ:   # torchrun (or the user) set the world
        return False
    if os.environ.get("SUBMITIT_EXECUTOR"):
        tasks = int(os.environ.get("SLURM_NTASKS") or os.environ.get("SUBMITIT_LOCAL_NTASKS") or 1)
        if tasks < 2:
            return False
        from submitit.helpers import TorchDistributedEnvironment
        # One task per GPU: each task sees its own GPU as cuda:0 only when SLURM has not already split them.
        TorchDistributedEnvironment().export(set_cuda_visible_devices="CUDA_VISIBLE_DEVICES" not in os.environ)
        return True
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or 1)
    if tasks < 2 or "SLURM_PROCID" not in os.environ:
        return False
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    os.environ.update({
        "RANK": os.environ["SLURM_PROCID"], "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": os.environ.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else socket.gethostname()),
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(slurm_port(os.environ.get("SLURM_JOB_ID", "0")))})
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


def cleanup_distributed(wait=True):
    """Leave the process group (after a barrier when `wait`: not after an error, which other ranks may not share)."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()
