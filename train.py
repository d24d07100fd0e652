"""Train a DiT (or any model in models.MODELS) as a Gaussian diffusion (Peebles & Xie 2023) or as a flow (SiT).

    python train.py                                   # the digits default, CPU, minutes
    python train.py diffusion=flow                    # the same network trained by flow matching
    torchrun --nproc_per_node=8 train.py experiment=imagenet256 data.path=/data/imagenet/train
    python train.py -m model=DiT-S-2,DiT-B-2          # a sweep, one run_dir per run

Re-running the same command resumes from the newest checkpoint in run_dir and continues exactly: the data order and
every random draw (timesteps, noise, label dropout, flips, VAE posterior samples, in-loop samples) are functions of
(seed, step). This file is wiring: the objective (diffusion/objectives.py) draws each step's times and noise and
computes the loss, so the loop does not know which objective it trains; parallelism, EMA, logging, checkpoints and
scoring live in the packages below it (docs/architecture.md).
"""

import copy
import math
import os
import signal
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import hydra
import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from data import LatentCacheDataset, StepSampler, build_dataset, check_cache
from data.batches import apply_flips, batch_source, step_generator
from data.latents import cache_channel_stats, input_shape
from diffusion import build_objective
from diffusion.eval_loss import build_eval_loss
from diffusion.objectives import attach_ema, canonical_config, network_kwargs
from diffusion.repa import build_repa
from diffusion.sampling import sample_images
from evaluation.training import quality_line, training_scorer
from models import build_model, build_vae, model_stats, optimizer_params, with_width
from utils.checkpoint import check_resume, list_checkpoints, load_for_resume, load_model_weights, save_on_main
from utils.distributed import barrier, cleanup_distributed, setup_distributed
from utils.ema import build_posthoc_ema, update_ema
from utils.errors import ConfigError, Diverged, report_user_errors
from utils.files import atomic_write_text
from utils.guard import StepBoundary, divergence_message
from utils.images import save_grid
from utils.logger import MetricsWindow, RunLogger, logged_row, truncate_metrics
from utils.parallel import Trainables, load_optimizer_state, parallelize, sampling_model, training_state
from utils.phema import write_snapshots
import utils.resolvers  # noqa: F401  (registers the configs' resolvers)
from utils.runlock import RunLock
from utils.schedule import budget_steps, schedule
from utils.speed import adamw, attention_backend, backward_context, forward_context, resolve_precision


# Every config key names the run (a change gives another run_dir: another run) or not (a change resumes the same
# run): these name it, conf/train.yaml's hydra.job.config.override_dirname.exclude_keys list the others
# (tests/test_loop.py fails on a key in neither). model and data name it through run_dir's path.
NAMES_THE_RUN = ("seed", "precision", "model", "data.name", "data.image_size", "data.random_flip", "vae.name",
                 "vae.id", "vae.subfolder", "vae.scaling_factor", "vae.normalize", "vae.stats_images", "diffusion",
                 "optim.lr", "optim.betas", "optim.weight_decay", "optim.warmup_steps", "optim.cooldown_fraction",
                 "optim.cooldown_end", "optim.final_lr", "optim.grad_clip", "train.batch_size", "train.class_dropout",
                 "train.flops", "ema", "repa")


# ============================== Helpers =======================================

def train_step(model, objective, trainables, batch, *, accum=1, forward=nullcontext, repa=None, max_norm=math.inf):
    """The forward and backward passes of one step over `accum` equal micro-batches of batch = (x, t, y, noise,
    REPA targets), then the gradients clipped to max_norm. Returns (per-sample losses, joint gradient norm); the
    update itself is the caller's, after the non-finite guard has seen both."""
    if accum < 1 or len(batch[0]) % accum:
        raise ConfigError(f"train.grad_accum={accum} must be a positive divisor of the batch per process "
                          f"({len(batch[0])})")
    # Micro-batches of equal size: the mean of their mean losses is the batch's mean loss, so the summed
    # gradients are the full batch's; the gradient reduction runs in the last backward only.
    parts = []
    for i, (x, t, y, noise, z) in enumerate(zip(*(v.chunk(accum) for v in batch))):
        with trainables.sync(i == accum - 1):
            with forward():
                part = objective.losses(model, x, t, noise, dict(y=y))
                if repa is not None:  # + coeff * alignment of block repa.depth's tokens (logged as repa_loss)
                    part = repa.add_loss(part, z)
            with backward_context(forward):   # activation checkpointing recomputes blocks with the same kernel
                (part["loss"].mean() / accum).backward()
        parts.append({k: v.detach() for k, v in part.items()})
    losses = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
    return losses, trainables.clip(max_norm)


def step_batch(run, step):
    """This rank's (x, t, y, noise, REPA targets) of a step: the step's images or latents with every draw of the
    step (times, noise, label dropout, flips, VAE posterior samples) made for the global batch from
    step_generator(seed, step) and sliced, so any world size sees the same numbers."""
    cfg, device, n, b, lo = run.cfg, run.device, run.global_batch, run.b, run.lo
    x, y, stored = run.next_batch(step)   # stored: REPA features from a latent cache, else None
    gen = step_generator(cfg.seed, step, device)
    t, noise = (v[lo:lo + b] for v in run.objective.draw(gen, n, run.shape, device))
    drop = (torch.rand(n, generator=gen, device=device) < cfg.train.class_dropout)[lo:lo + b]
    flip = (torch.rand(n, generator=gen, device=device) < 0.5)[lo:lo + b] & bool(cfg.data.random_flip)
    y = torch.where(drop, run.dataset.num_classes, y)  # label dropout for classifier-free guidance
    if cfg.data.random_flip or run.cached:  # a cache item always has a flip picked (index 0 when flips are off)
        x = apply_flips(x, flip, run.cached)
    with run.forward():  # REPA's targets: encoder features of the clean (flipped) images; a placeholder without REPA
        z = run.repa.targets(x, stored, flip) if run.repa is not None else torch.zeros(len(x), 0, device=device)
    if run.vae is not None:  # latent diffusion: z = (mean + std * eps) * scaling_factor, eps from this step
        eps = torch.randn((n, *run.shape), generator=gen, device=device)[lo:lo + b] if run.vae.stochastic else None
        x = run.vae.latents(x if run.cached else run.vae.encode_moments(x), eps)
    return x, t, y, noise, z


def model_args(cfg, dataset, objective, shape, vae=None):
    """What rebuilds the network (models.build_model; param sp | mup) and its VAE (None in pixel space); saved."""
    m = cfg.model
    kwargs = with_width(m.name, OmegaConf.to_container(m.kwargs, resolve=True), m.get("width"), m.get("head_width"))
    return dict(name=cfg.model.name, input_size=shape[1], in_channels=shape[0], num_classes=dataset.num_classes,
                **network_kwargs(objective), **kwargs, param=cfg.model.param, base_width=cfg.model.base_width,
                vae=None if vae is None else vae.record(cfg.vae.path, cfg.vae.subfolder))


# ============================== In-loop samples: grids and FID ================

def draw_images(run, network, indices, labels, *key):
    """uint8 images of EMA samples `indices` as sample.py draws them (diffusion.sampling.sample_images), with the
    run's sampler settings in the training precision; a sampler's own draws come from (seed, step, key: grid or FID,
    first sample index), so a resumed run draws the same whatever ran before."""
    options = {k: v for k, v in OmegaConf.to_container(run.cfg.sample, resolve=True).items() if k != "per_class"}
    rng_seed = int(np.random.SeedSequence([run.cfg.seed, run.step, *key]).generate_state(1)[0])
    return sample_images(network, indices, labels, seed=run.cfg.seed, shape=run.shape, device=run.device,
                         decoder=run.vae, context=run.forward, rng_seed=rng_seed, objective=run.objective,
                         null_class=run.dataset.num_classes, **options)


def write_grid(run):
    """EMA samples, one row per class (up to 10 classes); the same starting noise at every step."""
    network = sampling_model(run.ema, lambda: build_model(run.args), run.fsdp, run.device, all_ranks=False)
    if run.dist.is_main:
        classes, per_class = max(min(run.dataset.num_classes, 10), 1), run.cfg.sample.per_class
        labels = np.repeat(np.arange(classes), per_class)   # unconditional models: class 0 is their null class
        images = draw_images(run, network, range(len(labels)), labels, 1, 0)
        path = run.run_dir / "samples" / f"{run.step:07d}.png"
        save_grid(images.cpu(), path, nrow=per_class)
        run.logger.log_image("samples", path, run.step, caption=f"EMA samples at step {run.step}")
    barrier()


@torch.no_grad()
def score_fid(run):
    """FID (or FD) of cfg.fid.num_samples EMA samples (classes in turn), each rank drawing a contiguous share;
    logged with the class accuracy (digits network) and the real-data floor. Returns the logged row."""
    cfg, world = run.cfg, run.dist.world_size
    network = sampling_model(run.ema, lambda: build_model(run.args), run.fsdp, run.device, all_ranks=True)
    share = np.array_split(np.arange(cfg.fid.num_samples), world)[run.dist.rank]
    labels = share % max(run.dataset.num_classes, 1)
    chunks = np.array_split(share, max(1, math.ceil(len(share) / cfg.fid.batch_size)))
    batches = (draw_images(run, network, chunk, chunk % max(run.dataset.num_classes, 1), 0, int(chunk[0]))
               for chunk in chunks if len(chunk))
    fid = run.scorer.score(batches, all_reduce=world > 1, labels=labels)
    row = {"step": run.step, "fid": fid, **run.scorer.last, "fid_samples": cfg.fid.num_samples,
           "fid_features": run.scorer.extractor.name}
    if run.fid_floor is not None:
        row.update(fid_floor=run.fid_floor["fid"], class_accuracy_floor=run.fid_floor["class_accuracy"])
    if run.dist.is_main:
        run.logger.log(row)
    return row


# ============================== Bookkeeping at a step boundary ================

def checkpoint(run, boundary):
    """Write the training state of this step (plain, unsharded state dicts whatever the parallelism; under FSDP
    every rank takes part in gathering them)."""
    model_state, ema_state, opt_state = training_state(run.raw_model, run.ema, run.opt, run.fsdp)
    save_on_main(lambda: {   # rank 0 writes; a failed write (a full disk) stops every rank with its message
        "model": model_state, "ema": ema_state, "opt": opt_state, "step": run.step,
        "config": OmegaConf.to_container(run.cfg, resolve=True), "model_args": run.args,
        # Every random draw derives from (seed, step): the data position and RNG state are the step.
        "rng": {"seed": run.cfg.seed, "samples_seen": run.step * run.global_batch}, "skipped_steps": run.skipped,
        **({"phema": run.phema.state_dict()} if run.phema is not None else {}),
        **({"repa": run.repa.state_dict()} if run.repa is not None else {}),
    }, run.ckpt_dir, run.step, keep_last=run.cfg.train.keep_last)
    boundary.saved()


def log_window(run, progress):
    """One metrics row: the means over the steps since the last row (skipped steps excluded), speed, compute."""
    if not run.window.steps:
        return
    means, step_time = run.window.means(run.device, run.dist.world_size)
    row = {"step": run.step, **means, "lr": run.opt.param_groups[0]["lr"],
           "images_per_sec": run.global_batch / step_time, "step_time": step_time, "gflops": run.stats["gflops"],
           # Training compute as the paper counts it: Gflops x 3 (forward + backward) x batch x steps.
           "train_compute_gflops": run.stats["gflops"] * 3 * run.global_batch * run.step}
    if run.dist.is_main:
        run.logger.log(row)
        progress.set_postfix(loss=f"{means['loss']:.4f}")


def skip_step(run, bad):
    """A non-finite loss or gradient: count it, stop with Diverged past train.skip_nonfinite, else drop the
    gradients (the weights, optimizer states and EMA stay as they were) and log the skip."""
    run.skipped += 1
    if run.skipped > run.cfg.train.skip_nonfinite:
        raise Diverged(divergence_message(run.step + 1, bad, list_checkpoints(run.ckpt_dir),
                                          run.cfg.train.skip_nonfinite))
    run.trainables.discard()
    if run.dist.is_main:
        run.logger.log({"step": run.step + 1, "skipped": 1, "nonfinite": bad, "skipped_steps": run.skipped})


def end_of_step(run, boundary, signum, due, progress):
    """After every step, trained or skipped: log, EMA snapshot, checkpoint, stop on a signal, eval loss, grid, FID."""
    cfg, step = run.cfg, run.step
    last = step == cfg.train.steps
    if step % cfg.train.log_every == 0 or last:
        log_window(run, progress)
    if run.phema is not None and (step * run.global_batch) % cfg.ema.snapshot_every == 0 and run.dist.is_main:
        write_snapshots(run.run_dir / "phema", run.phema, run.raw_model, step * run.global_batch,
                        {"step": step, "model_args": run.args, "config": OmegaConf.to_container(cfg, resolve=True)})
    if step % cfg.train.ckpt_every == 0 or last or signum or due:
        checkpoint(run, boundary)
    if signum:  # preempted or out of time: the checkpoint is written, stop here; the same command resumes
        progress.close()
        if run.dist.is_main:
            print(f"received signal {signum} ({signal.Signals(signum).name}): checkpoint written at step {step}; "
                  f"exiting with {128 + signum} (re-run the same command to resume)", flush=True)
            run.logger.finish()
        cleanup_distributed()
        boundary.exit(signum)
    if run.eval_loss is not None and (step % cfg.eval.every == 0 or last):   # docs/scaling.md, "Evaluation loss"
        net = lambda m: sampling_model(m, lambda: build_model(run.args), run.fsdp, run.device, all_ranks=True)
        run.eval_loss.row(step, {"eval_loss": net(run.raw_model), "eval_loss_ema": net(run.ema)}, run.forward,
                          log=run.dist.is_main and run.logger.log)
    if cfg.train.sample_every and step % cfg.train.sample_every == 0 and not last:
        write_grid(run)
    if run.scorer is not None and cfg.fid.every and step % cfg.fid.every == 0 and not last:
        score_fid(run)


# ============================== Training ======================================

def setup(cfg, dist):
    """Everything the loop needs, from the config: data (and the VAE), objective, network, EMA, optimizer, the
    resumed state, logger and scorer, as one plain namespace."""
    device = dist.device
    cfg.precision = resolve_precision(cfg.precision, device)  # auto: bf16 where it is fast (utils/speed.py)
    run = SimpleNamespace(cfg=cfg, dist=dist, device=device, run_dir=Path(cfg.run_dir), logger=None,
                          fsdp=cfg.train.parallel == "fsdp", global_batch=cfg.train.batch_size)
    run.ckpt_dir = run.run_dir / "checkpoints"
    run.dataset = build_dataset(**cfg.data)
    run.scorer, run.fid_at_end, run.fid_floor = training_scorer(   # missing files stop the run here, early
        data_name=cfg.data.name, features=cfg.fid.features, every=cfg.fid.every, at_end=cfg.fid.at_end,
        reference=cfg.fid.reference, weights=cfg.fid.weights or cfg.fid.inception_weights, device=device)
    run.cached = isinstance(run.dataset, LatentCacheDataset)   # items are posteriors of both flips, not images
    run.vae = build_vae(**cfg.vae)
    if run.vae is not None:
        run.vae.to(device)
    if run.cached:  # refuse a cache made with another VAE, scaling factor or resolution
        check_cache(run.dataset.manifest, vae=run.vae and run.vae.identifier, image_size=cfg.data.image_size,
                    scaling_factor=run.vae and run.vae.scaling_factor, source=f"the latent cache {cfg.data.path}")
    if cfg.vae.normalize:  # channel-wise latent normalisation (LightningDiT), undone before decoding
        if run.vae is None:
            raise ConfigError("vae.normalize=true normalises VAE latents; in pixel space (vae=none) leave it false")
        run.vae.set_channel_stats(*(cache_channel_stats(run.dataset, cfg.data.path) if run.cached else
                                    run.vae.measure_channel_stats(run.dataset, cfg.vae.stats_images, device)))
    run.objective = build_objective(OmegaConf.to_container(cfg.diffusion, resolve=True))
    run.shape = input_shape(run.dataset, run.vae)   # (C, H, W) the network sees: latents or pixels
    run.args = model_args(cfg, run.dataset, run.objective, run.shape, run.vae)
    run.eval_loss = build_eval_loss(run.objective, run.dataset, run.vae, shape=run.shape, data_name=cfg.data.name,
                                    image_size=cfg.data.image_size, rank=dist.rank, world_size=dist.world_size,
                                    device=device, **cfg.eval)   # None with eval.every=0
    torch.manual_seed(cfg.seed)  # the initial weights; every later draw comes from step_generator
    model = build_model(run.args).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    run.stats = model_stats(lambda: build_model(run.args), run.shape)
    cfg.train.steps = budget_steps(cfg.train, run.stats["gflops"], run.global_batch)   # train.flops: a budget's steps

    # Resume from the newest checkpoint, on the CPU, the one rank 0 picks (weights load before wrapping or sharding).
    run.step, run.skipped, state = 0, 0, {}
    ckpt_path, ckpt = load_for_resume(run.ckpt_dir)
    if ckpt_path is not None:
        check_resume(ckpt["config"], OmegaConf.to_container(cfg, resolve=True), ckpt_path, canonical_config)
        load_model_weights(model, ckpt["model"], ckpt_path)
        load_model_weights(ema, ckpt["ema"], ckpt_path)
        run.step, run.skipped = ckpt["step"], ckpt.get("skipped_steps", 0)
        state = {key: ckpt.get(key) for key in ("opt", "repa", "phema")}
        del ckpt
    if dist.is_main:
        (run.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        truncate_metrics(run.run_dir / "metrics.jsonl", run.step)

    run.raw_model, run.ema = model, attach_ema(run.objective, ema)   # shortcut models' targets: the EMA
    run.phema = build_posthoc_ema(model, cfg.ema.stds, cfg.ema.snapshot_every, run.global_batch, run.fsdp,
                                  state.pop("phema", None)) if cfg.ema.posthoc else None
    run.repa = build_repa(model, run.dataset, **cfg.repa, image_size=cfg.data.image_size, cache=cfg.data.path,
                          device=device, seed=cfg.seed)   # None, or a hook on one block and a projector of its own
    run.model = parallelize(model, ema, parallel=cfg.train.parallel, grad_checkpoint=cfg.train.grad_checkpoint,
                            compile=cfg.train.compile, world_size=dist.world_size, device=device,
                            param_dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
    run.opt = adamw(optimizer_params(model, run.args["param"], run.args["base_width"]), cfg.optim)   # mup: groups
    if state.get("opt") is not None:
        load_optimizer_state(model, run.opt, state.pop("opt"), run.fsdp)   # each loaded state freed once used
    run.trainables = Trainables().add(model.parameters(), run.opt, run.model)
    if run.repa is not None:  # the projector trains beside the network, with its own optimizer and DDP wrapper
        run.repa.start(lambda params: adamw(params, cfg.optim), dist.world_size, device, state=state.pop("repa", None))
        run.trainables.add(run.repa.parameters(), run.repa.opt, run.repa.module)

    sampler = StepSampler(len(run.dataset), run.global_batch, dist.rank, dist.world_size, cfg.seed, run.step)
    run.next_batch = batch_source(run.dataset, sampler, cfg.data.num_workers, device)
    run.b, run.lo = sampler.b, dist.rank * sampler.b   # this rank's slice of the global batch's random draws
    run.lr = schedule(cfg.optim, cfg.train.steps)   # step -> the rate of its update
    # bf16 autocast and the attention kernel (train.attention) for the network's forward and backward
    run.forward = forward_context(cfg.precision, device,
                                  attention_backend(cfg.train.attention, device, cfg.precision, bool(cfg.train.compile)))
    if dist.is_main:
        run.logger = RunLogger.for_run(cfg.run_dir, OmegaConf.to_container(cfg, resolve=True),
                                       OmegaConf.to_container(cfg.logger, resolve=True))
        custom = ", ".join(f"{k}={v}" for k, v in {**cfg.model.kwargs, "width": cfg.model.width}.items() if v is not None)
        print(f"{cfg.model.name}" + (f" ({custom})" if custom else "") + f": {run.stats['params'] / 1e6:.2f}M "
              f"parameters, {run.stats['gflops']:.3f} Gflops per image; input {'x'.join(map(str, run.shape))}" +
              (f" ({run.vae.identifier} latents)" if run.vae else "") + f"; run_dir={run.run_dir}, starting at "
              f"step {run.step}")
    return run


def fit(run, boundary):
    """The loop: a step's batch, forward and backward, the guard, the update and EMA, then the bookkeeping."""
    cfg = run.cfg
    run.model.train()
    run.ema.eval()
    progress = tqdm(total=cfg.train.steps, initial=run.step, desc="train", disable=not run.dist.is_main, mininterval=2)
    run.window = MetricsWindow()   # step times count from here, not from setup
    while run.step < cfg.train.steps:
        batch = step_batch(run, run.step)
        run.trainables.zero_grad(run.lr(run.step))
        losses, grad_norm = train_step(run.model, run.objective, run.trainables, batch, accum=cfg.train.grad_accum,
                                       forward=run.forward, repa=run.repa, max_norm=cfg.optim.grad_clip or math.inf)
        # Agreed by all ranks before the update: a non-finite loss or gradient norm, a stop signal, a timed checkpoint.
        bad, signum, due = boundary.check(losses["loss"].mean(), grad_norm)
        if bad is None:
            run.trainables.step()
            update_ema(run.ema, run.raw_model, cfg.ema.decay)
            if run.phema is not None:  # EDM2's power-function EMAs, advanced by images seen
                run.phema.update(run.raw_model, (run.step + 1) * run.global_batch, run.global_batch)
            run.window.add({**losses, "grad_norm": grad_norm})
        else:
            skip_step(run, bad)
        run.step += 1
        progress.update(1)
        end_of_step(run, boundary, signum, due, progress)
    progress.close()


def finish(run):
    """The final grid, and the final FID beside the real-data floor (a finished run re-run prints what it logged)."""
    write_grid(run)
    if run.scorer is not None and (run.fid_at_end or run.cfg.fid.every):
        final = logged_row(run.run_dir / "metrics.jsonl", run.step, "fid") if run.dist.world_size == 1 else None
        final = final or score_fid(run)
        if run.dist.is_main:
            print(quality_line(final, run.cfg.sample.cfg_scale))


def train(cfg):
    if cfg.dry_run:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = setup_distributed(cfg.device, tf32=cfg.tf32)
    boundary = StepBoundary(cfg.train.ckpt_every_minutes, dist.device).install()  # signals only set a flag
    run, lock = None, RunLock(cfg.run_dir)
    try:  # however the run ends (done, Diverged, an error), the handlers and the process group are restored
        lock.take()   # one writer per run folder: a second job in it stops with a message naming the first
        run = setup(cfg, dist)
        fit(run, boundary)
        finish(run)
    finally:
        lock.release()
        if run is not None and run.logger is not None:
            run.logger.finish()
        boundary.restore()
        cleanup_distributed(wait=sys.exc_info()[0] is None)   # after an error, other ranks may never reach a barrier
    return Path(cfg.run_dir)


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
