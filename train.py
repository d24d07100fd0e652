"""Train a DiT (or any model in models.MODELS) as a Gaussian diffusion (Peebles & Xie 2023) or as a flow (SiT).

    python train.py                                   # the digits default, CPU, minutes
    python train.py diffusion=flow                    # the same network trained by flow matching
    torchrun --nproc_per_node=8 train.py experiment=imagenet256 data.path=/data/imagenet/train
    python train.py -m model=DiT-S-2,DiT-B-2          # a sweep, one run_dir per run

Re-running the same command resumes from the newest checkpoint in run_dir and continues exactly: the data
order and every random draw (timesteps, noise, label dropout, flips, VAE posterior samples) are functions of
(seed, step). The loop does not know which objective it trains: diffusion/objectives.py draws the step's times and
noise and computes the loss for either.

Latent diffusion: with vae=sd-vae-ft-ema the images are encoded on the fly (fp32, no gradients); with
data=latents the batches come from a latent cache made once by extract_latents.py (both flips' posteriors).
"""

import copy
import json
import math
import os
import signal
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data import LatentCacheDataset, StepSampler, build_dataset, check_cache
from diffusion import build_objective
from diffusion.repa import REPA
from diffusion.sampling import sample
from models import build_vae, create_model, model_stats
from utils.checkpoint import list_checkpoints, load_model_weights, load_newest, save_checkpoint
from utils.distributed import barrier, cleanup_distributed, setup_distributed
from utils.errors import ConfigError, Diverged, report_user_errors
from utils.guard import StepBoundary
from utils.phema import PowerEMA, write_snapshots
from utils.images import save_grid, to_uint8
from utils.logger import RunLogger, truncate_metrics
from utils.parallel import checkpoint_activations, compile_blocks, full_state_dict, shard_model
from utils.speed import adamw, attention_backend, forward_context, resolve_precision

# run_dir suffix for sweeps over settings other than model/data: "runs/digits/DiT-S-2_optim.lr=0.0003".
OmegaConf.register_new_resolver("sweep_suffix", lambda s: "_" + s.replace("/", "-") if s else "", replace=True)


#################################################################################
#                                   Helpers                                     #
#################################################################################

def step_generator(seed, step, device):
    """The RNG for one training step: every draw of the step comes from here, so a resume replays it."""
    state = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint64)
    return torch.Generator(device=device).manual_seed(int(state[0] >> np.uint64(1)))


def learning_rate(step, base_lr, warmup_steps, cooldown_steps=0, total_steps=0):
    """The rate of update step+1: a linear warm-up to base_lr over warmup_steps, constant (the paper: 1e-4
    throughout), and with cooldown_steps > 0 a linear decay over the last cooldown_steps of total_steps, down to
    base_lr / cooldown_steps at the last update (warm-up, stable, decay: Hägele et al. 2024, 2405.18392)."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    cool = min(1.0, (total_steps - step) / cooldown_steps) if cooldown_steps > 0 else 1.0
    return base_lr * min(warm, cool)


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, over parameters (buffers are fixed)."""
    ema_params = [p for p in ema.parameters()]
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)


def input_shape(dataset, vae):
    """(C, H, W) of the network's input: the dataset's items, or the latents of its images when a VAE encodes them."""
    if vae is None or isinstance(dataset, LatentCacheDataset):
        return dataset.channels, dataset.image_size, dataset.image_size
    if dataset.channels != vae.image_channels:
        raise ConfigError(f"the VAE {vae.identifier} encodes {vae.image_channels}-channel images but the data have "
                         f"{dataset.channels} channel(s); use vae=none for this data")
    if dataset.image_size % vae.downsample:
        raise ConfigError(f"data.image_size={dataset.image_size} is not divisible by the VAE's downsampling factor "
                         f"{vae.downsample}; choose a multiple of {vae.downsample}")
    size = dataset.image_size // vae.downsample
    return vae.latent_channels, size, size


def latent_channel_stats(cfg, dataset, vae, cached, device):
    """(mean, std) per latent channel: the latent cache's (written by extract_latents.py), or measured exactly from
    the posterior moments of cfg.vae.stats_images images spread over the dataset, each also mirrored."""
    if vae is None:
        raise ConfigError("vae.normalize=true normalises VAE latents; in pixel space (vae=none) leave it false")
    if cached:
        if "channel_mean" not in dataset.manifest:
            raise ConfigError(f"the latent cache {cfg.data.path} has no channel statistics (it was made before "
                             f"extract_latents.py recorded them); re-run the extract_latents.py command that made it "
                             f"(it adds them without encoding again), or set vae.normalize=false")
        return dataset.manifest["channel_mean"], dataset.manifest["channel_std"]
    from models.vae import channel_stats, moment_sums
    count = min(cfg.vae.stats_images, len(dataset))
    if count < 1:
        raise ConfigError("vae.normalize=true measures the latents on vae.stats_images images; set it to 1 or more")
    indices = np.linspace(0, len(dataset) - 1, count).round().astype(int)
    sums = []
    for chunk in np.array_split(indices, math.ceil(count / 32)):
        x = torch.stack([dataset[int(i)][0] for i in chunk]).to(device)
        sums.append(moment_sums(vae.encode_moments(torch.cat([x, x.flip(-1)]))))
    return channel_stats(sums, vae.scaling_factor)


def model_args(cfg, dataset, objective, vae=None):
    """Everything needed to rebuild the network, and the VAE that decodes its latents (None in pixel space);
    stored in every checkpoint for sample.py."""
    channels, size, _ = input_shape(dataset, vae)
    vae_args = None if vae is None else dict(id=vae.identifier, path=cfg.vae.path, subfolder=cfg.vae.subfolder,
                                             scaling_factor=vae.scaling_factor)
    if vae is not None and vae.channel_mean is not None:   # latent normalisation: sample.py undoes it to decode
        vae_args.update(channel_mean=vae.channel_mean.flatten().tolist(), channel_std=vae.channel_std.flatten().tolist())
    return dict(name=cfg.model.name, input_size=size, in_channels=channels,
                num_classes=dataset.num_classes, learn_sigma=objective.learn_sigma,
                **OmegaConf.to_container(cfg.model.kwargs, resolve=True), vae=vae_args)


def build_model(args):
    kwargs = dict(args)
    kwargs.pop("vae", None)
    return create_model(kwargs.pop("name"), **kwargs)


def apply_flips(x, flip, cached):
    """This step's horizontal flips: mirror images, or pick each latent-cache item's (b, 2, 2C, h, w) posterior
    of the image as is (index 0) or mirrored (index 1)."""
    if cached:
        return torch.where(flip[:, None, None, None], x[:, 1], x[:, 0])
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def decode(vae, z):
    """Samples -> images in [-1, 1]: decoded latents, or the samples themselves in pixel space."""
    z = z.float()  # sampled under bf16 autocast the network's outputs may be bf16; images and the VAE are fp32
    return z if vae is None else vae.decode(z)


def batch_source(dataset, sampler, cfg, device):
    """A function step -> (x, y, REPA features stored in a latent cache or None) for this rank. In-memory datasets
    are indexed directly; others stream through a DataLoader driven by the same step-indexed sampler."""
    if hasattr(dataset, "images"):
        images, labels = dataset.images.to(device), dataset.labels.to(device)

        def indexed_batch(step):
            index = sampler.indices(step).to(device)
            return images[index], labels[index], None
        return indexed_batch
    workers = cfg.data.num_workers
    loader = DataLoader(dataset, batch_size=sampler.b, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=True)
    iterator = iter(loader)

    def next_batch(step):
        x, y, *stored = next(iterator)
        stored = stored[0].to(device, non_blocking=True) if stored else None
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True), stored
    return next_batch


@torch.no_grad()
def sampler_options(cfg):
    """The sampler settings of cfg.sample as keyword arguments of diffusion.sampling.sample."""
    options = OmegaConf.to_container(cfg.sample, resolve=True)
    options.pop("per_class")
    return options


def write_grid(ema, cfg, dataset, shape, vae, diffusion_kwargs, path, device, context):
    """EMA samples, one row per class (up to 10 classes), from a fixed seed so grids are comparable; the network
    runs in context() (the training precision), the VAE in fp32."""
    rows = min(dataset.num_classes, 10) if dataset.num_classes > 0 else 1
    labels = torch.arange(rows, device=device).repeat_interleave(cfg.sample.per_class)
    if dataset.num_classes == 0:
        labels = torch.zeros_like(labels)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    noise = torch.randn(len(labels), *shape, generator=generator, device=device)
    with context():
        x0 = sample(ema, noise, labels, null_class=dataset.num_classes, **sampler_options(cfg),
                    clip_denoised=vae is None, diffusion_kwargs=diffusion_kwargs)  # latents are not in [-1, 1]
    save_grid(to_uint8(decode(vae, x0)).cpu(), path, nrow=cfg.sample.per_class)


def fid_scorer(cfg, dataset, device):
    """(scorer, score at the end?, the real-data floor or None) for cfg.fid; (None, False, None) when off.

    features=auto measures the digits with their own network (no download) and anything else with Inception;
    digits features without a reference use the digits' train split (evaluation.digits_reference)."""
    features = cfg.fid.features
    if features == "auto":
        features = "digits" if cfg.data.name == "digits" else "inception"
    at_end = cfg.fid.at_end
    if at_end == "auto":
        at_end = features == "digits" and cfg.fid.reference is None
    if not (cfg.fid.every or at_end):
        return None, False, None
    if features == "digits" and cfg.data.name != "digits":
        raise ConfigError(f"fid.features=digits measures 8x8 digits; data={cfg.data.name} needs fid.features=inception "
                         f"(or dinov2)")
    from evaluation import FIDScorer, digits_floor, digits_reference  # loads the network; missing weights stop here
    reference, floor = cfg.fid.reference, None
    if reference is None:
        if features != "digits":
            raise ConfigError(f"fid.every / fid.at_end with fid.features={features} needs fid.reference=<npz of "
                             f"mu/sigma>; make one with `python -m evaluation ref ... --features {features}`")
        reference = digits_reference()
    if features == "digits":
        floor = digits_floor(reference)
    scorer = FIDScorer(reference, features=features, weights=cfg.fid.weights or cfg.fid.inception_weights,
                       device=device)
    return scorer, bool(at_end), floor


@torch.no_grad()
def ema_fid(ema, scorer, cfg, dataset, shape, vae, diffusion_kwargs, dist, device, context):
    """FID of cfg.fid.num_samples EMA samples (classes in turn), each rank drawing a contiguous share; with the
    digits network also the class accuracy (scorer.last). The network samples in context() (the training
    precision); the VAE and the feature network run in fp32."""
    share = np.array_split(np.arange(cfg.fid.num_samples), dist.world_size)[dist.rank]
    chunks = np.array_split(share, max(1, math.ceil(len(share) / cfg.fid.batch_size)))

    def batches():
        for chunk in chunks:
            generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + int(chunk[0]))
            labels = torch.as_tensor(chunk % max(dataset.num_classes, 1), device=device)
            noise = torch.randn(len(chunk), *shape, generator=generator, device=device)
            with context():
                x0 = sample(ema, noise, labels, null_class=dataset.num_classes, **sampler_options(cfg),
                            clip_denoised=vae is None, diffusion_kwargs=diffusion_kwargs)
            yield to_uint8(decode(vae, x0))
    labels = share % max(dataset.num_classes, 1)
    return scorer.score(batches(), all_reduce=dist.world_size > 1, labels=labels)


def parallelize(model, ema, cfg, dist, device):
    """Apply activation checkpointing, compiled blocks and DDP or FSDP2; returns the module the loop calls."""
    if cfg.train.grad_checkpoint:
        checkpoint_activations(model)
    if cfg.train.compile:
        compile_blocks(model)
    if cfg.train.parallel == "fsdp":
        if not torch.distributed.is_initialized():
            raise ConfigError("train.parallel=fsdp shards the model over processes: launch with torchrun "
                             "(torchrun --nproc_per_node=N train.py ...), or use train.parallel=ddp")
        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32  # fp32 gradient reductions always
        shard_model(model, param_dtype=dtype)
        shard_model(ema, param_dtype=dtype)
        return model
    if cfg.train.parallel != "ddp":
        raise ConfigError(f"train.parallel={cfg.train.parallel!r}; choose ddp or fsdp")
    if dist.world_size > 1:
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def training_state(model, ema, opt, fsdp):
    """(model, ema, optimizer) state dicts to save: plain and unsharded (gathered to rank 0 under FSDP)."""
    if not fsdp:
        return model.state_dict(), ema.state_dict(), opt.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return full_state_dict(model), full_state_dict(ema), get_optimizer_state_dict(model, opt, options=options)


def load_optimizer_state(model, opt, state, fsdp):
    if fsdp:
        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def sampling_model(ema, args, fsdp, device, all_ranks):
    """The EMA network as one plain module; under FSDP its shards are gathered (a collective on every rank)
    into a fresh copy on rank 0, or on every rank when all of them sample."""
    if not fsdp:
        return ema
    state = full_state_dict(ema, all_ranks=all_ranks)
    if not state:  # ranks other than 0 when only rank 0 samples
        return None
    network = build_model(args).to(device)
    network.load_state_dict(state)
    return network.eval().requires_grad_(False)


@contextmanager
def gradient_sync(modules, enabled):
    """Gradient accumulation under DDP or FSDP2: reduce the gradients across processes only when `enabled`."""
    with ExitStack() as stack:
        for model in modules if not enabled else ():
            if isinstance(model, DDP):
                stack.enter_context(model.no_sync())
            elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
                model.set_requires_gradient_sync(False)
                stack.callback(model.set_requires_gradient_sync, True)
        yield                                                   # one process: nothing to reduce


def clip_gradients(groups, max_norm):
    """Clip the gradients of one or more parameter lists (the network; REPA's projector) by their joint norm, as
    one list would be, and return that norm. The lists may be sharded differently (FSDP DTensors beside plain
    tensors), so with several the norms are combined as plain tensors."""
    full = lambda norm: norm.full_tensor() if hasattr(norm, "full_tensor") else norm   # a DTensor under FSDP
    if len(groups) == 1:
        return full(torch.nn.utils.clip_grad_norm_(groups[0], max_norm))
    norms = [full(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])) for params in groups]
    total = torch.linalg.vector_norm(torch.stack(norms))
    if math.isfinite(max_norm):
        scale = min(1.0, max_norm / (float(total) + 1e-6))   # as clip_grad_norm_ scales (one host copy)
        for params in groups:
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], scale)
    return total


def build_phema(cfg, model, state):
    """The post-hoc EMA tracker (utils/phema.py), or None when ema.posthoc is off."""
    if not cfg.ema.posthoc:
        return None
    if cfg.train.parallel == "fsdp":
        raise ConfigError("ema.posthoc=true is not supported with train.parallel=fsdp yet; use train.parallel=ddp")
    if cfg.ema.snapshot_every % cfg.train.batch_size:
        raise ConfigError(f"ema.snapshot_every={cfg.ema.snapshot_every} images must be a multiple of "
                         f"train.batch_size={cfg.train.batch_size} (snapshots are taken at step boundaries)")
    tracker = PowerEMA(model, cfg.ema.stds)
    if state is not None:
        tracker.load_state_dict(state)
    return tracker


def build_repa(cfg, model, dataset, device):
    """REPA's alignment term (diffusion/repa.py), or None when repa.encoder is null."""
    if not cfg.repa.encoder:
        return None
    stored = None
    if isinstance(dataset, LatentCacheDataset):  # no images to encode: the cache must hold the encoder's features
        stored = dataset.repa
        if not stored or stored["encoder"] != cfg.repa.encoder:
            raise ConfigError(f"repa.encoder={cfg.repa.encoder} with data=latents needs the encoder's features in the "
                             f"latent cache {cfg.data.path}, which holds "
                             f"{'those of ' + stored['encoder'] if stored else 'none'}; make a cache with them "
                             f"(python extract_latents.py ... repa.encoder={cfg.repa.encoder} repa.weights=PATH) or "
                             f"train from images (data=imagefolder with vae=...)")
        dataset.with_repa_features = True
    return REPA(model, cfg.repa.encoder, depth=cfg.repa.depth, coeff=cfg.repa.coeff,
                projector_dim=cfg.repa.projector_dim, weights=cfg.repa.weights,
                image_size=dataset.resolution if stored else cfg.data.image_size, device=device,
                stored_width=stored and stored["width"], seed=cfg.seed)


def check_resume_config(saved, cfg, path):
    """Refuse to resume a run with another model or diffusion (a changed train.steps is fine)."""
    current = OmegaConf.to_container(cfg, resolve=True)
    saved = {**saved, "diffusion": {"objective": "ddpm", **saved.get("diffusion", {})},  # runs from before flows
             "repa": saved.get("repa", {"encoder": None})}                                # and before REPA
    current["repa"] = current["repa"] if current["repa"]["encoder"] else {"encoder": None}
    saved["repa"] = saved["repa"] if saved["repa"].get("encoder") else {"encoder": None}
    for key in ("model", "diffusion", "repa"):
        if saved.get(key) != current.get(key):
            raise ConfigError(f"{path} was trained with {key}={saved.get(key)} but the config now says "
                             f"{key}={current.get(key)}; restore those settings to resume, or set a new run_dir")
    vae_identity = lambda c: {**{k: (c.get("vae") or {}).get(k) for k in ("name", "id", "scaling_factor")},
                              "normalize": bool((c.get("vae") or {}).get("normalize"))}
    if "vae" in saved and vae_identity(saved) != vae_identity(current):  # vae.path may change, the VAE may not
        raise ConfigError(f"{path} was trained with vae={vae_identity(saved)} but the config now says "
                         f"vae={vae_identity(current)}; restore those settings to resume, or set a new run_dir")


#################################################################################
#                                 Training                                      #
#################################################################################

def train(cfg):
    if cfg.dry_run:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = setup_distributed(cfg.device, tf32=cfg.tf32)
    device = dist.device
    cfg.precision = resolve_precision(cfg.precision, device)  # auto: bf16 where it is fast (utils/speed.py)
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if dist.is_main:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    # Data (and the VAE of latent diffusion), model, EMA, optimizer, diffusion.
    dataset = build_dataset(**cfg.data)
    cached = isinstance(dataset, LatentCacheDataset)   # items are posteriors of both flips, not images
    vae = build_vae(**cfg.vae)
    if vae is not None:
        vae.to(device)
    if cached:  # refuse a cache made with another VAE, scaling factor or resolution
        check_cache(dataset.manifest, vae=vae and vae.identifier, scaling_factor=vae and vae.scaling_factor,
                    image_size=cfg.data.image_size, source=f"the latent cache {cfg.data.path}")
    if cfg.vae.normalize:  # channel-wise latent normalisation (LightningDiT), undone before decoding
        vae.set_channel_stats(*latent_channel_stats(cfg, dataset, vae, cached, device))
    diffusion_kwargs = OmegaConf.to_container(cfg.diffusion, resolve=True)
    objective = build_objective(diffusion_kwargs)     # DDPM or flow: draws t and noise, computes the loss
    args = model_args(cfg, dataset, objective, vae)
    shape = input_shape(dataset, vae)                  # (C, H, W) the network sees: latents or pixels
    torch.manual_seed(cfg.seed)  # the initial weights; every later draw comes from step_generator
    model = build_model(args).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    stats = model_stats(lambda: build_model(args), shape)

    # Resume from the newest complete checkpoint, if any (weights load before any wrapping or sharding).
    step, opt_state, skipped, repa_state, phema_state = 0, None, 0, None, None
    # The newest checkpoint that loads; one cut short or damaged is skipped with a warning and set aside.
    ckpt_path, ckpt = load_newest(ckpt_dir, map_location=device, set_aside=dist.is_main)
    if ckpt_path is not None:
        check_resume_config(ckpt["config"], cfg, ckpt_path)
        load_model_weights(model, ckpt["model"], ckpt_path)
        load_model_weights(ema, ckpt["ema"], ckpt_path)
        step, opt_state, skipped = ckpt["step"], ckpt["opt"], ckpt.get("skipped_steps", 0)
        repa_state, phema_state = ckpt.get("repa"), ckpt.get("phema")
        del ckpt
    if dist.is_main:
        truncate_metrics(run_dir / "metrics.jsonl", step)

    raw_model = model
    phema = build_phema(cfg, raw_model, phema_state)   # post-hoc EMA (EDM2): tracked EMAs, snapshots
    repa = build_repa(cfg, raw_model, dataset, device)   # REPA: a hook on one block, a projector with its own optimizer
    model = parallelize(model, ema, cfg, dist, device)
    fsdp = cfg.train.parallel == "fsdp"
    make_opt = lambda params: adamw(params, cfg.optim)
    opt = make_opt(raw_model.parameters())
    if opt_state is not None:
        load_optimizer_state(raw_model, opt, opt_state, fsdp)
    optimizers, param_groups, synced = [opt], [list(raw_model.parameters())], [model]
    if repa is not None:  # the projector trains beside the network: its optimizer, gradients and DDP wrapper
        repa.start(make_opt, dist.world_size, device, state=repa_state)
        optimizers.append(repa.opt), param_groups.append(repa.parameters()), synced.append(repa.module)

    global_batch = cfg.train.batch_size
    sampler = StepSampler(len(dataset), global_batch, dist.rank, dist.world_size, cfg.seed, start_step=step)
    next_batch = batch_source(dataset, sampler, cfg, device)
    b, lo = sampler.b, dist.rank * sampler.b   # this rank's slice of the global batch's random draws
    fraction = cfg.optim.get("cooldown_fraction", 0.0)
    if not 0 <= fraction <= 1:
        raise ConfigError(f"optim.cooldown_fraction={fraction} must be between 0 (a constant rate) and 1 (a decay "
                         f"over all of train.steps)")
    cooldown = round(fraction * cfg.train.steps)
    accum = cfg.train.grad_accum
    if accum < 1 or b % accum:
        raise ConfigError(f"train.grad_accum={accum} must be a positive divisor of the batch per process ({b} = "
                         f"train.batch_size {global_batch} / {dist.world_size} processes)")
    # bf16 autocast and the attention kernel (train.attention) for the network's forward and backward
    forward = forward_context(cfg.precision, device,
                              attention_backend(cfg.train.attention, device, cfg.precision, bool(cfg.train.compile)))

    scorer, fid_at_end, fid_floor = fid_scorer(cfg, dataset, device)  # before training: errors stop it early

    logger = None
    if dist.is_main:
        logger = RunLogger(run_dir, OmegaConf.to_container(cfg, resolve=True), **_logger_kwargs(cfg))
        custom = ", ".join(f"{k}={v}" for k, v in cfg.model.kwargs.items())
        print(f"{args['name']}" + (f" ({custom})" if custom else "") +
              f": {stats['params'] / 1e6:.2f}M parameters, {stats['gflops']:.3f} Gflops per image; "
              f"input {'x'.join(map(str, shape))}" + (f" ({vae.identifier} latents)" if vae else "") +
              f"; run_dir={run_dir}, starting at step {step}")

    def checkpoint():
        # Plain, unsharded state dicts whatever the parallelism (under FSDP every rank takes part in gathering).
        model_state, ema_state, opt_state = training_state(raw_model, ema, opt, fsdp)
        if dist.is_main:
            save_checkpoint({
                "model": model_state, "ema": ema_state, "opt": opt_state, "step": step,
                "config": OmegaConf.to_container(cfg, resolve=True), "model_args": args,
                # Every random draw derives from (seed, step): the data position and RNG state are the step.
                "rng": {"seed": cfg.seed, "samples_seen": step * global_batch}, "skipped_steps": skipped,
                **({"phema": phema.state_dict()} if phema is not None else {}),
                **({"repa": repa.state_dict()} if repa is not None else {}),
            }, ckpt_dir, step, keep_last=cfg.train.keep_last)
        barrier()
        boundary.saved()

    def score_fid():
        network = sampling_model(ema, args, fsdp, device, all_ranks=True)
        fid = ema_fid(network, scorer, cfg, dataset, shape, vae, diffusion_kwargs, dist, device, forward)
        row = {"step": step, "fid": fid, **scorer.last, "fid_samples": cfg.fid.num_samples,
               "fid_features": scorer.extractor.name}
        if fid_floor is not None:
            row.update(fid_floor=fid_floor["fid"], class_accuracy_floor=fid_floor["class_accuracy"])
        if dist.is_main:
            logger.log(row)
        return row

    def grid():
        network = sampling_model(ema, args, fsdp, device, all_ranks=False)
        if dist.is_main:
            path = run_dir / "samples" / f"{step:07d}.png"
            write_grid(network, cfg, dataset, shape, vae, diffusion_kwargs, path, device, forward)
            logger.log_image("samples", path, step, caption=f"EMA samples at step {step}")
        barrier()

    boundary = StepBoundary(cfg.train.ckpt_every_minutes, device).install()  # signals only set a flag
    model.train()
    ema.eval()
    window_start, window_steps, sums = time.perf_counter(), 0, {}
    progress = tqdm(total=cfg.train.steps, initial=step, desc="train", disable=not dist.is_main, mininterval=2)
    while step < cfg.train.steps:
        x, y, stored = next_batch(step)   # stored: REPA features from a latent cache, else None
        gen = step_generator(cfg.seed, step, device)
        # Draw for the whole global batch and take this rank's slice: any world size sees the same numbers.
        t, noise = (v[lo:lo + b] for v in objective.draw(gen, global_batch, shape, device))
        drop = (torch.rand(global_batch, generator=gen, device=device) < cfg.train.class_dropout)[lo:lo + b]
        flip = (torch.rand(global_batch, generator=gen, device=device) < 0.5)[lo:lo + b] & bool(cfg.data.random_flip)
        y = torch.where(drop, dataset.num_classes, y)  # label dropout for classifier-free guidance
        if cfg.data.random_flip or cached:  # a cache item always has a flip picked (index 0 when flips are off)
            x = apply_flips(x, flip, cached)
        with forward():  # REPA's targets: encoder features of the clean (flipped) images; a placeholder without REPA
            z = repa.targets(x, stored, flip) if repa is not None else torch.zeros(len(x), 0, device=device)
        if vae is not None:  # latent diffusion: z = (mean + std * eps) * scaling_factor, eps from this step
            eps = torch.randn((global_batch, *shape), generator=gen, device=device)[lo:lo + b]
            x = vae.latents(x if cached else vae.encode_moments(x), eps)

        for o in optimizers:
            for group in o.param_groups:
                group["lr"] = learning_rate(step, cfg.optim.lr, cfg.optim.warmup_steps, cooldown, cfg.train.steps)
            o.zero_grad(set_to_none=True)
        # Micro-batches of equal size: the mean of their mean losses is the batch's mean loss, so the summed
        # gradients are the full batch's; the gradient reduction runs in the last backward only.
        parts = []
        for i, (xs, ts, ys, ns, zs) in enumerate(zip(*(v.chunk(accum) for v in (x, t, y, noise, z)))):
            with gradient_sync(synced, i == accum - 1):
                with forward():
                    part = objective.losses(model, xs, ts, ns, dict(y=ys))
                    if repa is not None:  # + coeff * alignment of block repa.depth's tokens (logged as repa_loss)
                        part = repa.add_loss(part, zs)
                (part["loss"].mean() / accum).backward()
            parts.append({k: v.detach() for k, v in part.items()})
        losses = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
        grad_norm = clip_gradients(param_groups, cfg.optim.grad_clip or math.inf)
        # Agreed by all ranks before the update: a non-finite loss or gradient norm, a stop signal, a timed checkpoint.
        bad, signum, due = boundary.check(losses["loss"].mean(), grad_norm)
        if bad is None:
            for o in optimizers:
                o.step()
            update_ema(ema, raw_model, cfg.ema.decay)
            if phema is not None:  # EDM2's power-function EMAs, advanced by images seen
                phema.update(raw_model, (step + 1) * global_batch, global_batch)
        else:
            skipped += 1
            if skipped > cfg.train.skip_nonfinite:
                if dist.is_main:
                    logger.finish()
                raise Diverged(divergence_message(step + 1, bad, ckpt_dir, cfg))
            for o in optimizers:  # the weights, the optimizers and the EMA stay as they were
                o.zero_grad(set_to_none=True)
            if dist.is_main:
                logger.log({"step": step + 1, "skipped": 1, "nonfinite": bad, "skipped_steps": skipped})
        step += 1
        progress.update(1)
        if bad is not None:
            continue

        for key, value in losses.items():  # loss and the objective's terms (DDPM: mse, vb; flow + cosine: mse, cos)
            sums[key] = sums.get(key, 0.0) + value.mean()
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm.detach()
        window_steps += 1
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - window_start
            means = {k: float(v) / window_steps for k, v in sums.items()}
            if dist.world_size > 1:  # average the logged means over ranks
                packed = torch.tensor(list(means.values()), device=device)
                torch.distributed.all_reduce(packed)
                means = dict(zip(means, (packed / dist.world_size).tolist()))
            row = {"step": step, **means, "lr": opt.param_groups[0]["lr"],
                   "images_per_sec": window_steps * global_batch / elapsed, "step_time": elapsed / window_steps,
                   "gflops": stats["gflops"],
                   # Training compute as the paper counts it: Gflops x 3 (forward + backward) x batch x steps.
                   "train_compute_gflops": stats["gflops"] * 3 * global_batch * step}
            if dist.is_main:
                logger.log(row)
                progress.set_postfix(loss=f"{means['loss']:.4f}")
            window_start, window_steps, sums = time.perf_counter(), 0, {}
        if phema is not None and (step * global_batch) % cfg.ema.snapshot_every == 0 and dist.is_main:
            write_snapshots(run_dir / "phema", phema, raw_model, step * global_batch,
                            {"step": step, "model_args": args, "config": OmegaConf.to_container(cfg, resolve=True)})
        saved = step % cfg.train.ckpt_every == 0 or step == cfg.train.steps
        if saved:
            checkpoint()
        if (signum or due) and not saved:
            checkpoint()
        if signum:  # preempted or out of time: the checkpoint is written, stop here; the same command resumes
            progress.close()
            if dist.is_main:
                print(f"received signal {signum} ({signal_name(signum)}): checkpoint written at step {step}; "
                      f"exiting with {128 + signum} (re-run the same command to resume)", flush=True)
                logger.finish()
            cleanup_distributed()
            boundary.exit(signum)
        if cfg.train.sample_every and step % cfg.train.sample_every == 0 and step != cfg.train.steps:
            grid()
        if scorer is not None and cfg.fid.every and step % cfg.fid.every == 0 and step != cfg.train.steps:
            score_fid()
    progress.close()
    grid()  # the final grid (also when a finished run is re-run)
    if scorer is not None and (fid_at_end or cfg.fid.every):
        final = logged_row(run_dir / "metrics.jsonl", step, "fid") if dist.world_size == 1 else None
        final = final or score_fid()  # a finished run re-run prints the number it logged
        if dist.is_main:
            print(quality_line(final, cfg))
    if dist.is_main:
        logger.finish()
    boundary.restore()
    cleanup_distributed()
    return run_dir


def divergence_message(step, quantity, ckpt_dir, cfg):
    """What stopped the run, where its good state is, and what to try."""
    kept = list_checkpoints(ckpt_dir)
    last = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written yet"
    return (f"step {step}: the {quantity} is not finite (NaN or inf), so training stopped before the optimizer "
            f"update ({cfg.train.skip_nonfinite} such step(s) may be skipped: train.skip_nonfinite); {last}, and "
            f"re-running the same command resumes from it. Lower optim.lr, set optim.grad_clip, or use precision=fp32")


def signal_name(signum):
    return signal.Signals(signum).name


def logged_row(path, step, key):
    """The metrics.jsonl row of `step` that has `key`, or None."""
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return next((r for r in rows if r.get("step") == step and key in r), None)


def quality_line(row, cfg):
    """The final FID (and class accuracy) beside what real data scores, printed at the end of a run."""
    name = "FID" if row["fid_features"] == "inception" else f"FD-{row['fid_features']}"
    text = (f"step {row['step']}: {name} of {row['fid_samples']} EMA samples (cfg {cfg.sample.cfg_scale:g}) "
            f"{row['fid']:.2f}")
    if "fid_floor" in row:
        text += f" (real held-out digits: {row['fid_floor']:.2f})"
    if "class_accuracy" in row:
        text += f"; classified as their label: {row['class_accuracy']:.1%}"
        if "class_accuracy_floor" in row:
            text += f" (real held-out digits: {row['class_accuracy_floor']:.1%})"
    return text


def _logger_kwargs(cfg):
    kwargs = OmegaConf.to_container(cfg.logger, resolve=True)
    backend = kwargs.pop("backend")
    if backend == "none":
        return {"backend": "none"}
    return {"backend": backend, "name": Path(cfg.run_dir).as_posix().replace("/", "_"), **kwargs}


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
@report_user_errors
def main(cfg):
    train(cfg)


if __name__ == "__main__":
    # A launcher's jobs (hydra/launcher=submitit_local | slurm) unpickle this module's functions in a fresh
    # interpreter started elsewhere: let them import the repository wherever they start.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent),
                                                             os.environ.get("PYTHONPATH")]))
    main()
