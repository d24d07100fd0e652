"""The published recipes on the newer tokenizers (conf/experiment/*.yaml, docs/latents.md "Experiments"): each file
composes, holds its source's values (model, tokenizer, optimizer, EMA, batch, steps, sampler, time shift), its network
builds at the latent shape it trains on, and the train.py / sample.py commands in its header are valid overrides."""

import math
import re
import shlex

import numpy as np
import pytest
import torch

import utils.resolvers  # noqa: F401  (registers sweep_suffix, which run_dir uses)
from conftest import CONF, ROOT, compose_config
from diffusion import build_objective
from diffusion.transport import resolve_time_shift
from models import count_params, create_model
from models.dit import DIT_SIZES
from models.ditdh import DDT_HEAD
from utils.schedule import schedule

IMAGENET_TRAIN = 1_281_167          # ILSVRC-2012 train images
EXPERIMENTS = ("lightningdit-xl1-vavae-imagenet256", "sit-xl1-e2evae-repa-imagenet256", "rae-ditdh-xl-imagenet256")


def recipe(name, *overrides):
    return compose_config(overrides=[f"experiment={name}", "data.path=/nowhere", *overrides])


def epochs(cfg):
    return cfg.train.steps * cfg.train.batch_size / IMAGENET_TRAIN


def header_commands(name, script):
    """The `script` commands of an experiment file's header, each as its list of key=value overrides (continuation
    lines joined; commented-out commands and trailing comments dropped)."""
    lines, commands, current = open(f"{CONF}/experiment/{name}.yaml").read().splitlines(), [], None
    for line in lines:
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if current is None and text.startswith(("torchrun", "python")) and f" {script} " in f" {text} ":
            current = text
        elif current is not None:
            current += " " + text
        if current is not None and not current.endswith("\\"):
            commands.append(current)
            current = None
        elif current is not None:
            current = current[:-1]
    out = []
    for command in commands:
        tokens = shlex.split(command.split(" # ")[0])
        out.append([t for t in tokens[tokens.index(script) + 1:] if "=" in t and not t.startswith("--")])
    return out


def tiny_kwargs(name):
    """Constructor arguments that shrink a recipe's network to a CPU size (keyword arguments win over the size
    table); the options (norm, MLP, RoPE, ...) stay the recipe's."""
    if name.startswith("DiTDH"):
        return dict(depth=[1, 1], hidden_size=[64, 96], num_heads=[2, 2])
    return dict(depth=2, hidden_size=64, num_heads=2)


# ------------------------------------------------------------------------------------------------------------
# LightningDiT-XL/1 on VA-VAE latents (hustvl/LightningDiT configs/lightningdit_xl_vavae_f16d32.yaml)
# ------------------------------------------------------------------------------------------------------------

def test_lightningdit_on_va_vae_holds_the_released_config():
    cfg = recipe("lightningdit-xl1-vavae-imagenet256")
    assert cfg.model.name == "LightningDiT-XL/1" and dict(cfg.model.kwargs) == dict(
        norm="rmsnorm", mlp="swiglu", rope=True, qk_norm=False, wo_shift=False)
    assert (cfg.vae.name, cfg.vae.id, cfg.vae.downsample, cfg.vae.latent_channels, cfg.vae.normalize) == (
        "va-vae-f16d32", "hustvl/vavae-imagenet256-f16d32-dinov2", 16, 32, "channel")
    assert cfg.data.image_size == 256 and cfg.data.random_flip
    d = cfg.diffusion
    assert (d.objective, d.path_type, d.prediction, d.time_sampling, d.time_mean, d.time_std, d.cosine_loss,
            d.time_shift) == ("flow", "Linear", "velocity", "logit_normal", 0.0, 1.0, True, 1.0)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.class_dropout, cfg.train.ckpt_every) == (
        80000, 1024, 0.1, 20000)
    assert round(epochs(cfg)) == 64
    o = cfg.optim
    assert (o.lr, list(o.betas), o.weight_decay, o.warmup_steps, o.cooldown_fraction, o.grad_clip) == (
        2e-4, [0.9, 0.95], 0.0, 0, 0.0, None)
    assert cfg.ema.decay == 0.9999 and cfg.precision == "bf16"
    s = cfg.sample
    assert (s.sampler, s.ode.method, s.steps, s.time_shift, s.cfg_scale, s.cfg_channels, s.guidance_low) == (
        "ode", "euler", 250, 0.3, 10.0, 3, 0.11)


# ------------------------------------------------------------------------------------------------------------
# SiT-XL/1 + REPA on the frozen E2E-VAE (End2End-Diffusion/REPA-E README section 4, train_ldm_only.py)
# ------------------------------------------------------------------------------------------------------------

def test_repa_e_frozen_vae_recipe_holds_the_published_command():
    cfg = recipe("sit-xl1-e2evae-repa-imagenet256")
    # SiT-XL/1: the plain DiT block at patch 1.
    assert cfg.model.name == "LightningDiT-XL/1" and dict(cfg.model.kwargs) == dict(
        norm="layernorm", mlp="gelu", rope=False, qk_norm=False, wo_shift=False)
    assert (cfg.vae.name, cfg.vae.id, cfg.vae.downsample, cfg.vae.latent_channels, cfg.vae.normalize) == (
        "e2e-vae", "REPA-E/e2e-vavae-hf", 16, 32, "channel")
    assert cfg.data.image_size == 256 and not cfg.data.random_flip
    d = cfg.diffusion
    assert (d.objective, d.path_type, d.prediction, d.time_sampling, d.cosine_loss, d.time_shift) == (
        "flow", "Linear", "velocity", "uniform", False, 1.0)
    r = cfg.repa
    assert (r.encoder, r.depth, r.coeff, r.projector, r.projector_dim, r.spatial_norm) == (
        "dinov2-vit-b", 8, 0.5, "mlp", 2048, False)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.class_dropout, cfg.train.ckpt_every) == (
        4_000_000, 256, 0.1, 50000)
    assert round(epochs(cfg)) == 799   # "800 epochs": 4M x 256 / 1,281,167 = 799.3
    o = cfg.optim
    assert (o.lr, list(o.betas), o.weight_decay, o.warmup_steps, o.cooldown_fraction, o.grad_clip) == (
        1e-4, [0.9, 0.999], 0.0, 0, 0.0, 1.0)
    assert cfg.ema.decay == 0.9999
    s = cfg.sample   # the training previews: Euler, 50 steps, cfg 4.0
    assert (s.sampler, s.ode.method, s.steps, s.cfg_scale, s.time_shift) == ("ode", "euler", 51, 4.0, None)


# ------------------------------------------------------------------------------------------------------------
# RAE's DiT^DH-XL on DINOv2-B latents (bytetriper/RAE configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml)
# ------------------------------------------------------------------------------------------------------------

def test_rae_ditdh_recipe_holds_the_official_training_config():
    cfg = recipe("rae-ditdh-xl-imagenet256")
    assert cfg.model.name == "DiTDH-XL/1" and dict(cfg.model.kwargs) == dict(
        norm="rmsnorm", mlp="swiglu", rope=True, qk_norm=False, wo_shift=False, use_pos_embed=True)
    assert (cfg.vae.name, cfg.vae.downsample, cfg.vae.latent_channels, cfg.vae.normalize) == (
        "rae-dinov2-b", 16, 768, "element")
    assert cfg.data.image_size == 256 and cfg.data.random_flip
    d = cfg.diffusion
    assert (d.objective, d.path_type, d.prediction, d.time_sampling, d.time_mean, d.time_std, d.cosine_loss) == (
        "flow", "Linear", "velocity", "logit_normal", 0.0, 1.0, False)
    # time_dist_shift = sqrt(time_dist_shift_dim / time_dist_shift_base) = sqrt(196608 / 4096)
    assert d.time_shift == "auto" and resolve_time_shift(d.time_shift, (768, 16, 16)) == pytest.approx(math.sqrt(48))
    assert (cfg.train.batch_size, cfg.train.class_dropout, cfg.train.ckpt_every) == (1024, 0.1, 10 * 1251)
    assert cfg.train.steps == 800 * (IMAGENET_TRAIN // 1024)
    o = cfg.optim
    assert (o.lr, list(o.betas), o.weight_decay, o.grad_clip) == (2e-4, [0.9, 0.95], 0.0, 1.0)
    assert cfg.ema.decay == 0.9995 and cfg.precision == "fp32"
    s = cfg.sample
    assert (s.sampler, s.ode.method, s.steps, s.time_shift, s.cfg_scale) == ("ode", "euler", 50, None, 1.0)


def rae_linear_lr(step, per_epoch, base_lr=2e-4, final_lr=2e-5, warmup_epochs=40, decay_end_epoch=800):
    """bytetriper/RAE a4d18c4 src/utils/optim_utils.py build_scheduler, type linear, warmup_from_zero false: LambdaLR's
    factor of update `step` (scheduler.step() after each optimizer step), times the base rate; its formula restated."""
    warmup, end = int(warmup_epochs * per_epoch), int(decay_end_epoch * per_epoch)
    if step < warmup:
        return base_lr
    if step >= end:
        return base_lr * (final_lr / base_lr)
    return base_lr * (1.0 - (1.0 - final_lr / base_lr) * (step - warmup) / max(end - warmup, 1))


def test_rae_schedule_equals_raes_linear_scheduler_at_every_step():
    cfg = recipe("rae-ditdh-xl-imagenet256")
    per_epoch = IMAGENET_TRAIN // 1024
    # The released config: hold 2e-4 for 40 epochs, decay to 2e-5 at epoch 800, hold to epoch 1400.
    rate = schedule(cfg.optim, 1400 * per_epoch)
    steps = np.unique(np.r_[np.arange(0, 1400 * per_epoch, 997), [0, 40 * per_epoch - 1, 40 * per_epoch,
                                                                 800 * per_epoch - 1, 800 * per_epoch]])
    ours = np.array([rate(int(k)) for k in steps])
    theirs = np.array([rae_linear_lr(int(k), per_epoch) for k in steps])
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=0)
    assert rate(0) == rate(40 * per_epoch - 1) == 2e-4 and rate(1400 * per_epoch - 1) == pytest.approx(2e-5)
    # This file's train.steps ends at epoch 800, the end of the decay, on the same schedule.
    assert cfg.train.steps == 800 * per_epoch
    assert [schedule(cfg.optim, cfg.train.steps)(int(k)) for k in steps[steps < cfg.train.steps]] == [
        rate(int(k)) for k in steps[steps < cfg.train.steps]]


# ------------------------------------------------------------------------------------------------------------
# All three: the network at the recipe's latent shape, and the header's commands
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_network_builds_and_runs_at_the_recipes_latent_shape(name):
    cfg = recipe(name)
    side, channels = cfg.data.image_size // cfg.vae.downsample, cfg.vae.latent_channels
    assert (side, channels) in ((16, 32), (16, 768))
    learn_sigma = build_objective(cfg.diffusion).learn_sigma
    kwargs = dict(input_size=side, in_channels=channels, num_classes=1000, learn_sigma=learn_sigma,
                  **cfg.model.kwargs)
    torch.manual_seed(0)
    model = create_model(cfg.model.name, **kwargs, **tiny_kwargs(cfg.model.name))
    out = model(torch.randn(2, channels, side, side), torch.rand(2), torch.tensor([3, 1000]))
    assert out.shape == (2, channels, side, side) and torch.isfinite(out).all()
    # The full size, built without memory: its widths are the size table's, its parameter count the published one.
    with torch.device("meta"):
        full = create_model(cfg.model.name, **kwargs)
    assert len(full.blocks) == DIT_SIZES["XL"]["depth"] + (DDT_HEAD["depth"] if name.startswith("rae") else 0)
    assert full.blocks[0].attn.num_heads == DIT_SIZES["XL"]["num_heads"]
    assert full.x_embedder.proj.kernel_size == (1, 1)
    published = {"lightningdit": 675, "sit": 675, "rae": 839}[name.split("-")[0]]   # millions (RAE: 839M)
    assert count_params(full) / 1e6 == pytest.approx(published, abs=1.0)


def test_ditdh_head_and_guide_sizes_are_the_official_ones():
    assert DDT_HEAD == dict(depth=2, hidden_size=2048, num_heads=16)
    assert DIT_SIZES["XL"] == dict(depth=28, hidden_size=1152, num_heads=16)
    assert DIT_SIZES["S"] == dict(depth=12, hidden_size=384, num_heads=6)   # DiT^DH-S: RAE's autoguidance model
    with torch.device("meta"):
        guide = create_model("DiTDH-S/1", input_size=16, in_channels=768, num_classes=1000, learn_sigma=False)
    assert len(guide.blocks) == 12 + 2


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_headers_commands_are_valid_overrides(name):
    trains, samples = header_commands(name, "train.py"), header_commands(name, "sample.py")
    assert trains and samples, f"{name}: its header should give the train.py and sample.py commands"
    for overrides in trains:
        assert f"experiment={name}" in overrides
        cfg = compose_config(overrides=overrides)
        assert cfg.train.batch_size == recipe(name).train.batch_size
    for overrides in samples:
        compose_config("sample", overrides)


def test_the_fid_commands_use_the_published_sampler_settings():
    (lightning,) = header_commands("lightningdit-xl1-vavae-imagenet256", "sample.py")
    cfg = compose_config("sample", lightning)
    # configs/reproductions/lightningdit_xl_vavae_f16d32_64ep_cfg.yaml (FID 2.11)
    assert (cfg.num_samples, cfg.sampler, cfg.ode.method, cfg.steps, cfg.time_shift, cfg.cfg_scale, cfg.cfg_channels,
            cfg.guidance_low) == (50000, "ode", "euler", 250, 0.3, 10.0, 3, 0.10)

    (repa_e,) = header_commands("sit-xl1-e2evae-repa-imagenet256", "sample.py")
    cfg = compose_config("sample", repa_e)
    # --mode sde --num-steps 250 --cfg-scale 2.4 --guidance-low 0.0 --guidance-high 0.73 in REPA-E's time (t = 1
    # noise): t in [0.27, 1] here; every channel guided; class_labels null = 50 per class at 50K
    assert (cfg.num_samples, cfg.sampler, cfg.steps, cfg.cfg_scale, cfg.cfg_channels, cfg.class_labels) == (
        50000, "sde", 250, 2.4, None, None)
    assert cfg.guidance_low == pytest.approx(1 - 0.73) and cfg.guidance_high is None

    (rae,) = header_commands("rae-ditdh-xl-imagenet256", "sample.py")
    cfg = compose_config("sample", rae)
    # DiTDHXL-DINOv2-B_AG.yaml: Euler, num_steps 50, autoguidance scale 1.42 on t in [0, 1]; the grid's shift is the
    # checkpoint's (time_shift null)
    assert (cfg.num_samples, cfg.sampler, cfg.ode.method, cfg.steps, cfg.guidance, cfg.cfg_scale, cfg.time_shift,
            cfg.guidance_low, cfg.guidance_high) == (50000, "ode", "euler", 50, "auto", 1.42, None, None, None)
    assert cfg.guide_ckpt
    # the guide: DiT^DH-S, the first 14 epochs of the same schedule, the constant 2e-4 of its first 40
    (main, guide) = header_commands("rae-ditdh-xl-imagenet256", "train.py")
    cfg = compose_config(overrides=guide)
    assert cfg.model.name == "DiTDH-S/1" and cfg.train.steps == 14 * (IMAGENET_TRAIN // 1024)
    assert {schedule(cfg.optim, cfg.train.steps)(k) for k in range(0, cfg.train.steps, 97)} == {2e-4}
    assert cfg.ema.decay == 0.9995


def test_the_old_sd_vae_stand_in_is_gone_and_docs_name_the_new_files():
    assert not (ROOT / "conf" / "experiment" / "lightningdit-xl1-imagenet256.yaml").exists()
    docs = (ROOT / "docs" / "latents.md").read_text()
    for name in EXPERIMENTS:
        assert re.search(rf"`{re.escape(name)}`", docs), f"docs/latents.md's Experiments table lacks {name}"
