"""How the training step's arithmetic runs: precision (with `auto`), the attention kernel, the AdamW kernel.

None of it changes what is trained beyond rounding: the tests hold each option to eager fp32 within a stated
tolerance, and a run resumes exactly under the same setting. Which option pays was measured per machine
(docs/benchmarks.md, "Time to quality"): the measured bf16 matmul peak was 2.0 TFLOP/s on a 2-core CPU with AMX
and 0.4 with AVX512-BF16 alone (about 2x its fp32), yet the default's eager step still ran 1.45x faster in bf16 there (with the math attention kernel),
while compiled bf16 blocks ran slower than eager fp32 on that CPU.
"""

from contextlib import ExitStack, nullcontext
from functools import cache
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from utils.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "auto")
ATTENTION = {"auto": None, "default": None, "math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


@cache
def cpu_bf16_flags():
    """The CPU's bf16 matrix instructions (Linux: /proc/cpuinfo flags): a subset of {"amx_bf16", "avx512_bf16"}."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()
    return frozenset(flags & {"amx_bf16", "avx512_bf16"})


def resolve_precision(precision, device):
    """fp32 | bf16, with auto = bf16 where its matrix products are fast: a CUDA GPU with bf16 support, or a CPU
    with AMX or AVX512-BF16; fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_bf16_flags() else "fp32"


def attention_backend(name, device, precision, compiled):
    """The scaled-dot-product-attention kernel to force, or None for torch's own choice.

    auto forces the math kernel for eager bf16 on a CPU: torch's CPU flash kernel runs its bf16 backward about
    8x slower than the matrix products it replaces (the default's step: 134 ms instead of 71 ms). Compiled
    blocks lower attention themselves, so auto leaves them alone.
    """
    if name not in ATTENTION:
        raise ConfigError(f"train.attention={name!r}; choose one of {', '.join(ATTENTION)}")
    if name == "auto":
        return SDPBackend.MATH if device.type == "cpu" and precision == "bf16" and not compiled else None
    return ATTENTION[name]


def forward_context(precision, device, attention=None):
    """A factory of the context the network's forward and backward run in: bf16 autocast when precision is
    bf16, and the forced attention kernel (attention_backend) if any. Call it for each use."""
    def context():
        if precision != "bf16" and attention is None:
            return nullcontext()
        stack = ExitStack()
        if precision == "bf16":
            stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        if attention is not None:
            stack.enter_context(sdpa_kernel(attention))
        return stack
    context.attention = attention
    return context


def backward_context(forward):
    """The context a backward pass runs in: the attention kernel its forward_context forced (if any), without autocast,
    so activation checkpointing recomputes each block with the kernel of the forward pass."""
    attention = getattr(forward, "attention", None)
    return sdpa_kernel(attention) if attention is not None else nullcontext()


def adamw(params, optim):
    """torch's AdamW with the config's settings. optim.fused: true = the fused kernel on CUDA and CPU alike (one
    pass over all parameters); false = torch's default implementation (for-each on CUDA, a per-parameter loop on
    the CPU: what CPU runs used before the option)."""
    fused = optim.get("fused", True)
    if fused not in (True, False):
        raise ConfigError(f"optim.fused={fused!r}; choose true or false")
    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                             fused=fused or None)
