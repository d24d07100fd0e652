"""The VAE of latent diffusion: a thin wrapper over diffusers' AutoencoderKL (Rombach et al. 2112.10752).

DiT trains on the latents of Stable Diffusion's VAE (sd-vae-ft-ema / sd-vae-ft-mse): 8x downsampling, 4 latent
channels, and latents scaled by `scaling_factor` (0.18215) to roughly unit variance. This file is the only
place that knows the factor:

    moments = vae.encode_moments(x)        # (N, 2C, h, w): posterior mean and log-variance, unscaled
    z = vae.latents(moments, eps)          # (mean + exp(logvar / 2) * eps) * scaling_factor
    x = vae.decode(z)                      # back to images in [-1, 1]
With channel statistics set (LightningDiT's latent normalisation, `vae.normalize=true`), latents() also maps each
channel to zero mean and unit std, z = (z - mean_c) / std_c, and decode() undoes it first. `moment_sums` and
`channel_stats` compute those statistics exactly from posterior moments (no sampling):
    E[z_c] = s * mean(mu),  E[z_c^2] = s^2 * mean(mu^2 + exp(logvar)),  std_c = sqrt(E[z_c^2] - E[z_c]^2).

The autoencoder always runs in fp32 with autocast switched off and without gradients, also inside a bf16
training step: its latents are the data, and low-precision encoding would change the data with the precision.
Loading weights is the only I/O here; a missing VAE on an offline machine stops with the command that fetches it.
"""

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from diffusers import AutoencoderKL
from utils.errors import ConfigError, MissingFile

_TRUE = ("1", "on", "yes", "true")


#################################################################################
#                                   Helpers                                     #
#################################################################################

def hub_offline():
    """True when Hugging Face downloads are switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), read now."""
    return any(os.environ.get(k, "").lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def missing_vae_message(repo_id, subfolder, reason):
    """The error for a VAE that can be neither found locally nor downloaded: what is missing and how to fix it."""
    name = repo_id.split("/")[-1]
    sub = f" (subfolder {subfolder!r})" if subfolder else ""
    return (f"cannot load the VAE {repo_id!r}{sub}: {reason}.\n"
            f"Fetch it once on a machine with network access (newer huggingface_hub: `hf download ...`):\n"
            f"    huggingface-cli download {repo_id} --local-dir /local/folder/{name}\n"
            f"then copy the folder here and set\n"
            f"    vae.path=/local/folder/{name}\n"
            f"(sample.py also names the VAE config: vae={name} vae.path=/local/folder/{name}), "
            f"or copy a Hugging Face cache that holds it here and point HF_HOME at it.")


def _load_autoencoder(source, subfolder, local_files_only, cache_dir):
    # low_cpu_mem_usage=False: the default path wants `accelerate` and warns when it is missing.
    return AutoencoderKL.from_pretrained(source, subfolder=subfolder, local_files_only=local_files_only,
                                         cache_dir=cache_dir, low_cpu_mem_usage=False)


#################################################################################
#                                   The VAE                                     #
#################################################################################

class VAE(nn.Module):
    """An AutoencoderKL in fp32, frozen, with the latent scaling of latent diffusion.

    identifier: what the VAE is, for cache manifests and checkpoints (a hub id, or a folder for local VAEs).
    scaling_factor: None = the autoencoder config's `scaling_factor`.
    chunk_size: images per encoder/decoder call (bounds activation memory at large batches).
    """

    def __init__(self, autoencoder, identifier, scaling_factor=None, chunk_size=32):
        super().__init__()
        self.autoencoder = autoencoder.float().eval().requires_grad_(False)
        config = autoencoder.config
        self.identifier = str(identifier)
        self.scaling_factor = float(config.scaling_factor if scaling_factor is None else scaling_factor)
        self.latent_channels = config.latent_channels
        self.image_channels = config.in_channels
        self.downsample = 2 ** (len(config.block_out_channels) - 1)   # one halving per encoder block but the last
        self.chunk_size = chunk_size
        self.channel_mean = self.channel_std = None   # set_channel_stats: latent normalisation

    def set_channel_stats(self, mean, std):
        """Normalise latents channel-wise by these (C,) statistics of the scaled latents (None, None: off)."""
        as_tensor = lambda v: None if v is None else torch.as_tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
        self.channel_mean, self.channel_std = as_tensor(mean), as_tensor(std)
        return self

    def record(self, path=None, subfolder=None):
        """What a checkpoint keeps to rebuild this VAE for decoding: its identity, the local folder it came from (a
        hint), the scaling factor and the normalisation statistics, if any."""
        record = dict(id=self.identifier, path=path, subfolder=subfolder, scaling_factor=self.scaling_factor)
        if self.channel_mean is not None:   # trained on normalised latents: decoding undoes the normalisation
            record.update(channel_mean=self.channel_mean.flatten().tolist(), channel_std=self.channel_std.flatten().tolist())
        return record

    def latent_shape(self, image_channels, image_size):
        """(C, h, w) of the latents of (image_channels, image_size, image_size) images; a mismatch is refused."""
        if image_channels != self.image_channels:
            raise ConfigError(f"the VAE {self.identifier} encodes {self.image_channels}-channel images but the data "
                              f"have {image_channels} channel(s); use vae=none for this data")
        if image_size % self.downsample:
            raise ConfigError(f"data.image_size={image_size} is not divisible by the VAE's downsampling factor "
                              f"{self.downsample}; choose a multiple of {self.downsample}")
        return self.latent_channels, image_size // self.downsample, image_size // self.downsample

    def measure_channel_stats(self, dataset, count, device):
        """(mean, std) per channel of the scaled latents, exact from the posterior moments of `count` images spread
        evenly over `dataset` (items (x, y, ...)), each also mirrored."""
        count = min(count, len(dataset))
        if count < 1:
            raise ConfigError("vae.normalize=true measures the latents on vae.stats_images images; set it to 1 or more")
        indices = np.linspace(0, len(dataset) - 1, count).round().astype(int)
        sums = []
        for chunk in np.array_split(indices, math.ceil(count / 32)):
            x = torch.stack([dataset[int(i)][0] for i in chunk]).to(device)
            sums.append(moment_sums(self.encode_moments(torch.cat([x, x.flip(-1)]))))
        return channel_stats(sums, self.scaling_factor)

    @classmethod
    def from_pretrained(cls, id_or_path, subfolder=None, local_files_only=False, scaling_factor=None,
                        identifier=None, cache_dir=None):
        """Load from a local folder, else from the Hugging Face cache, else (when online) from the hub.

        Any failure to find the weights offline raises FileNotFoundError naming the hub id, the download
        command and the setting `vae.path=/local/folder`.
        """
        source = str(id_or_path)
        local = Path(source).expanduser()
        if local.is_dir():
            autoencoder = _load_autoencoder(str(local), subfolder, True, cache_dir)
            return cls(autoencoder, identifier or local.resolve(), scaling_factor)
        if source.startswith(("/", ".", "~")) or local.exists():
            raise MissingFile(f"the VAE folder {source} does not exist; vae.path must be a folder holding the "
                                    f"AutoencoderKL's config.json and weights (as written by save_pretrained or "
                                    f"`huggingface-cli download <id> --local-dir <folder>`)")
        try:  # the local Hugging Face cache first: no network needed when the weights are there
            autoencoder = _load_autoencoder(source, subfolder, True, cache_dir)
        except OSError as error:
            if local_files_only or hub_offline():
                raise MissingFile(missing_vae_message(
                    source, subfolder, "its weights are not in the local Hugging Face cache and downloads are off "
                    "(offline)")) from error
            try:
                autoencoder = _load_autoencoder(source, subfolder, False, cache_dir)
            except OSError as error:
                raise MissingFile(missing_vae_message(
                    source, subfolder, f"it is not in the local Hugging Face cache and the download failed "
                    f"({str(error).splitlines()[0]})")) from error
        return cls(autoencoder, identifier or source, scaling_factor)

    def _fp32(self, x):
        """x in fp32 on the VAE's device, and a context with no gradients and no autocast."""
        device = next(self.autoencoder.parameters()).device
        return x.to(device, torch.float32), torch.autocast(device.type, enabled=False)

    @torch.no_grad()
    def encode_moments(self, x):
        """Images (N, 3, H, W) in [-1, 1] -> posterior moments (N, 2C, H/d, W/d): mean then log-variance,
        unscaled, log-variance clamped to [-30, 20] as diffusers does."""
        x, no_autocast = self._fp32(x)
        with no_autocast:
            dists = [self.autoencoder.encode(chunk).latent_dist for chunk in x.split(self.chunk_size)]
            return torch.cat([torch.cat([d.mean, d.logvar], dim=1) for d in dists])

    def latents(self, moments, eps=None):
        """Posterior moments (N, 2C, h, w) -> scaled latents z = (mean + std * eps) * scaling_factor;
        eps=None gives the posterior mean."""
        mean, logvar = moments.float().chunk(2, dim=1)
        z = mean if eps is None else mean + torch.exp(0.5 * logvar) * eps
        z = z * self.scaling_factor
        if self.channel_mean is not None:
            z = (z - self.channel_mean.to(z.device)) / self.channel_std.to(z.device)
        return z

    @torch.no_grad()
    def encode(self, x, sample=True, generator=None):
        """Images (N, 3, H, W) in [-1, 1] -> scaled latents (N, C, H/d, W/d): a posterior sample (noise from
        `generator`), or the posterior mean with sample=False."""
        moments = self.encode_moments(x)
        eps = None
        if sample:
            shape = (moments.shape[0], moments.shape[1] // 2, *moments.shape[2:])
            eps = torch.randn(shape, generator=generator, device=moments.device)
        return self.latents(moments, eps)

    @torch.no_grad()
    def decode(self, z):
        """Scaled latents (N, C, h, w) -> fp32 images (N, 3, h*d, w*d) clamped to [-1, 1]."""
        z, no_autocast = self._fp32(z)
        with no_autocast:
            if self.channel_mean is not None:
                z = z * self.channel_std.to(z.device) + self.channel_mean.to(z.device)
            z = z / self.scaling_factor
            return torch.cat([self.autoencoder.decode(chunk).sample for chunk in z.split(self.chunk_size)]).clamp(-1, 1)


def moment_sums(moments):
    """Sums for channel_stats over posterior moments (..., 2C, h, w): {count, sum of mu, sum of mu^2 + var}
    per channel, float64."""
    mean, logvar = moments.double().flatten(0, -4).chunk(2, dim=1)            # (n, C, h, w) each
    return {"count": float(mean.shape[0] * mean.shape[2] * mean.shape[3]),
            "sum": mean.sum((0, 2, 3)).tolist(), "sum_sq": (mean ** 2 + logvar.exp()).sum((0, 2, 3)).tolist()}


def channel_stats(sums, scaling_factor):
    """(mean, std) per channel of the scaled latents z = s * (mu + sigma * eps), from one or more moment_sums."""
    sums = [sums] if isinstance(sums, dict) else list(sums)
    count = sum(s["count"] for s in sums)
    first = torch.tensor([s["sum"] for s in sums], dtype=torch.float64).sum(0) / count
    second = torch.tensor([s["sum_sq"] for s in sums], dtype=torch.float64).sum(0) / count
    mean = scaling_factor * first
    std = scaling_factor * (second - first ** 2).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()


def build_vae(name="none", id=None, path=None, subfolder=None, scaling_factor=None, **unused):
    """The VAE of a conf/vae entry (plain arguments), or None for pixel space (name="none").

    path (a local folder) wins over id (a hub id); the identifier stays the hub id when there is one, so a
    hub VAE copied to a folder is still recognised as itself by latent caches and checkpoints.
    """
    if name == "none":
        return None
    if path is None and id is None:
        raise ConfigError(f"vae={name} needs vae.id (a Hugging Face hub id) or vae.path (a local folder)")
    return VAE.from_pretrained(path if path is not None else id, subfolder=subfolder, scaling_factor=scaling_factor,
                               identifier=id)
