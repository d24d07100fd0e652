"""The evaluation loss: the training objective's loss on fixed held-out data, at a fixed grid of times, with fixed
noise, so two evaluations of the same weights agree to float precision and two checkpoints differ only by the
weights (docs/scaling.md, "Evaluation loss").

    evaluator = build_eval_loss(objective, dataset, vae, shape=..., data_name=..., every=500, times=8, ...)
    row = evaluator.row(step, {"eval_loss": raw_model, "eval_loss_ema": ema}, context, log=logger.log)
    # {"step", "eval_loss", "eval_loss_se", "eval_loss_ema", "eval_loss_ema_se"}

The time grid (K = `times` points, equal weights 1/K) estimates the loss's expectation under the training time
distribution:
- ddpm: t_i = floor((i + 1/2) T / K), K evenly spaced steps of the T; training draws t uniformly from {0..T-1}, so
  equal weights are that expectation (the objective's own loss: L_simple, + L_vb with a learned variance).
- flow: t_i = t0 + (t1 - t0) F^-1((i + 1/2) / K), the midpoint quantiles of the training time density F
  (uniform: u_i = (i + 1/2)/K; logit-normal: u_i = sigmoid(time_mean + time_std Phi^-1((i + 1/2)/K))), then the
  objective's time shift (the quantiles of the shifted density are the shifted quantiles: the shift is increasing),
  mapped into the training interval [t0, t1] as FlowObjective.draw maps its draws; each grid point is equally likely.
Noise: image j gets its K noise tensors (and, for latent data, its VAE posterior sample) from a generator seeded by
(EVAL_SEED, j) on the CPU, whatever the rank, batch or step. Images are cut into chunks of `batch_size` at fixed
global positions and each rank evaluates a contiguous run of chunks, so a chunk's forward pass is the same on any
number of processes; the (image, time) losses are summed over ranks. The mean over images has a standard error from
a bootstrap over images (BOOTSTRAP_RESAMPLES resamples from a fixed seed).
"""

from contextlib import nullcontext
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch
import torch.distributed as torch_dist

from data import DigitsDataset, ImageFolderDataset, LatentCacheDataset, check_cache
from .transport import shift_time
from utils.errors import ConfigError

EVAL_SEED = 20_260_101          # the noise of image j comes from (EVAL_SEED, j): never from the training seed
BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 200


def time_grid(objective, k, shape=None):
    """(t, weights): the K times (int64 steps for ddpm, float32 for flows) and their weights (float64, sum 1);
    shape: the data's (C, H, W), which a flow's time_shift=auto needs."""
    if k < 1:
        raise ConfigError(f"eval.times={k} must be at least 1")
    mid = [(i + 0.5) / k for i in range(k)]
    if objective.name == "ddpm":
        steps = objective.diffusion.num_timesteps
        if k > steps:
            raise ConfigError(f"eval.times={k} exceeds the {steps} diffusion steps")
        t = torch.tensor([int(u * steps) for u in mid], dtype=torch.long)
    else:
        t0, t1 = objective.transport.check_interval(objective.transport.train_eps, objective.transport.sample_eps)
        if objective.time_sampling == "logit_normal":
            normal = NormalDist()
            mid = [1 / (1 + np.exp(-(objective.time_mean + objective.time_std * normal.inv_cdf(u)))) for u in mid]
        shift = 1 / objective.shift(shape)
        mid = [shift_time(u, shift) for u in mid]   # shift = 1: the values themselves
        t = torch.tensor([u * (t1 - t0) + t0 for u in mid], dtype=torch.float32)
    return t, torch.full((k,), 1.0 / k, dtype=torch.float64)


def image_generator(index, seed=EVAL_SEED):
    """The CPU generator of image `index`'s draws."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, int(index)]).generate_state(1)[0]))


def image_noise(index, k, shape, seed=EVAL_SEED):
    """(noise (K, *shape), posterior eps (*shape)) of image `index`: float32 on the CPU, rank-independent."""
    gen = image_generator(index, seed)
    noise = torch.randn((k, *shape), generator=gen)
    return noise, torch.randn(tuple(shape), generator=gen)


def bootstrap_indices(n, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """(resamples, n) indices of images drawn with replacement, from a fixed seed."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_se(per_image, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """The bootstrap standard error of the mean of per-image losses: sd (ddof=1) of the resampled means."""
    per_image = np.asarray(per_image, dtype=np.float64)
    if len(per_image) < 2:
        return float("nan")
    return float(per_image[bootstrap_indices(len(per_image), resamples, seed)].mean(axis=1).std(ddof=1))


class EvalLoss:
    """The evaluation loss of a network on `dataset[indices]` (items (x, y); for latent caches, (moments of both
    flips, y, ...)). `vae` (or None in pixel space) turns images or cached posteriors into latents with the image's
    fixed posterior sample; `cached` says items are cache posteriors (the unflipped one is used)."""

    def __init__(self, objective, dataset, indices, shape, *, times=8, batch_size=64, vae=None, cached=False,
                 rank=0, world_size=1, device="cpu", seed=EVAL_SEED):
        if batch_size < 1 or not len(indices):
            raise ConfigError(f"eval.batch_size={batch_size} and the number of images ({len(indices)}) must be "
                              f"positive")
        self.objective, self.dataset, self.indices = objective, dataset, np.asarray(indices)
        self.shape, self.vae, self.cached, self.device, self.seed = tuple(shape), vae, cached, device, seed
        self.t, self.weights = time_grid(objective, times, self.shape)
        self.world_size = world_size
        chunks = [np.arange(s, min(s + batch_size, len(indices))) for s in range(0, len(indices), batch_size)]
        self.chunks = [chunks[i] for i in np.array_split(np.arange(len(chunks)), world_size)[rank]]   # contiguous

    def _inputs(self, positions):
        """(x (B*K, *shape), t (B*K,), y (B*K,), noise (B*K, *shape)) of the images at these positions."""
        k = len(self.t)
        items = [self.dataset[int(self.indices[p])] for p in positions]
        x = torch.stack([torch.as_tensor(item[0]) for item in items]).to(self.device)
        y = torch.tensor([int(item[1]) for item in items], dtype=torch.long, device=self.device)
        draws = [image_noise(p, k, self.shape, self.seed) for p in positions]
        if self.vae is not None:
            moments = x[:, 0] if self.cached else self.vae.encode_moments(x)
            x = self.vae.latents(moments, torch.stack([eps for _, eps in draws]).to(self.device))
        noise = torch.cat([n for n, _ in draws]).to(self.device)
        t = self.t.to(self.device).repeat(len(positions))
        return x.repeat_interleave(k, dim=0), t, y.repeat_interleave(k), noise

    @torch.no_grad()
    def losses(self, model, context=nullcontext):
        """(N, K) float64 losses of every image at every grid time, the same on every rank (summed over ranks)."""
        was_training = model.training
        model.eval()
        out = torch.zeros(len(self.indices), len(self.t), dtype=torch.float64, device=self.device)
        try:
            for positions in self.chunks:
                x, t, y, noise = self._inputs(positions)
                with context():
                    loss = self.objective.losses(model, x, t, noise, dict(y=y))["loss"]
                out[torch.as_tensor(positions, device=self.device)] = loss.double().view(len(positions), -1)
        finally:
            model.train(was_training)
        if self.world_size > 1:
            torch_dist.all_reduce(out)
        return out.cpu().numpy()

    def __call__(self, model, context=nullcontext):
        """(mean loss, bootstrap standard error over images)."""
        per_image = self.losses(model, context) @ self.weights.numpy()
        return float(per_image.mean()), bootstrap_se(per_image)

    def row(self, step, models, context=nullcontext, log=None):
        """A metrics row {"step": step, name: mean, name + "_se": SE} for each (name, model) in `models`, passed to
        `log` when given (the main rank's logger) and returned."""
        row = {"step": step}
        for name, model in models.items():
            row[name], row[name + "_se"] = self(model, context)
        if log:
            log(row)
        return row


def eval_indices(n, num_images, seed=EVAL_SEED):
    """The first num_images (None or 0: all) of a fixed permutation of range(n)."""
    order = np.random.default_rng(seed).permutation(n)
    return order if not num_images else order[:min(int(num_images), n)]


def build_eval_loss(objective, dataset, vae, *, shape, data_name, image_size=None, every=0, num_images=None, times=8,
                    batch_size=64, path=None, rank=0, world_size=1, device="cpu"):
    """The run's EvalLoss, or None when every=0. Data: eval.path (a folder of images, one subfolder per class, or a
    latent cache from extract_latents.py); without one, the digits' held-out split (data=digits; those images are
    also in the training set), and for any other data a clear refusal."""
    if not every:
        return None
    if objective.name not in ("ddpm", "flow"):   # the one-step objectives (docs/onestep.md)
        raise ConfigError(f"eval.every={every}: the evaluation loss is defined for diffusion=ddpm and flow only; "
                          f"{objective.name}'s regression target is built from the network being trained (a JVP or "
                          f"its own shortcuts), so the same loss at two checkpoints measures against two targets. "
                          f"Set eval.every=0 and follow the few-step samples instead (fid.every)")
    cached = False
    if path is not None:
        if (Path(path) / "manifest.json").is_file():
            data, cached = LatentCacheDataset(path), True
            if vae is None:
                raise ConfigError(f"eval.path={path} is a latent cache: it needs the run's VAE (vae=none given)")
            check_cache(data.manifest, vae=vae.identifier, image_size=image_size, scaling_factor=vae.scaling_factor,
                        source=f"the evaluation cache eval.path={path}")
        else:
            data = ImageFolderDataset(path, image_size)
        indices = eval_indices(len(data), num_images)
    elif data_name == "digits" and isinstance(dataset, DigitsDataset):
        data, held = dataset, dataset.heldout_indices()
        indices = held[eval_indices(len(held), num_images)]
    else:
        raise ConfigError(f"eval.every={every} needs held-out data for data={data_name}: set eval.path to a fixed "
                          f"folder of validation images (one subfolder per class) or a latent cache of them "
                          f"(extract_latents.py), or eval.every=0")
    return EvalLoss(objective, data, indices, shape, times=times, batch_size=batch_size, vae=vae, cached=cached,
                    rank=rank, world_size=world_size, device=device)
