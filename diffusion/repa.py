"""REPA (Yu et al. 2025, "Representation Alignment for Generation", sihyun-yu/REPA): align the hidden tokens of one
block with a frozen vision encoder's patch features of the clean image.

    loss = objective loss + coeff * mean over tokens and batch of -cos(projector(h_i), z_i)

h_i are the output tokens of block `depth` (1-based, as in REPA: depth 8 of SiT-XL/2's 28), taken by a forward hook
on that block, so the network keeps its model(x, t, y) contract and knows nothing of REPA. The projector is
REPA's MLP (Linear D->2048, SiLU, Linear 2048->2048, SiLU, Linear 2048->encoder width; Xavier-uniform, zero
biases), trained with the network (its own optimizer with the same settings) and saved in the checkpoint, but not
needed to sample. z_i come from the encoder under no_grad, so its weights never receive a gradient.

iREPA (Singh et al. 2025, "What matters for Representation Alignment", arXiv 2512.10794, End2End-Diffusion/iREPA)
changes two things, each an option here: `projector=conv`, one k x k convolution (k = 3) over the token grid instead
of the MLP, so each projected token sees its neighbours; `spatial_norm=true`, the targets z normalised over the tokens
of each image (z - gamma * mean, then / std), which removes what all patches share and leaves the spatial contrast.
The normalisation acts on the targets as the loss sees them: after any resampling to the network's grid, on features
from the encoder or from a cache (which stores them raw). Parity with the official code: tests/test_repa.py.

Encoders (`repa.encoder`):
- `digits`: the digits network's 4x4 grid of 128-d features (models/digits_net.py, the FD-digits network), DiT-Mini/2's
  token grid on the bundled 8x8 digits: REPA on a laptop, nothing to download.
- `dinov2-vit-s|b|l|g`: timm's `vit_{small,base,large,giant}_patch14_dinov2.lvd142m` from a local weights file
  (`repa.weights`; built by models/dinov2.py), with REPA's preprocessing: images in [0, 1], ImageNet mean/std, then
  a bicubic resize to 224 * resolution / 256 (no antialiasing); the patch tokens after the final norm
  (x_norm_patchtokens).
When the encoder's token grid differs from the network's, the encoder features are resampled to the network's grid
(area-averaged when shrinking, bilinear when growing), and a warning says so once. A latent cache made with
`extract_latents.py repa.encoder=...` holds the features of both flips, and then no encoder runs in training.
"""

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import LatentCacheDataset
from models.digits_net import load_digits_net
from models.dinov2 import IMAGENET_MEAN, IMAGENET_STD, VARIANTS as DINOV2, build_dinov2
from utils.errors import ConfigError

ENCODERS = ("digits", *(f"dinov2-vit-{k}" for k in DINOV2))
PROJECTORS = ("mlp", "conv")


def projector(hidden_size, projector_dim, z_dim, seed=0):
    """REPA's MLP, applied to every token; Xavier-uniform weights and zero biases (the network's own init), drawn
    from their own generator, so they do not depend on what was built before (an encoder or not)."""
    mlp = nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                        nn.SiLU(), nn.Linear(projector_dim, z_dim))
    generator = torch.Generator().manual_seed(seed)
    for layer in mlp:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight, generator=generator)
            nn.init.zeros_(layer.bias)
    return mlp


class ConvProjector(nn.Module):
    """iREPA's projector: one kernel_size x kernel_size convolution, stride 1, zero padding that keeps the grid, over
    the tokens laid out on the network's (h, w) grid (row-major, as patchify orders them). The layer is called
    `projection_layer`, as in iREPA's ProjectionLayer, so the two state_dicts have the same keys. Its init is
    PyTorch's default for Conv2d (iREPA keeps it: its init touches only Linear layers), from its own generator."""

    def __init__(self, hidden_size, z_dim, grid, kernel_size=3, seed=0):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"repa.projector_kernel={kernel_size}: the conv projector keeps the token grid with an "
                              f"odd kernel only (iREPA: 3; 1 is a per-token linear map)")
        self.grid = tuple(grid)
        self.projection_layer = nn.Conv2d(hidden_size, z_dim, kernel_size, padding=kernel_size // 2)
        generator = torch.Generator().manual_seed(seed)
        nn.init.kaiming_uniform_(self.projection_layer.weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(hidden_size * kernel_size ** 2)                 # 1 / sqrt(fan_in)
        nn.init.uniform_(self.projection_layer.bias, -bound, bound, generator=generator)

    def forward(self, h):
        n, _, d = h.shape                                                    # (N, T = h * w, D)
        maps = h.transpose(1, 2).reshape(n, d, *self.grid)                  # (N, D, h, w)
        return self.projection_layer(maps).flatten(2).transpose(1, 2)       # (N, T, z_dim)


def build_projector(kind, hidden_size, projector_dim, z_dim, grid, kernel_size=3, seed=0):
    """`repa.projector`: REPA's MLP (mlp; projector_dim wide) or iREPA's convolution (conv; kernel_size)."""
    if kind == "conv":
        return ConvProjector(hidden_size, z_dim, grid, kernel_size, seed)
    return projector(hidden_size, projector_dim, z_dim, seed)


def spatial_normalize(z, gamma=0.6, eps=1e-6):
    """iREPA's spatial normalisation of encoder tokens (N, T, d), per image and channel over the T tokens:
    (z - gamma * mean) / (std + eps), std with Bessel's correction (torch.std), in float32. gamma = 0.6 is iREPA's
    latent-diffusion default (its pixel-space JiT script: 0.8)."""
    z = z.float()
    return (z - gamma * z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + eps)


def alignment_loss(projected, target):
    """Per sample: the mean over tokens of -cos(projected token, encoder token); (N, T, d) x 2 -> (N,)."""
    projected = F.normalize(projected.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    return -(projected * target).sum(-1).mean(-1)


def resample_tokens(z, grid):
    """Encoder tokens (N, T, d) on a square grid -> (N, h * w, d) on the network's (h, w) grid."""
    side = math.isqrt(z.shape[1])
    if side * side != z.shape[1]:
        raise ConfigError(f"REPA: the encoder gives {z.shape[1]} tokens, not a square grid")
    if (side, side) == tuple(grid):
        return z
    maps = z.transpose(1, 2).reshape(z.shape[0], z.shape[2], side, side)
    shrink = grid[0] <= side and grid[1] <= side
    maps = F.adaptive_avg_pool2d(maps, grid) if shrink else F.interpolate(maps, size=grid, mode="bilinear")
    return maps.flatten(2).transpose(1, 2)


class DigitsEncoder:
    """The digits network's spatial features: images in [-1, 1] (N, 1, 8, 8) -> (N, 16, 128)."""

    width = 128

    def __init__(self, device):
        self.net = load_digits_net()[0].to(device)

    def __call__(self, images):
        if images.shape[1:] != (1, 8, 8):
            raise ConfigError(f"repa.encoder=digits reads 8x8 grey digits; these images are "
                             f"{tuple(images.shape[1:])}: use repa.encoder=dinov2-vit-b (or -s, -l, -g)")
        return self.net(images.float())["spatial"]


class DINOv2Encoder:
    """DINOv2 patch features with REPA's preprocessing: images in [-1, 1] (N, 3, H, W) -> (N, T, width)."""

    def __init__(self, name, weights, resolution, device):
        self.size = 224 * max(1, resolution // 256)
        self.model = build_dinov2(weights, DINOV2[name[-1]], img_size=self.size, used_for=f"the REPA encoder {name}",
                                  setting="repa.weights=PATH").to(device)
        self.width = self.model.embed_dim
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __call__(self, images):
        x = (images.float() + 1) / 2                              # [-1, 1] -> [0, 1], REPA's x / 255
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate((x - self.mean) / self.std, size=(self.size, self.size), mode="bicubic")
        return self.model.forward_features(x)[:, self.model.num_prefix_tokens:]


def build_encoder(name, weights=None, resolution=256, device="cpu"):
    """The frozen encoder called `name` (ENCODERS); weights: the DINOv2 file; resolution: the images' size."""
    if name == "digits":
        return DigitsEncoder(device)
    if name in ENCODERS:
        return DINOv2Encoder(name, weights, resolution, device)
    raise ConfigError(f"unknown repa.encoder={name!r}; choose one of {', '.join(ENCODERS)} (null = REPA off)")


class REPA:
    """The alignment term for train.py: built on the bare network (its hook goes on block `depth` before any
    wrapping), `start` before the first step, `targets` of each step's clean images, `add_loss` after each forward
    pass. Holds the projector and, once started, its optimizer `opt`."""

    def __init__(self, model, encoder, depth=8, coeff=0.5, projector_dim=2048, weights=None, image_size=256,
                 device="cpu", stored_width=None, seed=0, projector="mlp", projector_kernel=3, spatial_norm=False,
                 spatial_norm_gamma=0.6):
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise ConfigError(f"repa aligns a transformer block's tokens; {type(model).__name__} has no blocks "
                             f"(use a DiT or LightningDiT model, or repa.encoder=null)")
        if getattr(model, "block_type", None) == "in-context":
            raise ConfigError("repa aligns one token per patch; the in-context block type adds two tokens to the "
                             "sequence: use adaLN-Zero, adaLN or cross-attn blocks with REPA")
        if not 1 <= depth <= len(blocks):
            raise ConfigError(f"repa.depth={depth} but the model has {len(blocks)} blocks; choose 1..{len(blocks)} "
                             f"(REPA aligns block 8 of SiT-XL/2's 28; DiT-Mini/2 on the digits: 2)")
        if projector not in PROJECTORS:
            raise ConfigError(f"unknown repa.projector={projector!r}; choose mlp (REPA) or conv (iREPA)")
        # With features stored in a latent cache (stored_width = their width), no encoder is loaded.
        self.encoder = None if stored_width else build_encoder(encoder, weights=weights, resolution=image_size,
                                                               device=device)
        self.name, self.depth, self.coeff = encoder, depth, coeff
        self.spatial_norm, self.spatial_norm_gamma = spatial_norm, spatial_norm_gamma
        self.grid = tuple(model.grid_size)
        if spatial_norm and self.grid[0] * self.grid[1] < 2:
            raise ConfigError("repa.spatial_norm=true normalises over the tokens of an image; this network has one")
        width, hidden_size = stored_width or self.encoder.width, model.pos_embed.shape[-1]
        self.projector = build_projector(projector, hidden_size, projector_dim, width, self.grid, projector_kernel,
                                         seed).to(device)
        self.module = self.projector     # what the loop calls: the projector, or its DDP wrapper
        self.opt = None
        self.hidden = None
        self.hook = blocks[depth - 1].register_forward_hook(self._keep)
        self._warned = False

    def start(self, make_optimizer, world_size=1, device=None, state=None):
        """Before the first step: restore a checkpoint's `state` (state_dict()), wrap the projector in its own DDP
        under several processes (under DDP and FSDP alike: it is small) and give it an optimizer, `self.opt`."""
        if state is not None:
            self.projector.load_state_dict(state["projector"])
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.module = DDP(self.projector, device_ids=[device.index] if device.type == "cuda" else None)
        self.opt = make_optimizer(self.projector.parameters())
        if state is not None:
            self.opt.load_state_dict(state["opt"])
        return self

    def state_dict(self):
        """What a checkpoint keeps: the projector and its optimizer."""
        return {"projector": self.projector.state_dict(), "opt": self.opt.state_dict()}

    def _keep(self, module, args, output):
        self.hidden = output

    @torch.no_grad()
    def targets(self, images, stored=None, flip=None):
        """The step's alignment targets (N, T_model, width): the stored features of the flip each item uses
        (stored: (N, 2, T, d) from the cache), else the encoder's features of the (flipped) clean images."""
        if stored is None:
            return self.encode(images)
        return self.on_grid(torch.where(flip[:, None, None], stored[:, 1], stored[:, 0]))

    @torch.no_grad()
    def encode(self, images):
        """Encoder features of the clean images (N, T_model, width), on the network's token grid."""
        return self.on_grid(self.encoder(images))

    def on_grid(self, z):
        """Encoder tokens (N, T, d) -> the targets: on the network's grid, then spatially normalised if asked."""
        if z.shape[1] != self.grid[0] * self.grid[1] and not self._warned:
            side = math.isqrt(z.shape[1])
            warnings.warn(f"REPA: the encoder {self.name} gives a {side}x{side} token grid and the network "
                          f"{self.grid[0]}x{self.grid[1]}; the encoder features are resampled to the network's grid")
            self._warned = True
        z = resample_tokens(z, self.grid)
        return spatial_normalize(z, self.spatial_norm_gamma) if self.spatial_norm else z

    def add_loss(self, losses, z):
        """The objective's per-sample losses plus coeff * alignment; the two parts are also returned on their own
        (`objective_loss`, `repa_loss`), so runs with and without REPA compare on the same number."""
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError(f"REPA: block {self.depth} did not run in this forward pass")
        dtype = next(self.projector.parameters()).dtype
        repa = alignment_loss(self.module(hidden.to(dtype)), z)
        return {**losses, "loss": losses["loss"] + self.coeff * repa, "objective_loss": losses["loss"],
                "repa_loss": repa}

    def parameters(self):
        return list(self.projector.parameters())


def build_repa(model, dataset, encoder=None, depth=8, coeff=0.5, projector_dim=2048, weights=None, image_size=256,
               cache=None, device="cpu", seed=0, projector="mlp", projector_kernel=3, spatial_norm=False,
               spatial_norm_gamma=0.6):
    """REPA's term for training `model` on `dataset` (conf/train.yaml's repa settings), or None when encoder is None.
    On a latent cache (no images to encode) the cache must hold this encoder's features; they are then read with
    the latents and no encoder is loaded (the cache holds them raw: spatial_norm applies when they are read)."""
    if not encoder:
        return None
    stored = None
    if isinstance(dataset, LatentCacheDataset):
        stored = dataset.repa
        if not stored or stored["encoder"] != encoder:
            raise ConfigError(f"repa.encoder={encoder} with data=latents needs the encoder's features in the latent "
                              f"cache {cache}, which holds {'those of ' + stored['encoder'] if stored else 'none'}; "
                              f"make a cache with them (python extract_latents.py ... repa.encoder={encoder} "
                              f"repa.weights=PATH) or train from images (data=imagefolder with vae=...)")
        dataset.with_repa_features = True
    return REPA(model, encoder, depth=depth, coeff=coeff, projector_dim=projector_dim, weights=weights,
                image_size=dataset.resolution if stored else image_size, device=device,
                stored_width=stored and stored["width"], seed=seed, projector=projector,
                projector_kernel=projector_kernel, spatial_norm=spatial_norm, spatial_norm_gamma=spatial_norm_gamma)

