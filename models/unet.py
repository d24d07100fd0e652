"""U-Net baselines: class-conditional ADM-style U-Nets on diffusers' UNet2DModel, called like DiT.

Read top to bottom: helpers -> the model -> size table (the family matched to DiT, then reference configs).

The network is ADM's (Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", 2105.05233,
Sec. 3): residual blocks whose GroupNorm is modulated by the timestep + class embedding ("AdaGN", the
scale-shift norm), residual blocks doing the down- and upsampling ("BigGAN up/downsampling"), multi-head
self-attention with 64 channels per head at chosen levels and in the middle, and num_res_blocks residual
blocks per level on the way down (num_res_blocks + 1 on the way up, each fed a skip connection).
diffusers builds the blocks; this file chooses them, initialises them like ADM, and wraps them to the
`model(x, t, y) -> Tensor` contract every network here shares: y is (N,) class ids, id `num_classes` is
the null class used for classifier-free guidance (num_class_embeds = num_classes + 1), and with
`learn_sigma` the output has 2C channels (epsilon, then the variance interpolation v).

The one reference model that is not ADM-style, LDM-4, conditions on the class through cross-attention
in transformer blocks; it is built on UNet2DConditionModel (same diffusers blocks, plus the transformer
layers) so that its parameters and Gflops are those of the published network (see UNET_REFERENCE_SIZES).
"""

import torch
import torch.nn as nn
from utils.errors import ConfigError

from .dit import GUIDANCE_CONDITIONS, refuse_unbuilt_conditions

CONDITIONINGS = ("adagn", "cross-attn")


#################################################################################
#                                   Helpers                                     #
#################################################################################

def check_levels_fit(height, width, channel_mult):
    """Raise if an input of height x width cannot be halved once per level after the first."""
    num_levels = len(channel_mult)
    factor = 2 ** (num_levels - 1)
    if height % factor or width % factor:
        halvings = 0
        while height % 2 ** (halvings + 1) == 0 and width % 2 ** (halvings + 1) == 0:
            halvings += 1
        fits = channel_mult[:halvings + 1]
        raise ConfigError(
            f"a U-Net with {num_levels} levels halves its input {num_levels - 1} times, so height and width must "
            f"be divisible by {factor}, but the input is {height}x{width}; pass at most {len(fits)} level(s) in "
            f"the model's kwargs (e.g. channel_mult={list(fits)}, with attention_levels among their indices) "
            f"or resize the data (e.g. data.image_size) to a multiple of {factor}"
        )


def block_types(num_levels, attention_levels, resblock_updown, cross_attn):
    """diffusers block names for each level on the way down, and on the way up (deepest level first)."""
    down, up = [], []
    for level in range(num_levels):
        if level in attention_levels:
            down.append("CrossAttnDownBlock2D" if cross_attn else "AttnDownBlock2D")
            up.append("CrossAttnUpBlock2D" if cross_attn else "AttnUpBlock2D")
        elif resblock_updown:
            down.append("ResnetDownsampleBlock2D")
            up.append("ResnetUpsampleBlock2D")
        else:
            down.append("DownBlock2D")
            up.append("UpBlock2D")
    return tuple(down), tuple(reversed(up))


#################################################################################
#                                  The model                                    #
#################################################################################

class UNet(nn.Module):
    """Class-conditional U-Net, ADM-style by default; `model(x, t, y)` as for DiT. The defaults build UNet-B.

    input_size: an int or (H, W), each divisible by 2^(len(channel_mult) - 1).
    num_classes: number of real classes; id num_classes is the null class (y=None means it). An
        unconditional model is num_classes=0.
    learn_sigma: output 2C channels, epsilon then the variance interpolation v (improved DDPM).
    model_channels, channel_mult: level i has model_channels * channel_mult[i] channels at resolution
        H / 2^i; the timestep embedding has 4 * model_channels (ADM).
    num_res_blocks: residual blocks per level going down (one more per level coming up).
    attention_levels: indices of the levels with attention blocks (there is always one in the middle).
    head_channels: channels per attention head (ADM's num_head_channels=64); None gives one head.
    resblock_updown: residual blocks do the down/upsampling (ADM); else a strided conv / nearest + conv.
    conditioning: "adagn" (ADM: the class embedding is added to the timestep embedding, which scales and
        shifts every GroupNorm) or "cross-attn" (LDM: the class embedding, context_dim wide, is a one-token
        context for transformer blocks at the attention levels; the timestep embedding plainly adds).
    second_time: also condition on a second time `dt` (N,) (MeanFlow's t - r, a shortcut model's step size: see
        models/dit.py) through sinusoidal features and an MLP of its own (`dt_embedder`, shaped as the timestep's),
        added to the timestep embedding; off: no such module, diffusers' keys and computation as they were.
    guidance_cond: also condition on iMF's guidance `guidance` (N, 3) = (1 - 1/omega, t_min, t_max) (models/dit.py),
        each through sinusoidal features and an MLP of its own shaped as dt's (`omega_embedder`, `t_min_embedder`,
        `t_max_embedder`), added to the timestep embedding; off: no such modules.
    """

    def __init__(
        self,
        input_size=32,
        in_channels=4,
        num_classes=1000,
        learn_sigma=True,
        model_channels=192,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=4,
        attention_levels=(1, 2, 3),
        head_channels=64,
        resblock_updown=True,
        dropout=0.0,
        norm_groups=32,
        conditioning="adagn",
        context_dim=512,
        second_time=False,
        guidance_cond=False,
    ):
        super().__init__()
        height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        channels = tuple(model_channels * m for m in channel_mult)
        if conditioning not in CONDITIONINGS:
            raise ConfigError(f"unknown conditioning {conditioning!r}; choose one of {', '.join(CONDITIONINGS)}")
        if conditioning == "cross-attn" and resblock_updown:
            raise ConfigError("cross-attn conditioning (LDM) down/upsamples with convs: pass resblock_updown=False")
        check_levels_fit(height, width, channel_mult)
        if any(level not in range(len(channels)) for level in attention_levels):
            raise ConfigError(f"attention_levels {tuple(attention_levels)} must index the {len(channels)} levels")
        if any(c % norm_groups for c in channels):
            raise ConfigError(f"level widths {channels} must all be divisible by norm_groups={norm_groups}")
        if head_channels is not None and any(channels[i] % head_channels for i in (*attention_levels, -1)):
            raise ConfigError(f"the widths {channels} of the attention levels and the middle must be divisible by "
                             f"head_channels={head_channels}")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.conditioning = conditioning

        cross_attn = conditioning == "cross-attn"
        down, up = block_types(len(channels), set(attention_levels), resblock_updown, cross_attn)
        common = dict(
            sample_size=(height, width),
            in_channels=in_channels,
            out_channels=self.out_channels,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=channels,
            layers_per_block=num_res_blocks,
            dropout=dropout,
            norm_num_groups=norm_groups,
            flip_sin_to_cos=True,  # [cos, sin] timestep features with frequencies 10000^(-i/half): ADM's
            freq_shift=0,
        )
        # diffusers is imported where a U-Net is built: it costs seconds at start-up that a DiT run never needs.
        from diffusers import UNet2DConditionModel, UNet2DModel
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.resnet import ResnetBlock2D
        if cross_attn:
            # LDM: the label's embedding is the cross-attention context; the null class is its last row.
            self.class_embedder = nn.Embedding(num_classes + 1, context_dim)
            # diffusers' old naming: for this class `attention_head_dim` is the number of heads.
            heads = [1 if head_channels is None else c // head_channels for c in channels]
            # LDM's residual blocks: plain GroupNorm, the timestep embedding added after the first conv.
            self.unet = UNet2DConditionModel(**common, cross_attention_dim=context_dim, attention_head_dim=heads)
        else:
            self.unet = UNet2DModel(
                **common,
                num_class_embeds=num_classes + 1,
                attention_head_dim=head_channels,
                resnet_time_scale_shift="scale_shift",  # ADM's AdaGN: GroupNorm(h) * (1 + scale) + shift
                downsample_type="resnet" if resblock_updown else "conv",
                upsample_type="resnet" if resblock_updown else "conv",
                # diffusers drops the middle attention's GroupNorm under scale-shift; ADM has one.
                attn_norm_num_groups=norm_groups,
            )
        # get_up_block does not forward `dropout` to attention up blocks; set it on every residual block.
        for module in self.unet.modules():
            if isinstance(module, ResnetBlock2D):
                module.dropout.p = dropout
        # A plain float: muP's output multiplier base_width / width on conv_out's input (models/mup.py); 1.0 = SP.
        self.readout_scale = 1.0
        self.unet.conv_out.register_forward_pre_hook(self._scale_readout_input)
        # The second time (and iMF's guidance conditions) enter where the timestep embedding leaves unet.time_embedding
        # (a forward hook), so self.unet keeps diffusers' modules and keys; forward() hands the hook its inputs.
        embedder = lambda: nn.Sequential(Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0),
                                         TimestepEmbedding(channels[0], 4 * channels[0]))
        self.dt_embedder, self._dt = (embedder() if second_time else None), None
        self.omega_embedder, self.t_min_embedder, self.t_max_embedder = (
            [embedder() for _ in GUIDANCE_CONDITIONS] if guidance_cond else [None] * 3)
        self._guidance = None
        if second_time or guidance_cond:
            self.unet.time_embedding.register_forward_hook(self._add_second_time)
        self.initialize_weights()

    def initialize_weights(self):
        """PyTorch's default initialisation, except that every residual branch and the output start at zero.

        This is what ADM does with its `zero_module` calls: it zero-initialises the last conv of each residual
        block, the output projection of each attention block and the final conv, so each block starts as the
        identity on its skip path and the first prediction is exactly 0 (as with DiT's adaLN-Zero). LDM does
        the same, except that in its transformer blocks it zeroes the block's output projection (proj_out)
        rather than the attention layers' own.
        """
        from diffusers import Transformer2DModel
        from diffusers.models.attention_processor import Attention
        from diffusers.models.resnet import ResnetBlock2D
        for module in self.unet.modules():
            if isinstance(module, ResnetBlock2D):
                nn.init.zeros_(module.conv2.weight)
                nn.init.zeros_(module.conv2.bias)
            elif isinstance(module, Transformer2DModel):  # only with cross-attn (LDM)
                nn.init.zeros_(module.proj_out.weight)
                nn.init.zeros_(module.proj_out.bias)
            elif isinstance(module, Attention) and self.conditioning == "adagn":
                nn.init.zeros_(module.to_out[0].weight)
                nn.init.zeros_(module.to_out[0].bias)
        nn.init.zeros_(self.unet.conv_out.weight)
        nn.init.zeros_(self.unet.conv_out.bias)

    def _scale_readout_input(self, conv_out, args):
        """Forward pre-hook of unet.conv_out: multiply its input by readout_scale (a bound method, so a deepcopy
        (EMA) hooks the copy's own scale); nothing changes at 1.0."""
        return None if self.readout_scale == 1.0 else (args[0] * self.readout_scale, *args[1:])

    def guidance_embedders(self):
        """The embedders of iMF's guidance conditions, in the order of `guidance`'s columns ([] when not built)."""
        return [e for e in (self.omega_embedder, self.t_min_embedder, self.t_max_embedder) if e is not None]

    def _add_second_time(self, time_embedding, args, emb):
        """Forward hook of unet.time_embedding: the timestep embedding plus the second time's and the guidance
        conditions' (in models built with them; a bound method, so a deepcopy (EMA) hooks the copy's own embedders)."""
        if self.dt_embedder is not None:
            emb = emb + self.dt_embedder[1](self.dt_embedder[0](self._dt).to(emb.dtype))
        for i, embedder in enumerate(self.guidance_embedders()):
            emb = emb + embedder[1](embedder[0](self._guidance[:, i]).to(emb.dtype))
        return emb

    def forward(self, x, t, y=None, dt=None, guidance=None):
        """
        x: (N, C, H, W) images or latents; t: (N,) timesteps, int or float; y: (N,) class ids, or None for
        the null class; dt: (N,) the second time (models built with second_time only; None: zeros); guidance: (N, 3)
        iMF's (1 - 1/omega, t_min, t_max) (models built with guidance_cond only; None: zeros). Returns
        (N, C_out, H, W).
        """
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t              # (N,)
        refuse_unbuilt_conditions(self, dt, guidance)
        if self.dt_embedder is not None:
            self._dt = torch.zeros(t.shape, device=x.device) if dt is None else torch.as_tensor(dt).expand(t.shape)
        if self.omega_embedder is not None:
            self._guidance = torch.zeros(*t.shape, len(GUIDANCE_CONDITIONS), device=x.device) if guidance is None \
                else guidance
        try:
            if self.conditioning == "cross-attn":
                context = self.class_embedder(y)[:, None]               # (N, 1, context_dim)
                return self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]  # (N, C_out, H, W)
            return self.unet(x, t, class_labels=y, return_dict=False)[0]                   # (N, C_out, H, W)
        finally:
            self._dt, self._guidance = None, None


#################################################################################
#                                  Size table                                   #
#################################################################################

# The family matched to DiT in forward Gflops at 32x32x4 (the DiT paper's 256x256 setting). Every member has
# the same layout: ADM's blocks on improved DDPM's 32x32 U-Net (Nichol & Dhariwal 2102.09672, CIFAR-10:
# widths x(1, 2, 2, 2) at 32, 16, 8, 4), attention at every level below full resolution (as in LDM-4 and
# ADM's 64x64 model) and four residual blocks per level; only the width grows. With this layout the
# parameter counts also land near DiT's (docs/models.md has the table; tests/test_unet.py checks it):
#   UNet-S   41.1M   6.46 Gflops  (DiT-S/2   33.0M   6.06: +6.7%)
#   UNet-B  163.5M  25.34 Gflops  (DiT-B/2  130.5M  23.01: +10.1%)
#   UNet-L  548.1M  84.39 Gflops  (DiT-L/2  458.1M  80.70: +4.6%)
#   UNet-XL 765.2M 117.66 Gflops  (DiT-XL/2 675.1M 118.62: -0.8%)
# (Widths go in steps of 32: GroupNorm's 32 groups and 64-channel heads at the x2 levels need it.)
_FAMILY = dict(channel_mult=(1, 2, 2, 2), attention_levels=(1, 2, 3), num_res_blocks=4)
UNET_SIZES = {
    "S": dict(model_channels=96, **_FAMILY),
    "B": dict(model_channels=192, **_FAMILY),
    "L": dict(model_channels=352, **_FAMILY),
    "XL": dict(model_channels=416, **_FAMILY),
}
# Not in any paper: a CPU-sized member for the bundled digits (8x8x1) and CI, matched to DiT-T/2
# (3.3M, 0.76 Gflops at 32x32x4 against 4.4M, 0.83: -9.0%). Three levels, so 8x8 inputs bottom out at 2x2.
EXTRA_SIZES = {"T": dict(model_channels=32, channel_mult=(1, 2, 2), attention_levels=(1, 2), num_res_blocks=4)}
# The DiT each U-Net is matched to.
DIT_MATCH = {"T": "DiT-T/2", "S": "DiT-S/2", "B": "DiT-B/2", "L": "DiT-L/2", "XL": "DiT-XL/2"}

# Not in any paper: the U-Nets of the CPU scaling study on the digits (experiment=scaling-digits), matched in
# forward Gflops at the digits' 8x8x1 to DiT-{T,S}/{8,4,2} there (UNet-T matches DiT-T/2 at 8x8 too: -3.5%).
# Widths 16 and 32 need GroupNorm over 8 groups and 16-channel heads at the smallest sizes:
#   UNet-T8 0.0047 Gflops (DiT-T/8 0.0042: +13.6%)   UNet-S8 0.0353 (DiT-S/8 0.0324: +8.6%)
#   UNet-T4 0.0108        (DiT-T/4 0.0122: -11.0%)   UNet-S4 0.1096 (DiT-S/4 0.0963: +13.8%)
#   UNet-T  0.0430        (DiT-T/2 0.0446: -3.5%)    UNet-S2 0.3848 (DiT-S/2 0.3533: +8.9%)
_DIGITS = dict(channel_mult=(1, 2, 2), attention_levels=(1, 2))
DIGITS_SIZES = {
    "T8": dict(model_channels=16, channel_mult=(1, 2), attention_levels=(1,), num_res_blocks=1, norm_groups=8,
               head_channels=16),
    "T4": dict(model_channels=16, num_res_blocks=4, norm_groups=8, head_channels=16, **_DIGITS),
    "S8": dict(model_channels=32, num_res_blocks=3, **_DIGITS),
    "S4": dict(model_channels=64, num_res_blocks=2, **_DIGITS),
    "S2": dict(model_channels=96, num_res_blocks=4, **_DIGITS),
}
DIGITS_MATCH = {"T8": "DiT-T/8", "T4": "DiT-T/4", "T": "DiT-T/2", "S8": "DiT-S/8", "S4": "DiT-S/4", "S2": "DiT-S/2"}

# Reference U-Nets the DiT paper compares against (its Sec. 5.1 and Fig. 2 right: "LDM-4 (103.6 Gflops)",
# "ADM (1120 Gflops)"), each at its own input. Our configs reproduce the published numbers; measured with
# models.model_stats at the input given in REFERENCE_PUBLISHED, learned sigma on:
#   UNet-ADM-256  553.8M (published 554M, -0.03%)  1119.8 Gflops (published 1120, -0.02%)
#   UNet-LDM-4    401.4M (published 400M, +0.4%)    104.2 Gflops (published 103.6, +0.6%)
UNET_REFERENCE_SIZES = {
    # ADM, the class-conditional ImageNet 256x256 pixel-space model (Dhariwal & Nichol 2105.05233; the
    # 256x256 conditional model's flags in openai/guided-diffusion's README: --num_channels 256
    # --channel_mult 1,1,2,2,4,4 (the default at 256) --attention_resolutions 32,16,8 --num_head_channels 64
    # --num_res_blocks 2 --resblock_updown True --use_scale_shift_norm True --learn_sigma True). 554M
    # parameters: LDM paper Table 3; 1120 Gflops: DiT paper Sec. 5.1 and appendix Table 6.
    "ADM-256": dict(model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attention_levels=(3, 4, 5),
                    head_channels=64, resblock_updown=True, conditioning="adagn"),
    # LDM-4, the class-conditional ImageNet latent U-Net on 64x64x3 VQ-f4 latents (Rombach et al. 2112.10752;
    # configs/latent-diffusion/cin256-v2.yaml: model_channels 192, channel_mult 1,2,3,5, attention_resolutions
    # 8,4,2 (downsampling factors, so levels 1-3), one head, one transformer block with a 512-d class context,
    # plain GroupNorm, conv down/upsampling). 400M parameters: LDM paper Table 3; 103.6 Gflops: DiT paper
    # Sec. 5.1. LDM-4 has a fixed variance (3 output channels); with learn_sigma=False ours has 401.43M and
    # 104.23 Gflops, so learned sigma costs 5k parameters.
    "LDM-4": dict(model_channels=192, channel_mult=(1, 2, 3, 5), num_res_blocks=2, attention_levels=(1, 2, 3),
                  head_channels=None, resblock_updown=False, conditioning="cross-attn", context_dim=512),
}
# The published numbers and the input (C, H, W) they are for.
REFERENCE_PUBLISHED = {
    "ADM-256": dict(input_shape=(3, 256, 256), params=554e6, gflops=1120.0),
    "LDM-4": dict(input_shape=(3, 64, 64), params=400e6, gflops=103.6),
}


def _constructor(name, config):
    def build(**kwargs):
        return UNet(**{**config, **kwargs})
    build.__name__ = f"UNet_{name.replace('-', '_')}"
    build.__doc__ = f"UNet-{name}: {config}."
    return build


# "UNet-B" -> constructor taking the keyword arguments every model takes: UNet_models["UNet-B"](input_size=32).
UNet_models = {f"UNet-{name}": _constructor(name, config)
               for name, config in {**UNET_SIZES, **EXTRA_SIZES, **DIGITS_SIZES, **UNET_REFERENCE_SIZES}.items()}
