"""Speed options keep the math: bf16 autocast, compiled blocks, activation checkpointing, DPM-Solver++."""

import copy

import pytest
import torch

from conftest import PINNED, tiny_dit
from diffusion import create_diffusion
from diffusion.sampling import sample
from utils.parallel import checkpoint_activations, compile_blocks


def small_dit(**kwargs):
    torch.manual_seed(0)
    model = tiny_dit(**kwargs)
    # Random (non-zero) output layers, so outputs and gradients are not trivially zero.
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def inputs(n=4):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 11, (n,), generator=g))


def loss_and_grads(model, x, t, y, autocast=False):
    diffusion = create_diffusion("")
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = diffusion.training_losses(model, x, t, dict(y=y), noise=noise)["loss"].mean()
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_bf16_autocast_agrees_with_fp32():
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-8 = 0.4%); through two blocks the output drifts
    # by about 1% of its scale, which is the tolerance stated here.
    model = small_dit()
    x, t, y = inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, y).float()
    assert (low - ref).abs().max() <= 0.02 * ref.abs().max()
    loss32, _ = loss_and_grads(model, x, t, y)
    loss16, _ = loss_and_grads(model, x, t, y, autocast=True)
    assert abs(loss16 - loss32) <= 0.02 * loss32


def test_activation_checkpointing_gives_the_same_gradients():
    model = small_dit()
    checkpointed = checkpoint_activations(copy.deepcopy(model))
    assert checkpointed.state_dict().keys() == model.state_dict().keys()
    x, t, y = inputs()
    loss_a, grads_a = loss_and_grads(model, x, t, y)
    loss_b, grads_b = loss_and_grads(checkpointed, x, t, y)
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointed", [False, True], ids=["compiled", "compiled+checkpointed"])
def test_compiled_blocks_agree_with_eager(checkpointed):
    model = small_dit()
    copied = copy.deepcopy(model)
    compiled = compile_blocks(checkpoint_activations(copied) if checkpointed else copied)  # train.py's order
    assert compiled.state_dict().keys() == model.state_dict().keys()  # checkpoints stay interchangeable
    x, t, y = inputs()
    loss_a, grads_a = loss_and_grads(model, x, t, y)
    loss_b, grads_b = loss_and_grads(compiled, x, t, y)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)


def test_dpm_solver_matches_ddim_on_an_exact_model():
    """With the exact eps of a point mass at x0 every ODE solver must land on x0; with few steps DPM-Solver++
    gets there as well as a many-step DDIM does."""
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)
    base = create_diffusion("")
    abar = torch.tensor(base.alphas_cumprod, dtype=torch.float64)

    def oracle(x, t, y):
        a = abar[t.long()].view(-1, 1, 1, 1).to(x.dtype)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)  # learned-sigma layout: eps then v

    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    labels = torch.zeros(3, dtype=torch.long)
    out = sample(oracle, noise, labels, null_class=10, sampler="dpm-solver++", steps=10)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-3)


def test_dpm_solver_samples_with_guidance():
    model = small_dit().eval()
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        a = sample(model, noise, labels, null_class=10, sampler="dpm-solver++", steps=5, cfg_scale=3.0)
        b = sample(model, noise, labels, null_class=10, sampler="dpm-solver++", steps=5, cfg_scale=1.0)
    assert a.shape == noise.shape and torch.isfinite(a).all()
    assert not torch.allclose(a, b)  # guidance changes the result


# ------------------------------------------------------------------------------------------------------------
# The options through train.py
# ------------------------------------------------------------------------------------------------------------

TRAIN = [*PINNED, "logger=none", "device=cpu", "train.batch_size=16", "train.log_every=1", "train.ckpt_every=2",
         "sample.steps=2", "sample.per_class=1"]


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_two_gloo_processes_match_one_process_and_resume(tmp_path):
    import train as train_script
    from conftest import assert_same_state, compose_config, final_state, run_script
    from utils.checkpoint import latest_checkpoint, load_checkpoint

    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537", "train.py"]
    run_script([*torchrun, *TRAIN, "train.steps=2", "train.parallel=fsdp", f"run_dir={tmp_path}/fsdp"],
               env={"OMP_NUM_THREADS": "1"})
    train_script.train(compose_config(overrides=[*TRAIN, "train.steps=2", f"run_dir={tmp_path}/single"]))
    fsdp = load_checkpoint(latest_checkpoint(tmp_path / "fsdp" / "checkpoints"))
    single = load_checkpoint(latest_checkpoint(tmp_path / "single" / "checkpoints"))
    assert fsdp["model"].keys() == single["model"].keys()  # plain, unsharded checkpoints
    for key in ("model", "ema"):
        for name in single[key]:
            torch.testing.assert_close(fsdp[key][name], single[key][name], rtol=1e-5, atol=1e-6)
    # Resuming the sharded run restores the weights, EMA and optimizer state and continues as if never stopped:
    # bit for bit the state of an uninterrupted 4-step FSDP run.
    for run in ("fsdp", "uninterrupted"):
        run_script([*torchrun, *TRAIN, "train.steps=4", "train.parallel=fsdp", f"run_dir={tmp_path}/{run}"],
                   env={"OMP_NUM_THREADS": "1"})
    resumed, uninterrupted = final_state(tmp_path / "fsdp"), final_state(tmp_path / "uninterrupted")
    assert resumed["step"] == uninterrupted["step"] == 4 and uninterrupted["opt"]["state"]
    assert_same_state(resumed, uninterrupted)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_trains_the_numerics_of_ddp_in_bf16_and_refuses_a_resume_under_ddp(tmp_path):
    """precision=bf16 on 2 gloo processes: FSDP2 (bf16 parameters, inputs not cast: autocast picks each op's dtype)
    against DDP (fp32 parameters under the same autocast). FSDP2's default cast_forward_inputs=True rounded the
    residual stream, the conditioning and the time to bf16 at every block: the gradient norm of step 1 then differed
    by 6e-5 and step 2's by 3e-4 (relative); without the cast they agree to 1e-7. The weights after two AdamW steps
    differ a little more (bf16 embedding table under FSDP; Adam turns rounding into full-sized steps where a
    gradient is near zero), so they are compared loosely."""
    import json

    import train as train_script
    from conftest import compose_config, final_state, run_script
    from models import build_model
    from utils.errors import ConfigError

    common = [*TRAIN, "precision=bf16", "optim.warmup_steps=0", "train.steps=2", "fid.at_end=false"]
    for port, parallel in ((29544, "ddp"), (29545, "fsdp")):
        run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "train.py", *common,
                    f"train.parallel={parallel}", f"run_dir={tmp_path}/{parallel}"], env={"OMP_NUM_THREADS": "1"})
    rows = {parallel: [json.loads(line) for line in (tmp_path / parallel / "metrics.jsonl").read_text().splitlines()
                       if '"loss"' in line] for parallel in ("ddp", "fsdp")}
    assert [r["step"] for r in rows["fsdp"]] == [r["step"] for r in rows["ddp"]] == [1, 2]
    for fsdp, ddp in zip(rows["fsdp"], rows["ddp"]):
        for key in ("loss", "grad_norm"):
            assert fsdp[key] == pytest.approx(ddp[key], rel=1e-5), (key, fsdp["step"], fsdp[key], ddp[key])
    fsdp, ddp = final_state(tmp_path / "fsdp"), final_state(tmp_path / "ddp")
    torch.manual_seed(0)
    init = build_model(ddp["model_args"]).state_dict()
    flat = lambda state: torch.cat([state[name].double().flatten() for name in init])
    update = flat(ddp["model"]) - flat(init)
    assert (flat(fsdp["model"]) - flat(ddp["model"])).norm() < 0.04 * update.norm()
    # The optimizer states have different layouts: the FSDP run cannot go on under DDP.
    assert (fsdp["opt"]["format"], ddp["opt"]["format"]) == ("fsdp", "ddp")
    with pytest.raises(ConfigError, match="saved with train.parallel=fsdp"):
        train_script.train(compose_config(overrides=[*common, "train.steps=3", f"run_dir={tmp_path}/fsdp"]))


def test_fsdp_without_torchrun_is_refused(tmp_path):
    import train as train_script
    from conftest import compose_config

    with pytest.raises(ValueError, match="launch with torchrun"):
        train_script.train(compose_config(overrides=[*TRAIN, "train.parallel=fsdp", f"run_dir={tmp_path}"]))


def test_checkpointing_option_trains(tmp_path):
    import train as train_script
    from conftest import compose_config
    from utils.checkpoint import latest_checkpoint, load_checkpoint

    for name, extra in (("plain", []), ("ckpt", ["train.grad_checkpoint=true"])):
        train_script.train(compose_config(overrides=[*TRAIN, "train.steps=2", "fid.at_end=false", *extra,
                                                     f"run_dir={tmp_path}/{name}"]))
    a = load_checkpoint(latest_checkpoint(tmp_path / "plain" / "checkpoints"))["model"]
    b = load_checkpoint(latest_checkpoint(tmp_path / "ckpt" / "checkpoints"))["model"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_sampler_benchmark_times_and_judges_every_sampler(tmp_path):
    import json

    from conftest import TINY, run_script

    run_script(["train.py", *TINY, "diffusion=ddpm", f"run_dir={tmp_path}/run"])   # DDIM and DPM-Solver++ are DDPM's
    out = run_script(["benchmarks/samplers.py", "--run", f"{tmp_path}/run", "--num-samples", "20", "--batch-size",
                      "10", "--samplers", "ddim:4", "dpm-solver++:3", "--out", f"{tmp_path}/bench"]).stdout
    rows = json.loads((tmp_path / "bench" / "samplers.json").read_text())["results"]
    assert [(r["sampler"], r["steps"], r["samples"]) for r in rows] == [("ddim", 4, 20), ("dpm-solver++", 3, 20)]
    assert all(r["samples_per_s"] > 0 and 0 <= r["class_match"] <= 1 for r in rows)
    assert "real held-out digits" in out
    assert (tmp_path / "bench" / "samplers.png").stat().st_size > 0
    assert (tmp_path / "bench" / "dpm-solver++3.png").stat().st_size > 0
    bad = run_script(["benchmarks/samplers.py", "--run", f"{tmp_path}/run", "--samplers", "ddim"], check=False)
    assert bad.returncode != 0 and "NAME:STEPS" in bad.stderr


@pytest.mark.parametrize("block_type", ["adaLN-Zero", "cross-attn"])
def test_attention_goes_through_scaled_dot_product_attention(block_type, monkeypatch):
    """The blocks must call SDPA (flash / memory-efficient kernels on GPUs), not a hand-written softmax."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(1) or sdpa(*args, **kwargs))
    model = small_dit(block_type=block_type).eval()
    with torch.no_grad():
        model(*inputs())
    per_block = 2 if block_type == "cross-attn" else 1                 # self-attention (+ cross-attention)
    assert len(calls) == per_block * len(model.blocks)


def test_gradient_accumulation_gives_the_same_training(tmp_path):
    import train as train_script
    from conftest import compose_config, final_state

    for name, extra in (("whole", []), ("accum", ["train.grad_accum=4"])):
        train_script.train(compose_config(overrides=[*TRAIN, "train.steps=2", "fid.at_end=false", *extra,
                                                     f"run_dir={tmp_path}/{name}"]))
    whole, accum = final_state(tmp_path / "whole"), final_state(tmp_path / "accum")
    for key in ("model", "ema"):
        for name in whole[key]:
            torch.testing.assert_close(accum[key][name], whole[key][name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="positive divisor of the batch per process"):
        train_script.train(compose_config(overrides=[*TRAIN, "train.grad_accum=3", f"run_dir={tmp_path}/bad"]))


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.distributed
def test_gradient_accumulation_over_two_gloo_processes_matches_one_process(parallel, tmp_path):
    import train as train_script
    from conftest import compose_config, final_state, run_script

    run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29543", "train.py", *TRAIN,
                "train.steps=2", "train.grad_accum=2", f"train.parallel={parallel}", f"run_dir={tmp_path}/two"],
               env={"OMP_NUM_THREADS": "1"})
    train_script.train(compose_config(overrides=[*TRAIN, "train.steps=2", f"run_dir={tmp_path}/one"]))
    two, one = final_state(tmp_path / "two"), final_state(tmp_path / "one")
    for key in ("model", "ema"):
        for name in one[key]:
            torch.testing.assert_close(two[key][name], one[key][name], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# The step's kernels (utils/speed.py): fused AdamW, precision auto, the attention kernel
# ------------------------------------------------------------------------------------------------------------

def adamw_trajectory(fused, steps=5):
    """Parameters after `steps` AdamW updates of small_dit on fixed batches, with the fused kernel or without."""
    from omegaconf import OmegaConf

    from utils.speed import adamw

    model = small_dit()
    optim = OmegaConf.create(dict(lr=1e-3, betas=[0.9, 0.999], weight_decay=0.01, fused=fused))
    opt = adamw(model.parameters(), optim)
    assert opt.defaults["fused"] is (True if fused else None)
    x, t, y = inputs()
    for _ in range(steps):
        loss_and_grads(model, x, t, y)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt


def test_fused_adamw_follows_the_default_implementation():
    fused, _ = adamw_trajectory(True)
    plain, _ = adamw_trajectory(False)
    # The same update; only the order of floating-point operations differs. Adam divides by sqrt(v), which turns
    # rounding in the tiniest gradients into differences of up to ~0.3% of one step (lr 1e-3): allowed 1%.
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-5, atol=1e-5)
    moved = max((fused[n] - small_dit().state_dict()[n]).abs().max() for n in fused)
    assert moved > 1e-3  # they did move (5 steps of lr 1e-3), by far more than they differ
    # The optimizer states are interchangeable, so a checkpoint resumes with either setting: 3 steps of one, its
    # state loaded into the other, 2 steps of that land where 5 steps of the other do. Without the loaded state
    # (moments and step count restarted) the same 2 steps land far off, so the comparison sees a lost state.
    from omegaconf import OmegaConf

    from utils.speed import adamw

    def switched(first, then, load=True):
        model = small_dit()
        settings = lambda fused: OmegaConf.create(dict(lr=1e-3, betas=[0.9, 0.999], weight_decay=0.01, fused=fused))
        opt = adamw(model.parameters(), settings(first))
        x, t, y = inputs()
        for step in range(5):
            if step == 3:
                state, opt = opt.state_dict(), adamw(model.parameters(), settings(then))
                if load:
                    opt.load_state_dict(state)
            loss_and_grads(model, x, t, y)
            opt.step()
        assert opt.defaults["fused"] is (True if then else None) and int(opt.state_dict()["state"][0]["step"]) == (
            5 if load else 2)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    for first, then, target in ((True, False, plain), (False, True, fused)):
        resumed = switched(first, then)
        for name in target:
            torch.testing.assert_close(resumed[name], target[name], rtol=1e-5, atol=1e-5)
        restarted = switched(first, then, load=False)
        assert max((restarted[n] - target[n]).abs().max() for n in target) > 1e-4   # 10x the tolerance


def test_precision_auto_picks_bf16_only_where_it_is_fast(monkeypatch):
    import utils.speed as speed

    cpu = torch.device("cpu")
    assert speed.resolve_precision("fp32", cpu) == "fp32" and speed.resolve_precision("bf16", cpu) == "bf16"
    for flags in ({"amx_bf16"}, {"avx512_bf16"}, {"amx_bf16", "avx512_bf16"}):
        monkeypatch.setattr(speed, "cpu_bf16_flags", lambda flags=flags: frozenset(flags))
        assert speed.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(speed, "cpu_bf16_flags", lambda: frozenset())
    assert speed.resolve_precision("auto", cpu) == "fp32"
    with pytest.raises(ValueError, match="choose one of fp32, bf16, auto"):
        speed.resolve_precision("fp16", cpu)


def test_attention_auto_forces_the_math_kernel_only_for_eager_bf16_on_a_cpu():
    from torch.nn.attention import SDPBackend

    from utils.speed import attention_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_backend("auto", cpu, "bf16", compiled=False) == SDPBackend.MATH
    assert attention_backend("auto", cpu, "bf16", compiled=True) is None
    assert attention_backend("auto", cpu, "fp32", compiled=False) is None
    assert attention_backend("auto", cuda, "bf16", compiled=False) is None
    assert attention_backend("flash", cpu, "fp32", compiled=False) == SDPBackend.FLASH_ATTENTION
    with pytest.raises(ValueError, match="train.attention='fast'; choose one of auto, default, math"):
        attention_backend("fast", cpu, "fp32", compiled=False)


def test_the_math_attention_kernel_agrees_with_the_default_one_under_bf16():
    from utils.speed import forward_context

    from torch.nn.attention import SDPBackend
    model = small_dit()
    x, t, y = inputs()
    diffusion = create_diffusion("")
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for backend in (None, SDPBackend.MATH):
        with forward_context("bf16", torch.device("cpu"), backend)():
            loss = diffusion.training_losses(model, x, t, dict(y=y), noise=noise)["loss"].mean()
        model.zero_grad()
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert abs(loss_b - loss_a) <= 0.01 * loss_a            # both round to bf16 (2^-8), in another order
    assert (grad_b - grad_a).norm() <= 0.05 * grad_a.norm()


FAST = ["train.compile=true", "precision=bf16", "optim.fused=true"]


@pytest.mark.slow
def test_compiled_bf16_fused_training_tracks_eager_and_resumes_exactly(tmp_path):
    """The fastest CPU setting: its losses follow eager fp32 within bf16's rounding, and a run stopped and resumed
    under the same setting is bit-identical to an uninterrupted one."""
    import train as train_script
    from conftest import assert_same_state, compose_config, final_state, read_run_metrics

    train_script.train(compose_config(overrides=[*TRAIN, "train.steps=6", f"run_dir={tmp_path}/eager"]))
    train_script.train(compose_config(overrides=[*TRAIN, *FAST, "train.steps=6", f"run_dir={tmp_path}/fast"]))
    losses = lambda run: [r["loss"] for r in read_run_metrics(tmp_path / run) if "loss" in r]
    eager, fast = losses("eager"), losses("fast")
    assert len(eager) == len(fast) == 6
    assert all(abs(a - b) <= 0.03 * a for a, b in zip(eager, fast)), (eager, fast)
    # Stopped after 2 steps (a checkpoint), resumed to 6 with the same setting: the same bits as uninterrupted.
    train_script.train(compose_config(overrides=[*TRAIN, *FAST, "train.steps=2", f"run_dir={tmp_path}/resumed"]))
    train_script.train(compose_config(overrides=[*TRAIN, *FAST, "train.steps=6", f"run_dir={tmp_path}/resumed"]))
    assert_same_state(final_state(tmp_path / "fast"), final_state(tmp_path / "resumed"))


@pytest.mark.slow
def test_time_to_quality_benchmark_trains_both_sides_judges_and_plots(tmp_path):
    """A tiny budget of benchmarks/time_to_quality.py. The official checkout is stood in for by a folder whose
    models.py and diffusion/ re-export ours (bit-equal to facebookresearch/DiT: tests/test_parity.py), so the
    script's loading, training, sampling and judging of an official checkout all run without one."""
    import json

    from conftest import run_script

    official = tmp_path / "DiT"
    (official / "diffusion").mkdir(parents=True)
    (official / "models.py").write_text(  # the official DiT drops labels inside the model; ours in train.py
        "import torch\nfrom models.dit import DiT as Ours\n\n"
        "class DiT(Ours):\n"
        "    def __init__(self, class_dropout_prob=0.1, **kwargs):\n"
        "        super().__init__(**kwargs)\n"
        "        self.class_dropout_prob = class_dropout_prob\n\n"
        "    def forward(self, x, t, y):\n"
        "        if self.training:\n"
        "            y = torch.where(torch.rand(y.shape) < self.class_dropout_prob, self.num_classes, y)\n"
        "        return super().forward(x, t, y)\n")
    (official / "diffusion" / "__init__.py").write_text("from diffusion import create_diffusion\n")
    out = run_script(["benchmarks/time_to_quality.py", "--official", str(official), "--budgets", "2", "4",
                      "--num-samples", "20", "--ckpt-every", "5", "--out", str(tmp_path / "bench"),
                      "--ours", "default:", "ddpm:diffusion=ddpm,sample.steps=10,optim.cooldown_fraction=0"],
                     timeout=600).stdout
    results = json.loads((tmp_path / "bench" / "time_to_quality.json").read_text())
    assert list(results) == ["official", "default", "ddpm"]
    for name, rows in results.items():
        assert [r["budget_seconds"] for r in rows] == [2, 4]
        judged = [r for r in rows if r["step"] is not None]
        assert judged, f"{name}: no state within the budgets"
        assert all(r["train_seconds"] <= r["budget_seconds"] and 0 <= r["class_match"] <= 1 and r["fd_digits"] > 0
                   for r in judged)
    # The default decays its rate over the second half: each budget's state is a decay branched off the trunk.
    decayed = [r for r in results["default"] if r["step"] is not None]
    assert all(0 < r["decay_from"] <= r["step"] - round(0.5 * r["step"]) for r in decayed)
    assert all((tmp_path / "bench" / "default" / f"decay-{r['step']}").is_dir() for r in decayed)
    assert all(r.get("decay_from") is None for r in results["ddpm"])
    assert results["official"][0]["sampler"] == "ddpm-250" and results["ddpm"][-1]["sampler"] == "ddpm-10"
    assert "official code's 4-s quality" in out and "real held-out" in out
    assert (tmp_path / "bench" / "time_to_quality.png").stat().st_size > 0
    bad = run_script(["benchmarks/time_to_quality.py", "--official", str(tmp_path), "--ours"], check=False)
    assert bad.returncode != 0 and "no models.py there" in bad.stderr


@pytest.mark.slow
def test_time_to_quality_decay_branch_is_the_run_with_that_many_steps(tmp_path):
    """How benchmarks/time_to_quality.py measures a decayed recipe at a budget: the constant-rate part of a longer
    run, resumed at its checkpoint with train.steps=N, equals an N-step run bit for bit, and its training seconds
    are the trunk's up to the branch point plus its own."""
    import math
    import sys

    from conftest import ROOT, assert_same_state, final_state
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import time_to_quality as ttq
    from digits_quality import training_seconds

    overrides = ["precision=fp32", "device=cpu", "train.batch_size=16", "sample.steps=4", "sample.per_class=2",
                 "optim.warmup_steps=2", "optim.cooldown_fraction=0.5"]
    assert ttq.cooldown_fraction(overrides) == 0.5 and ttq.cooldown_fraction(["experiment=digits-quick"]) == 0
    ttq.train_ours(tmp_path / "trunk", overrides, math.inf, 2, steps=12)  # constant rate up to step 6
    ttq.train_ours(tmp_path / "direct", overrides, math.inf, 2, steps=8)  # decays over steps 5-8
    ckpt, seconds = ttq.branch(tmp_path / "trunk", overrides, 4, 8, tmp_path / "branch", 2)
    assert ckpt == tmp_path / "branch" / "checkpoints" / "0000008.pt" and ttq.checkpoint_steps(tmp_path / "branch") == [4, 8]
    assert_same_state(final_state(tmp_path / "branch"), final_state(tmp_path / "direct"))
    trunk, branched = training_seconds(tmp_path / "trunk"), training_seconds(tmp_path / "branch")
    assert sorted(branched) == [2, 4, 6, 8] and branched[4] == trunk[4] and seconds == branched[8] > trunk[4]
    assert ttq.branch(tmp_path / "trunk", overrides, 4, 8, tmp_path / "branch", 2) == (ckpt, seconds)  # reused


def test_digits_quick_is_the_default_with_only_its_documented_changes():
    """experiment=digits-quick (the README's smoke test) changes the default only in steps, checkpoints, EMA memory,
    sampling steps and a constant learning rate; model, objective, data, batch and precision stay the default's."""
    from omegaconf import OmegaConf

    from conftest import compose_config

    default = OmegaConf.to_container(compose_config(), resolve=False)
    quick = OmegaConf.to_container(compose_config(overrides=["experiment=digits-quick"]), resolve=False)

    def flat(d, prefix=""):
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    default, quick = dict(flat(default)), dict(flat(quick))
    changed = {k for k in default if quick.get(k) != default[k]}
    assert changed == {"train.steps", "train.ckpt_every", "ema.decay", "sample.steps", "optim.lr",
                       "optim.cooldown_fraction"}, changed
    assert quick["precision"] == "auto" and quick["train.steps"] < default["train.steps"]
    assert quick["optim.cooldown_fraction"] == 0 and quick["optim.lr"] < default["optim.lr"]
    assert quick["ema.decay"] < default["ema.decay"] and quick["sample.steps"] < default["sample.steps"]


@pytest.mark.slow   # subprocesses: over 10 s on 2 cores (the default suite stays near 5 minutes)
def test_throughput_benchmark_times_the_digits_step_as_train_py_runs_it():
    """benchmarks/throughput.py --data digits: train.py's precision=auto and the digits input. --profile's three
    parts add up to the profiler's own total of self times (computed apart from them), which covers most of the
    wall-clock time of the profiled steps but cannot exceed it, and each part holds what the top list says it holds."""
    import re

    from benchmarks.throughput import CAST_OPS, MATMUL_OPS
    from conftest import run_script
    from utils.speed import resolve_precision

    out = run_script(["benchmarks/throughput.py", "--data", "digits", "--model", "DiT-S/8", "--batch-size", "4",
                      "--objective", "flow", "--steps", "2", "--warmup", "1", "--profile"]).stdout
    precision = resolve_precision("auto", torch.device("cpu"))
    assert "the digits' 8x8x1 pixels" in out and f"ours (flow+{precision})" in out, out
    total, wall, *parts = map(float, re.search(
        r"per step: ([\d.]+) ms of ([\d.]+) ms wall time = matrix products ([\d.]+) \+ dtype casts ([\d.]+) \+ "
        r"everything else ([\d.]+) ms", out).groups())
    assert parts[0] > 0 and abs(sum(parts) - total) <= 0.15, out      # the parts neither overlap nor miss an event
    # One thread's self times never overlap, so they sum to at most the wall time (0.1 ms for rounding); Python
    # between operations is the only time outside them: on this tiny model a few percent (99% measured).
    assert 0.5 * wall <= total <= wall + 0.1, out
    top = re.findall(r"(aten::\w+) ([\d.]+) ms \((\d+) calls\)", out.split("largest self times per step: ")[1])
    times = {key: float(ms) for key, ms, _ in top}
    assert len(top) == 10 and "aten::mm" in times, out
    assert list(times.values()) == sorted(times.values(), reverse=True) and sum(times.values()) <= total + 0.1, out
    listed = lambda ops: sum(ms for key, ms in times.items() if key in ops)
    assert listed(MATMUL_OPS) <= parts[0] + 0.1 and listed(CAST_OPS) <= parts[1] + 0.1, out
    assert sum(ms for key, ms in times.items() if key not in MATMUL_OPS | CAST_OPS) <= parts[2] + 0.1, out
