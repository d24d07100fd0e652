"""GPU-only checks: bf16 and TF32 on CUDA, flash attention kernels, compiled blocks, FSDP over NCCL.

Skipped without a CUDA device (CI has none); on a GPU machine: python -m pytest -q -m gpu tests/test_gpu.py
(add -m "gpu and (slow or not slow)" for the slow ones). The GPU check (benchmarks/gpu_check.sh) runs the quick ones;
compile, FSDP against DDP and throughput have stages of their own there.
"""

import copy

import pytest
import torch

from diffusion import create_diffusion
from models import DiT_models
from utils.parallel import compile_blocks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


def dit_s2(**kwargs):
    """DiT-S/2 at 256x256 (32x32x4 latents) with random, non-zero output layers."""
    torch.manual_seed(0)
    model = DiT_models["DiT-S/2"](input_size=32, num_classes=1000, **kwargs)
    for name, p in model.named_parameters():
        if "adaLN" in name or "final_layer" in name:  # zero-initialised: the output would be trivially 0
            torch.nn.init.normal_(p, std=0.02)
    return model.to(CUDA)


def batch(n=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, 32, 32, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, 1001, (n,), generator=g)
    return x.to(CUDA), t.to(CUDA), y.to(CUDA)


def exact_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def test_bf16_autocast_agrees_with_fp32_on_cuda():
    exact_fp32()
    model = dit_s2().eval()
    x, t, y = batch()
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x, t, y).float()
    # 12 blocks of bf16 rounding (2^-8 relative): within 3% of the output scale.
    assert (low - ref).abs().max() <= 0.03 * ref.abs().max()


def test_tf32_agrees_with_fp32():
    model = dit_s2().eval()
    x, t, y = batch()
    with torch.no_grad():
        exact_fp32()
        ref = model(x, t, y)
        torch.backends.cuda.matmul.allow_tf32 = True
        fast = model(x, t, y)
    exact_fp32()
    assert (fast - ref).abs().max() <= 0.01 * ref.abs().max()


def test_attention_runs_on_the_flash_kernel():
    """Under bf16 the blocks' attention must be servable by FlashAttention alone (no math fallback)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = dit_s2().eval()
    x, t, y = batch()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel(SDPBackend.MATH):
            reference = model(x, t, y).float()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if the flash kernel cannot take these inputs
            flash = model(x, t, y).float()
    assert (flash - reference).abs().max() <= 0.03 * reference.abs().max()


def test_compiled_blocks_agree_with_eager_on_cuda():
    exact_fp32()
    model = dit_s2()
    compiled = compile_blocks(copy.deepcopy(model))
    x, t, y = batch()
    diffusion = create_diffusion("")
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(CUDA)
    losses, grads = [], []
    for m in (model, compiled):
        loss = diffusion.training_losses(m, x, t, dict(y=y), noise=noise)["loss"].mean()
        m.zero_grad()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-5)


def test_fused_adamw_matches_the_loop_implementation():
    exact_fp32()
    models = [dit_s2(), dit_s2()]
    x, t, y = batch()
    opts = [torch.optim.AdamW(models[0].parameters(), lr=1e-3, weight_decay=0, fused=True),
            torch.optim.AdamW(models[1].parameters(), lr=1e-3, weight_decay=0, foreach=False)]
    diffusion = create_diffusion("")
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(CUDA)
    for model, opt in zip(models, opts):
        for _ in range(3):
            loss = diffusion.training_losses(model, x, t, dict(y=y), noise=noise)["loss"].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_fsdp_over_nccl_matches_single_gpu_training(tmp_path):
    """One GPU under torchrun with train.parallel=fsdp (NCCL, bf16 parameters) lands close to plain training."""
    from conftest import read_run_metrics, run_script
    from utils.checkpoint import latest_checkpoint, load_checkpoint

    common = ["logger=none", "device=cuda", "precision=bf16", "train.batch_size=32", "train.steps=4",
              "train.log_every=1", "train.ckpt_every=4", "sample.steps=2", "sample.per_class=1"]
    run_script(["-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29541", "train.py", *common,
                "train.parallel=fsdp", f"run_dir={tmp_path}/fsdp"])
    run_script(["train.py", *common, f"run_dir={tmp_path}/single"])
    fsdp = load_checkpoint(latest_checkpoint(tmp_path / "fsdp" / "checkpoints"))
    single = load_checkpoint(latest_checkpoint(tmp_path / "single" / "checkpoints"))
    assert fsdp["step"] == single["step"] == 4
    assert fsdp["model"].keys() == single["model"].keys()                        # plain, unsharded checkpoints
    assert all(v.dtype == torch.float32 for v in fsdp["model"].values())         # fp32 master weights
    # Same initial weights, data and noise: bf16 parameters (FSDP) vs fp32 parameters under autocast give the
    # same losses up to bf16 rounding.
    losses = [[row["loss"] for row in read_run_metrics(tmp_path / run) if "loss" in row] for run in ("fsdp", "single")]
    assert len(losses[0]) == len(losses[1]) == 4
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=0.05, atol=0)


def test_throughput_benchmark_reports_mfu_on_cuda():
    from conftest import run_script

    out = run_script(["benchmarks/throughput.py", "--model", "DiT-S/2", "--batch-size", "16", "--device", "cuda",
                      "--precision", "bf16", "--steps", "3", "--warmup", "2"]).stdout
    row = next(line for line in out.splitlines() if line.startswith("ours"))
    mfu = float(next(token for token in row.split() if token.endswith("%")).rstrip("%"))
    assert 0 < mfu < 100 and "GiB" in row  # a utilisation and a peak memory
