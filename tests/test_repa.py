"""REPA: the alignment loss, where its gradient goes, the projector, encoders, and training with it."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import train as train_script
from conftest import (
    TINY,
    assert_same_state,
    compose_config,
    final_state,
    load_reference_script,
    read_run_metrics,
    tiny_digits_dit,
)
from diffusion.repa import REPA, alignment_loss, projector, resample_tokens
from models import create_model
from utils.errors import ConfigError, MissingFile

REPA_RUN = [*TINY, "repa.encoder=digits", "repa.depth=2", "repa.projector_dim=64"]


def test_alignment_loss_is_minus_the_mean_cosine_over_tokens():
    g = torch.Generator().manual_seed(0)
    h, z = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    expected = torch.stack([-torch.stack([F.cosine_similarity(h[n, i].double(), z[n, i].double(), dim=0)
                                          for i in range(5)]).mean() for n in range(3)])
    torch.testing.assert_close(alignment_loss(h, z).double(), expected)
    assert torch.allclose(alignment_loss(z * 3, z), torch.full((3,), -1.0))      # aligned: -1, whatever the scale
    assert torch.allclose(alignment_loss(-z, z), torch.full((3,), 1.0))


def test_projector_and_alignment_loss_equal_the_official_repa():
    """Against tests/data/repa_reference.pt (tests/reference/make_repa_reference.py, from sihyun-yu/REPA's loss.py
    and models/sit.py; with REPA_OFFICIAL_PATH set, the official code is run live too)."""
    import os
    from pathlib import Path
    ref = load_reference_script("make_repa_reference")
    stored = torch.load(Path(__file__).parent / "data" / "repa_reference.pt", weights_only=True)
    if os.environ.get("REPA_OFFICIAL_PATH"):
        stored = ref.make_reference(*ref.load_official(os.environ["REPA_OFFICIAL_PATH"]))
    ours = projector(ref.HIDDEN, ref.PROJECTOR, ref.Z_DIM, seed=ref.SEED)
    with torch.no_grad():
        projected = ours(stored["h"])
    torch.testing.assert_close(projected, stored["projected"], rtol=1e-5, atol=1e-6)
    loss = alignment_loss(projected, stored["z"]).mean()            # train.py's mean over the batch
    torch.testing.assert_close(loss, stored["proj_loss"].float(), rtol=1e-5, atol=1e-6)


def test_projector_is_repas_mlp():
    mlp = projector(64, 2048, 768)
    linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(2048, 64), (2048, 2048), (768, 2048)]
    assert all(isinstance(mlp[i], torch.nn.SiLU) for i in (1, 3)) and len(mlp) == 5
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in linears)


def small_model():
    torch.manual_seed(0)
    return tiny_digits_dit(depth=3, learn_sigma=False)


def test_the_gradient_reaches_the_network_up_to_the_block_and_the_projector_never_the_encoder():
    model = small_model()
    with torch.no_grad():  # make every block's output depend on its weights (adaLN-Zero starts as the identity)
        for block in model.blocks:
            block.adaLN_modulation[-1].weight.normal_(0, 0.1)
    repa = REPA(model, "digits", depth=2, projector_dim=16)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    z = repa.encode(x)
    assert z.shape == (4, 16, 128) and not z.requires_grad
    model(x, torch.rand(4), torch.tensor([0, 1, 2, 10]))
    out = repa.add_loss({"loss": torch.zeros(4)}, z)          # the alignment term alone
    out["loss"].mean().backward()
    assert torch.equal(out["loss"], 0.5 * out["repa_loss"]) and torch.equal(out["objective_loss"], torch.zeros(4))
    grad = lambda module: [p.grad for p in module.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grad(model.blocks[1].attn))
    assert all(g is None for g in grad(model.blocks[2]))        # after the aligned block: untouched
    assert all(g is None for g in grad(model.final_layer))
    assert all(g is not None for g in grad(repa.projector))
    assert all(not p.requires_grad and p.grad is None for p in repa.encoder.net.parameters())


def test_repa_refuses_what_it_cannot_align():
    with pytest.raises(ConfigError, match="choose 1..3"):
        REPA(small_model(), "digits", depth=4)
    unet = create_model("UNet-T8", input_size=8, in_channels=1, num_classes=10, learn_sigma=False)
    with pytest.raises(ConfigError, match="has no blocks"):
        REPA(unet, "digits", depth=1)
    in_context = tiny_digits_dit(depth=2, learn_sigma=False, block_type="in-context")
    with pytest.raises(ConfigError, match="in-context"):
        REPA(in_context, "digits", depth=1)
    with pytest.raises(ConfigError, match="unknown repa.encoder"):
        REPA(small_model(), "clip", depth=1)


def test_a_missing_dinov2_file_names_the_file_the_source_and_the_setting(tmp_path):
    with pytest.raises(MissingFile) as error:
        REPA(small_model(), "dinov2-vit-b", depth=1, weights=str(tmp_path / "nope.safetensors"))
    message = str(error.value)
    assert "vit_base_patch14_dinov2.lvd142m" in message and "huggingface-cli download" in message
    assert "repa.weights=PATH" in message and "nope.safetensors" in message


def test_token_grids_are_resampled_to_the_network_and_a_warning_says_so():
    z = torch.randn(2, 64, 5)                          # an 8x8 grid
    out = resample_tokens(z, (4, 4))
    maps = z.transpose(1, 2).reshape(2, 5, 8, 8)
    torch.testing.assert_close(out, F.avg_pool2d(maps, 2).flatten(2).transpose(1, 2))
    assert resample_tokens(z, (8, 8)) is z
    assert resample_tokens(torch.randn(2, 4, 5), (4, 4)).shape == (2, 16, 5)   # 2x2 -> 4x4, bilinear
    model = tiny_digits_dit(patch_size=1, depth=2, learn_sigma=False)     # an 8x8 token grid, the digits encoder's is 4x4
    repa = REPA(model, "digits", depth=1, projector_dim=16)
    with pytest.warns(UserWarning, match="4x4 token grid and the network 8x8"):
        assert repa.encode(torch.zeros(2, 1, 8, 8)).shape == (2, 64, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # once only
        repa.encode(torch.zeros(2, 1, 8, 8))


def test_training_with_repa_logs_its_loss_saves_the_projector_and_resumes_exactly(tmp_path):
    train_script.train(compose_config(overrides=[*REPA_RUN, f"run_dir={tmp_path}/whole"]))
    train_script.train(compose_config(overrides=[*REPA_RUN, "train.steps=2", f"run_dir={tmp_path}/split"]))
    train_script.train(compose_config(overrides=[*REPA_RUN, f"run_dir={tmp_path}/split"]))
    whole, split = final_state(tmp_path / "whole"), final_state(tmp_path / "split")
    assert_same_state(whole, split)
    for name, value in whole["repa"]["projector"].items():
        assert torch.equal(value, split["repa"]["projector"][name]), name
    rows = [r for r in read_run_metrics(tmp_path / "whole") if "loss" in r]
    assert all(-1 <= r["repa_loss"] <= 1 and r["loss"] == pytest.approx(r["objective_loss"] + 0.5 * r["repa_loss"])
               for r in rows)


def test_resuming_with_another_repa_setting_is_refused(tmp_path):
    train_script.train(compose_config(overrides=[*REPA_RUN, "train.steps=2", f"run_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="repa="):
        train_script.train(compose_config(overrides=[*TINY, f"run_dir={tmp_path}"]))




@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.distributed
def test_repa_over_two_gloo_processes_matches_one_process(parallel, tmp_path):
    from conftest import run_script

    port = {"ddp": 29593, "fsdp": 29594}[parallel]
    run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "train.py", *REPA_RUN,
                "train.grad_accum=2", f"train.parallel={parallel}", f"run_dir={tmp_path}/two"],
               env={"OMP_NUM_THREADS": "1"})
    train_script.train(compose_config(overrides=[*REPA_RUN, f"run_dir={tmp_path}/one"]))
    two, one = final_state(tmp_path / "two"), final_state(tmp_path / "one")
    for key in ("model", "ema"):
        for name in one[key]:
            torch.testing.assert_close(two[key][name], one[key][name], rtol=1e-5, atol=1e-6)
    for name, value in one["repa"]["projector"].items():
        torch.testing.assert_close(two["repa"]["projector"][name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_blocks_keep_the_hook_and_match_eager(tmp_path):
    train_script.train(compose_config(overrides=[*REPA_RUN, "train.compile=true", f"run_dir={tmp_path}/compiled"]))
    train_script.train(compose_config(overrides=[*REPA_RUN, f"run_dir={tmp_path}/eager"]))
    compiled, eager = final_state(tmp_path / "compiled"), final_state(tmp_path / "eager")
    for name, value in eager["model"].items():
        torch.testing.assert_close(compiled["model"][name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra", [["diffusion=ddpm"], pytest.param(["precision=bf16"], marks=pytest.mark.slow)])
def test_repa_trains_with_ddpm_and_in_bf16_and_sample_py_needs_no_projector(extra, tmp_path):
    import numpy as np

    import sample as sample_script
    train_script.train(compose_config(overrides=[*REPA_RUN, *extra, "train.steps=2", f"run_dir={tmp_path}/run"]))
    rows = read_run_metrics(tmp_path / "run")
    assert all(np.isfinite(r["repa_loss"]) and np.isfinite(r["objective_loss"]) for r in rows if "loss" in r)
    out = sample_script.run(compose_config("sample", [f"ckpt={tmp_path / 'run'}", "num_samples=2", "steps=2",
                                                      f"out={tmp_path}/s", "device=cpu"]))
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 2
