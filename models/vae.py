"""The tokenizers of latent diffusion behind one interface: diffusers' AutoencoderKL (SD-VAE, SDXL, SD3, FLUX,
E2E-VAE, VA-VAE; a Gaussian posterior), AutoencoderDC (DC-AE, Chen et al. 2410.10733) and AutoencoderRAE (RAE, Zheng
et al. 2510.11690; both deterministic encoders).

DiT trains on the latents of Stable Diffusion's VAE (Rombach et al. 2112.10752): 8x downsampling, 4 channels, scaled
by `scaling_factor` (0.18215). This file is the only place that knows how a tokenizer's latents are normalised:

    enc = vae.encode_moments(x)   # the encoder's output, unnormalised: a VAE's posterior [mean; log-variance]
                                  #   (N, 2C, h, w), or a deterministic encoder's latent (N, C, h, w)
    z = vae.latents(enc, eps)     # a posterior sample mean + exp(logvar / 2) * eps (eps=None: the mean; a
                                  #   deterministic encoder draws nothing and ignores eps), then normalised
    x = vae.decode(z)             # back to images in [-1, 1]

Normalisation, as each method defines it. First the published constants of the autoencoder's config (or the conf):
y = (z - shift_factor) * scaling_factor (SD: 0.18215; SDXL: 0.13025; SD3: (z - 0.0609) * 1.5305; FLUX:
(z - 0.1159) * 0.3611; DC-AE: its scaling factor). Then, with `vae.normalize`, statistics of y measured exactly on
the data (from the posterior moments where there is a posterior, E[z^2] = mu^2 + sigma^2; from the latents
otherwise), z = (y - mean) / std:
    scale        SD's recipe measured: std over all elements (mean 0), i.e. z = (z_raw - shift) / std(z_raw)
    shift-scale  SD3 / FLUX's recipe measured: scalar mean and std, z = (z_raw - mean) / std
    channel      LightningDiT's latent_norm (also REPA-E's BatchNorm statistics): per-channel mean and std
    element      RAE's per-element mean and variance: (y - mean) / sqrt(var + 1e-5) (bytetriper/RAE stage1/rae.py)
`latent_sums` gives the sufficient statistics (per element, float64); every granularity derives from them
(`norm_stats`). Statistics of one kind never stand in for another: a mismatch is refused with the fix.

The autoencoder always runs in fp32 with autocast switched off and without gradients, also inside a bf16
training step: its latents are the data, and low-precision encoding would change the data with the precision.
Loading weights is the only I/O here; missing weights on an offline machine stop with the command that fetches them.
"""

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from utils.errors import ConfigError, MissingFile

_TRUE = ("1", "on", "yes", "true")
NORMALIZATIONS = ("none", "scale", "shift-scale", "channel", "element")
KIND_OF = {"scale": "global", "shift-scale": "global", "channel": "channel", "element": "element"}
ELEMENT_EPS = 1e-5   # RAE: z = (z - mean) / sqrt(var + eps), eps = 1e-5 (bytetriper/RAE src/stage1/rae.py)

# Hub ids whose released weights are not a diffusers folder: loading them by id stops with the reason and the fix.
UNCONVERTED = {
    "hustvl/vavae-imagenet256-f16d32-dinov2": (
        "LightningDiT's VA-VAE is released as a latent-diffusion (LDM) checkpoint (vavae-imagenet256-f16d32-dinov2.pt "
        "plus latents_stats.pt), not as a diffusers folder, and diffusers' single-file converter does not map its "
        "attention inside the 16x16 level. Convert it once with `python -m models.vae_convert "
        "vavae-imagenet256-f16d32-dinov2.pt /path/to/va-vae-f16d32` (an AutoencoderKL folder, checked against "
        "LightningDiT's own network) and set vae.path=/path/to/va-vae-f16d32; or use vae=e2e-vae (REPA-E's "
        "end-to-end-tuned VA-VAE, released as an AutoencoderKL)"),
}


#################################################################################
#                                   Helpers                                     #
#################################################################################

def hub_offline():
    """True when Hugging Face downloads are switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), read now."""
    return any(os.environ.get(k, "").lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def missing_vae_message(repo_id, subfolder, reason, option=None):
    """The error for a tokenizer that can be neither found locally nor downloaded: what is missing and how to fix it."""
    name = repo_id.split("/")[-1]
    option = option or name
    sub = f" (subfolder {subfolder!r})" if subfolder else ""
    include = f" --include '{subfolder}/*'" if subfolder else ""
    return (f"cannot load the VAE {repo_id!r}{sub}: {reason}.\n"
            f"Fetch it once on a machine with network access (newer huggingface_hub: `hf download ...`):\n"
            f"    huggingface-cli download {repo_id}{include} --local-dir /local/folder/{name}\n"
            f"(a gated repository, such as SD3's, needs its licence accepted on the hub and a login first), "
            f"then copy the folder here and set\n"
            f"    vae.path=/local/folder/{name}\n"
            f"(sample.py also names the VAE config: vae={option} vae.path=/local/folder/{name}), "
            f"or copy a Hugging Face cache that holds it here and point HF_HOME at it.")


def _load_autoencoder(source, subfolder, local_files_only, cache_dir):
    # AutoModel reads the class from config.json (AutoencoderKL | AutoencoderDC | AutoencoderRAE).
    # low_cpu_mem_usage=False: the default path wants `accelerate` and warns when it is missing.
    from diffusers import AutoModel   # here, not at the top: diffusers costs seconds at start-up a pixel run never needs
    return AutoModel.from_pretrained(source, subfolder=subfolder, local_files_only=local_files_only,
                                     cache_dir=cache_dir, low_cpu_mem_usage=False)


def normalize_mode(value):
    """The conf value of vae.normalize as a mode: false / null -> none, true -> channel (the older boolean)."""
    if value is None or value is False or value == "none":
        return "none"
    if value is True:
        return "channel"
    if value not in NORMALIZATIONS:
        raise ConfigError(f"vae.normalize={value!r}; choose false, scale, shift-scale, channel (or true) or element")
    return value


#################################################################################
#                                The tokenizer                                  #
#################################################################################

class VAE(nn.Module):
    """A tokenizer (AutoencoderKL, AutoencoderDC or AutoencoderRAE) in fp32, frozen, with its latent normalisation.

    identifier: what the tokenizer is, for cache manifests and checkpoints (a hub id, or a folder for local ones).
    scaling_factor: None = the autoencoder config's (AutoencoderRAE: 1, its own config scaling happens inside it).
    normalize: the mode (vae.normalize); None = whatever statistics set_channel_stats is given.
    chunk_size: images per encoder/decoder call (bounds activation memory at large batches).
    """

    def __init__(self, autoencoder, identifier, scaling_factor=None, chunk_size=32, normalize=None):
        from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderRAE
        super().__init__()
        self.autoencoder = autoencoder.float().eval().requires_grad_(False)
        config = autoencoder.config
        self.identifier = str(identifier)
        self.image_size = None   # a fixed image size (RAE's decoder), else any multiple of `downsample`
        if isinstance(autoencoder, AutoencoderKL):
            self.kind, config_scale = "kl", config.scaling_factor
            self.latent_channels, self.image_channels = config.latent_channels, config.in_channels
            self.downsample = 2 ** (len(config.block_out_channels) - 1)   # one halving per encoder block but the last
            self.shift_factor = float(config.shift_factor or 0.0)
        elif isinstance(autoencoder, AutoencoderDC):
            self.kind, config_scale = "dc", config.scaling_factor
            self.latent_channels, self.image_channels = config.latent_channels, config.in_channels
            self.downsample, self.shift_factor = autoencoder.spatial_compression_ratio, 0.0
        elif isinstance(autoencoder, AutoencoderRAE):
            self.kind, config_scale = "rae", 1.0   # AutoencoderRAE.encode applies its config's own scaling already
            self.latent_channels, self.image_channels = config.encoder_hidden_size, config.num_channels
            grid = math.isqrt(autoencoder.num_patches)                    # tokens per side: the latent's h = w
            self.image_size = autoencoder.decoder_image_size
            self.downsample, self.shift_factor = self.image_size // grid, 0.0
        else:
            raise ConfigError(f"{identifier}: a {type(autoencoder).__name__} is not a tokenizer this code wraps "
                              f"(AutoencoderKL, AutoencoderDC or AutoencoderRAE)")
        self.stochastic = self.kind == "kl"   # a Gaussian posterior to sample from; else a deterministic latent
        self.scaling_factor = float(config_scale if scaling_factor is None else scaling_factor)
        self.chunk_size = chunk_size
        self.normalize = None if normalize is None else normalize_mode(normalize)
        self.channel_mean = self.channel_std = None   # set_channel_stats: the normalisation's statistics

    @property
    def encoding_channels(self):
        """Channels of encode_moments' output: 2C (posterior mean and log-variance) or C (a deterministic latent)."""
        return 2 * self.latent_channels if self.stochastic else self.latent_channels

    def train(self, mode=True):
        """Always frozen in eval mode (AutoencoderRAE would add training noise to its latents in train mode)."""
        return super().train(False)

    def set_channel_stats(self, mean, std=None):
        """Normalise latents by these statistics of y = (z - shift) * scale: scalars (scale, shift-scale), (C,)
        (channel) or (C, h, w) (element) `mean` and `std`; or `mean` = raw-latent sums (latent_sums: from a latent
        cache or measured), from which those of this tokenizer's `normalize` mode are derived. (None, None): off."""
        if isinstance(mean, dict):
            if self.normalize in (None, "none"):
                raise ConfigError("latent statistics were given but no normalisation is chosen; set vae.normalize")
            mean, std = norm_stats(mean, self.normalize, self.shift_factor, self.scaling_factor)
        if mean is None:
            self.channel_mean = self.channel_std = None
            return self
        mean, std = (torch.as_tensor(v, dtype=torch.float32) for v in (mean, std))
        kind = {0: "global", 1: "channel", 3: "element"}.get(mean.ndim)
        if kind is None or mean.shape != std.shape or (mean.ndim and mean.shape[0] != self.latent_channels):
            raise ConfigError(f"latent statistics of shape {tuple(mean.shape)} do not fit the {self.latent_channels}-"
                              f"channel latents of {self.identifier}; use the tokenizer they were computed for")
        if self.normalize == "none":
            raise ConfigError(f"these latents were normalised {_describe(kind)} (the checkpoint records its "
                              f"statistics), but vae.normalize=false; leave vae.normalize as the model was trained")
        if self.normalize is not None and KIND_OF[self.normalize] != kind:
            raise ConfigError(f"vae.normalize={self.normalize} needs {_describe(KIND_OF[self.normalize])} statistics "
                              f"but was given {_describe(kind)} ones: a checkpoint records the normalisation it was "
                              f"trained with (sample with that vae.normalize); a latent cache made before this kind "
                              f"of statistics gets them by re-running its extract_latents.py command (no re-encoding)")
        self.normalize = self.normalize or {"global": "shift-scale", "channel": "channel", "element": "element"}[kind]
        view = {"global": (1, 1, 1, 1), "channel": (1, -1, 1, 1), "element": (1, *mean.shape)}[kind]
        self.channel_mean, self.channel_std = mean.view(view), std.view(view)
        return self

    def _check_stats(self):
        if self.normalize not in (None, "none") and self.channel_mean is None:
            raise ConfigError(f"vae.normalize={self.normalize} needs the statistics of the latents and none were set: "
                              f"training takes them from the latent cache's manifest or measures them; sampling takes "
                              f"them from the checkpoint, so a checkpoint without them was trained without "
                              f"normalisation: sample it with vae.normalize=false")

    def record(self, path=None, subfolder=None):
        """What a checkpoint keeps to rebuild this tokenizer for decoding: its identity, the local folder it came from
        (a hint), the scaling factor (the shift, when there is one) and the normalisation statistics, if any."""
        record = dict(id=self.identifier, path=path, subfolder=subfolder, scaling_factor=self.scaling_factor)
        if self.shift_factor:
            record["shift_factor"] = self.shift_factor
        if self.channel_mean is not None:   # trained on normalised latents: decoding undoes the normalisation
            kind = KIND_OF[self.normalize]   # global: floats; channel: (C,) lists; element: (C, h, w) nested lists
            as_list = lambda t: float(t) if kind == "global" else (t.flatten() if kind == "channel" else t[0]).tolist()
            record.update(normalize=self.normalize, channel_mean=as_list(self.channel_mean),
                          channel_std=as_list(self.channel_std))
        return record

    def latent_shape(self, image_channels, image_size):
        """(C, h, w) of the latents of (image_channels, image_size, image_size) images; a mismatch is refused."""
        if image_channels != self.image_channels:
            raise ConfigError(f"the VAE {self.identifier} encodes {self.image_channels}-channel images but the data "
                              f"have {image_channels} channel(s); use vae=none for this data")
        if self.image_size is not None and image_size != self.image_size:
            raise ConfigError(f"the tokenizer {self.identifier} decodes {self.image_size}x{self.image_size} images "
                              f"only (RAE's decoder has a fixed size) but data.image_size={image_size}; set "
                              f"data.image_size={self.image_size} or use its decoder for that size")
        if image_size % self.downsample:
            raise ConfigError(f"data.image_size={image_size} is not divisible by the VAE's downsampling factor "
                              f"{self.downsample}; choose a multiple of {self.downsample}")
        return self.latent_channels, image_size // self.downsample, image_size // self.downsample

    def measure_channel_stats(self, dataset, count, device):
        """(raw-latent sums, None) of `count` images spread evenly over `dataset` (items (x, y, ...)), each also
        mirrored: set_channel_stats derives the statistics of vae.normalize from them, exactly."""
        count = min(count, len(dataset))
        if count < 1:
            raise ConfigError("vae.normalize measures the latents on vae.stats_images images; set it to 1 or more")
        indices = np.linspace(0, len(dataset) - 1, count).round().astype(int)
        sums = []
        for chunk in np.array_split(indices, math.ceil(count / 32)):
            x = torch.stack([dataset[int(i)][0] for i in chunk]).to(device)
            sums.append(latent_sums(self.encode_moments(torch.cat([x, x.flip(-1)])), self.stochastic))
        return add_sums(sums), None

    @classmethod
    def from_pretrained(cls, id_or_path, subfolder=None, local_files_only=False, scaling_factor=None,
                        identifier=None, cache_dir=None, normalize=None, option=None):
        """Load from a local folder, else from the Hugging Face cache, else (when online) from the hub.

        Any failure to find the weights offline raises FileNotFoundError naming the hub id, the download
        command and the setting `vae.path=/local/folder` (`option`: the conf/vae name to suggest).
        """
        source = str(id_or_path)
        local = Path(source).expanduser()
        kwargs = dict(scaling_factor=scaling_factor, normalize=normalize)
        if local.is_dir():
            autoencoder = _load_autoencoder(str(local), subfolder, True, cache_dir)
            return cls(autoencoder, identifier or local.resolve(), **kwargs)
        if source.startswith(("/", ".", "~")) or local.exists():
            raise MissingFile(f"the VAE folder {source} does not exist; vae.path must be a folder holding the "
                              f"autoencoder's config.json and weights (as written by save_pretrained or "
                              f"`huggingface-cli download <id> --local-dir <folder>`)")
        if source in UNCONVERTED:
            raise ConfigError(f"cannot load {source!r} by its hub id: {UNCONVERTED[source]}")
        try:  # the local Hugging Face cache first: no network needed when the weights are there
            autoencoder = _load_autoencoder(source, subfolder, True, cache_dir)
        except OSError as error:
            if local_files_only or hub_offline():
                raise MissingFile(missing_vae_message(
                    source, subfolder, "its weights are not in the local Hugging Face cache and downloads are off "
                    "(offline)", option)) from error
            try:
                autoencoder = _load_autoencoder(source, subfolder, False, cache_dir)
            except OSError as error:
                raise MissingFile(missing_vae_message(
                    source, subfolder, f"it is not in the local Hugging Face cache and the download failed "
                    f"({str(error).splitlines()[0]})", option)) from error
        return cls(autoencoder, identifier or source, **kwargs)

    def _fp32(self, x):
        """x in fp32 on the VAE's device, and a context with no gradients and no autocast."""
        device = next(self.autoencoder.parameters()).device
        return x.to(device, torch.float32), torch.autocast(device.type, enabled=False)

    @torch.no_grad()
    def encode_moments(self, x):
        """Images (N, 3, H, W) in [-1, 1] -> the encoder's output, unnormalised: posterior moments (N, 2C, h, w), mean
        then log-variance clamped to [-30, 20] as diffusers does; or a deterministic latent (N, C, h, w)."""
        x, no_autocast = self._fp32(x)
        with no_autocast:
            if self.kind == "rae":
                x = (x + 1) / 2   # RAE's encoder takes [0, 1] images (it applies DINOv2's ImageNet mean / std)
            parts = []
            for chunk in x.split(self.chunk_size):
                out = self.autoencoder.encode(chunk)
                if self.stochastic:
                    parts.append(torch.cat([out.latent_dist.mean, out.latent_dist.logvar], dim=1))
                else:
                    parts.append(out.latent)
            return torch.cat(parts)

    def latents(self, moments, eps=None):
        """Encoder outputs -> normalised latents: z = mean + std * eps for a posterior (eps=None: the mean), the
        latent itself for a deterministic encoder (eps ignored), then ((z - shift) * scale - mean) / std."""
        self._check_stats()
        if self.stochastic:
            mean, logvar = moments.float().chunk(2, dim=1)
            z = mean if eps is None else mean + torch.exp(0.5 * logvar) * eps
        else:
            z = moments.float()   # no posterior: nothing is drawn
        if self.shift_factor:
            z = z - self.shift_factor
        z = z * self.scaling_factor
        if self.channel_mean is not None:
            z = (z - self.channel_mean.to(z.device)) / self.channel_std.to(z.device)
        return z

    @torch.no_grad()
    def encode(self, x, sample=True, generator=None):
        """Images (N, 3, H, W) in [-1, 1] -> normalised latents (N, C, H/d, W/d): a posterior sample (noise from
        `generator`), or the posterior mean with sample=False; a deterministic encoder's latent either way."""
        moments = self.encode_moments(x)
        eps = None
        if sample and self.stochastic:
            shape = (moments.shape[0], moments.shape[1] // 2, *moments.shape[2:])
            eps = torch.randn(shape, generator=generator, device=moments.device)
        return self.latents(moments, eps)

    @torch.no_grad()
    def decode(self, z):
        """Normalised latents (N, C, h, w) -> fp32 images (N, 3, h*d, w*d) clamped to [-1, 1]."""
        self._check_stats()
        z, no_autocast = self._fp32(z)
        with no_autocast:
            if self.channel_mean is not None:
                z = z * self.channel_std.to(z.device) + self.channel_mean.to(z.device)
            z = z / self.scaling_factor
            if self.shift_factor:
                z = z + self.shift_factor
            x = torch.cat([self.autoencoder.decode(chunk).sample for chunk in z.split(self.chunk_size)])
            if self.kind == "rae":
                x = x * 2 - 1   # RAE decodes to [0, 1]
            return x.clamp(-1, 1)


#################################################################################
#                                  Statistics                                   #
#################################################################################

def _describe(kind):
    return {"global": "with scalar (mean, std)", "channel": "per channel", "element": "per element"}[kind]


def latent_sums(encodings, stochastic):
    """Exact sufficient statistics of the raw latents of encoder outputs (n, 2C | C, h, w), float64 numpy per
    element: {count, sum of E[z], sum of E[z^2]}; a posterior adds its variance, E[z^2] = mu^2 + exp(logvar)."""
    enc = encodings.double().flatten(0, -4)
    if stochastic:
        mean, logvar = enc.chunk(2, dim=1)
        second = mean ** 2 + logvar.exp()
    else:
        mean, second = enc, enc ** 2
    return {"count": float(mean.shape[0]), "sum": mean.sum(0).cpu().numpy(), "sum_sq": second.sum(0).cpu().numpy()}


def add_sums(sums):
    """One latent_sums from several (shards, chunks)."""
    sums = list(sums)
    return {"count": sum(s["count"] for s in sums), "sum": sum(np.asarray(s["sum"], np.float64) for s in sums),
            "sum_sq": sum(np.asarray(s["sum_sq"], np.float64) for s in sums)}


def norm_stats(sums, mode, shift=0.0, scale=1.0):
    """(mean, std) of y = (z - shift) * scale for a normalisation mode, from latent_sums: floats (scale: mean 0;
    shift-scale), (C,) lists (channel) or (C, h, w) nested lists (element, std = sqrt(var + ELEMENT_EPS))."""
    total, first, second = sums["count"], np.asarray(sums["sum"], np.float64), np.asarray(sums["sum_sq"], np.float64)
    axes = {"scale": (0, 1, 2), "shift-scale": (0, 1, 2), "channel": (1, 2), "element": ()}[mode]
    count = total * (np.prod([first.shape[a] for a in axes]) if axes else 1)
    mean_z, second_z = first.sum(axes) / count, second.sum(axes) / count
    var_y = np.clip(second_z - mean_z ** 2, 0, None) * scale ** 2
    mean_y = (mean_z - shift) * scale
    std_y = np.sqrt(var_y + ELEMENT_EPS) if mode == "element" else np.sqrt(var_y)
    if mode == "scale":
        mean_y = 0.0 * mean_y
    return mean_y.tolist(), std_y.tolist()


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


def build_vae(name="none", id=None, path=None, subfolder=None, scaling_factor=None, normalize=False, downsample=None,
              latent_channels=None, **unused):
    """The tokenizer of a conf/vae entry (plain arguments), or None for pixel space (name="none").

    path (a local folder) wins over id (a hub id); the identifier stays the hub id when there is one, so a hub
    tokenizer copied to a folder is still recognised as itself by latent caches and checkpoints. downsample and
    latent_channels, when given, are what the entry says the tokenizer is: a folder holding another is refused.
    """
    if name == "none":
        return None
    if path is None and id is None:
        raise ConfigError(f"vae={name} needs vae.id (a Hugging Face hub id) or vae.path (a local folder)")
    vae = VAE.from_pretrained(path if path is not None else id, subfolder=subfolder, scaling_factor=scaling_factor,
                              identifier=id, normalize=normalize_mode(normalize), option=name)
    for key, expected in (("downsample", downsample), ("latent_channels", latent_channels)):
        if expected is not None and getattr(vae, key) != expected:
            raise ConfigError(f"vae={name} is a tokenizer with {key}={expected}, but {path or id} holds one with "
                              f"{key}={getattr(vae, key)}; point vae.path at a copy of {id or name}")
    return vae
