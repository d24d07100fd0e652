"""DiT^DH: a DiT trunk followed by a wide, shallow "DDT head" (Zheng, Ma, Tong & Xie, "Diffusion Transformers with
Representation Autoencoders", arXiv 2510.11690; official code: github.com/bytetriper/RAE, src/stage2/models/DDT.py).

Read top to bottom: the timestep embedder -> the model -> the size table. Everything else is DiT's (models/dit.py).

Why a head: RAE's latents are wide tokens (768 channels of DINOv2-B per 16x16 token). Denoising them needs a
network at least as wide as a token, and widening the whole DiT is costly; DiT^DH keeps a standard trunk and adds a
couple of wide blocks at the end (DiT^DH-XL: 28 blocks of width 1152, then 2 of width 2048).

Data flow (official class DiTwDDTHead):

    c = silu(t_emb + y_emb)                                     (N, D_s)   one vector per sample
    s = trunk(s_embedder(x) + pos_embed; c)                     (N, T, D_s) LightningDiT blocks, adaLN on c
    s = s_projector(silu(t_emb + s))                            (N, T, D_h) the trunk's tokens become ...
    x = head(x_embedder(x); s)                                  (N, T, D_h) ... a per-token condition of the head
    out = final_layer(x; s) -> unpatchify                       (N, C_out, H, W)

The head re-embeds the *noisy input* x at its own width (no absolute positions, only RoPE) and is conditioned token
by token on the trunk's output through adaLN (DiTBlock and FinalLayer take per-token conditioning). The blocks are
LightningDiT's (RMSNorm, SwiGLU, 2-D RoPE by default), the timestep goes through random Fourier features rather
than DiT's sinusoids, and the conditioning is passed through a SiLU before the blocks' own SiLU, as in the official
code.

The state_dict has the official key names and shapes (blocks 0..depth[0]-1 are the trunk, the rest the head), so a
released RAE stage-2 checkpoint loads with `strict=True`; tests/test_ditdh.py checks the outputs against the
official network. Unlike the official code the network does no label dropout and no guidance (the training step and
the sampler do), id `num_classes` is the null class, and any patch size and non-square inputs work (the official code
is square and patch-1 only). The official network predicts a velocity with t = 0 data and t = 1 noise (its
transport's ICPlan); docs/models.md says how to use one of its checkpoints with our SiT-style flows.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from utils.errors import ConfigError

from .dit import (DIT_SIZES, MLPS, NORMS, DiT, DiTBlock, FinalLayer, LabelEmbedder, RoPE2d, check_heads, patch_grid,
                  sincos_2d, zero_init_adaln)


#################################################################################
#                              Timestep embedding                               #
#################################################################################

class GaussianFourierEmbedder(nn.Module):
    """t -> [sin(2π t W), cos(2π t W)] with W ~ N(0, scale²) drawn once and fixed (random Fourier features,
    Tancik et al. 2020), then a 2-layer MLP. Made for t in [0, 1]: a flow's time, not DDPM's 0..999. W is a buffer
    (never trained; the official code keeps it as a frozen parameter under the same name)."""

    def __init__(self, hidden_size, embedding_size=256, scale=1.0):
        super().__init__()
        self.register_buffer("W", torch.randn(embedding_size) * scale)
        self.mlp = nn.Sequential(
            nn.Linear(2 * embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t):
        angles = t[:, None] * self.W[None, :] * 2 * torch.pi                     # (N, E), the official product order
        features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)     # (N, 2E)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


#################################################################################
#                                  The model                                    #
#################################################################################

def _pair(value, name, single=False):
    """(trunk, head) from a pair, or (with single) the same value for both."""
    pair = tuple(value) if isinstance(value, (list, tuple)) else ((value, value) if single else (value,))
    if len(pair) != 2:
        hint = "" if len(pair) != 1 else (" (model.width, which sets one width, does not apply: set "
                                          "model.kwargs.hidden_size=[trunk, head] and num_heads)")
        raise ConfigError(f"DiTDH's {name} is a pair (trunk, head), got {value!r}{hint}")
    return pair


class DiTDH(nn.Module):
    """DiT with a DDT head: a trunk of depth[0] blocks of width hidden_size[0], then depth[1] head blocks of width
    hidden_size[1] conditioned token by token on the trunk's output (module docstring).

    input_size: an int or (H, W), each divisible by patch_size (16 for RAE's 768x16x16 DINOv2-B latents).
    depth, hidden_size, num_heads: pairs (trunk, head); num_heads may be one int for both.
    num_classes: number of real classes; id num_classes is the null class.
    learn_sigma: output 2C channels (not in the official model, which predicts a velocity: learn_sigma=False).
    norm, mlp, rope, qk_norm, wo_shift: LightningDiT's block options (models/dit.py), here defaulting to the
        official DiT^DH's (RMSNorm, SwiGLU, RoPE); use_pos_embed: add the fixed sin-cos positions to the trunk's
        tokens (the head never gets them).
    """

    def __init__(
        self,
        input_size=16,
        patch_size=1,
        in_channels=768,
        hidden_size=(1152, 2048),
        depth=(28, 2),
        num_heads=(16, 16),
        mlp_ratio=4.0,
        num_classes=1000,
        learn_sigma=False,
        norm="rmsnorm",
        mlp="swiglu",
        rope=True,
        qk_norm=False,
        wo_shift=False,
        use_pos_embed=True,
    ):
        super().__init__()
        height, width = patch_grid(input_size, patch_size)
        (trunk_width, head_width), (trunk_depth, head_depth) = _pair(hidden_size, "hidden_size"), _pair(depth, "depth")
        trunk_heads, head_heads = _pair(num_heads, "num_heads", single=True)
        check_heads(trunk_width, trunk_heads)
        check_heads(head_width, head_heads)
        if norm not in NORMS or mlp not in MLPS:
            raise ConfigError(f"norm={norm!r}, mlp={mlp!r}: choose norm from {', '.join(NORMS)} and mlp from "
                              f"{', '.join(MLPS)}")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.trunk_depth = trunk_depth
        self.grid_size = (height // patch_size, width // patch_size)

        # Trunk: embeds x at its width, with the conditioning of every DiT.
        self.s_embedder = PatchEmbed((height, width), patch_size, in_channels, trunk_width, bias=True)
        self.t_embedder = GaussianFourierEmbedder(trunk_width)
        self.y_embedder = LabelEmbedder(num_classes, trunk_width)
        # Fixed sin-cos positions for the trunk only; a buffer (the official code: a frozen parameter, same key).
        if use_pos_embed:
            self.register_buffer("pos_embed", sincos_2d(trunk_width, *self.grid_size).unsqueeze(0))
        else:
            self.pos_embed = None
        # Head: embeds the same x again at its own width; the trunk's tokens reach it through s_projector.
        self.x_embedder = PatchEmbed((height, width), patch_size, in_channels, head_width, bias=True)
        self.s_projector = nn.Linear(trunk_width, head_width) if trunk_width != head_width else nn.Identity()
        # One rotary table per width, under the official names.
        self.enc_feat_rope = RoPE2d(trunk_width // trunk_heads, *self.grid_size) if rope else None
        self.dec_feat_rope = RoPE2d(head_width // head_heads, *self.grid_size) if rope else None

        options = dict(norm=norm, mlp=mlp, qk_norm=qk_norm, wo_shift=wo_shift)
        self.blocks = nn.ModuleList(
            [DiTBlock(trunk_width, trunk_heads, mlp_ratio, **options) for _ in range(trunk_depth)]
            + [DiTBlock(head_width, head_heads, mlp_ratio, **options) for _ in range(head_depth)])
        self.final_layer = FinalLayer(head_width, patch_size, self.out_channels, norm=norm)
        self.initialize_weights()

    def initialize_weights(self):
        """The official initialisation, in one place. Unlike DiT's, the linear layers keep PyTorch's default
        (Kaiming-uniform) initialisation: the official model's Xavier pass is off in every released config."""
        # Patch embeddings: Xavier-uniform on the flattened kernel (a linear map), zero bias.
        for embedder in (self.s_embedder, self.x_embedder):
            w = embedder.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(embedder.proj.bias)

        # Label table and the timestep MLP's weights: N(0, 0.02) (their biases keep the default).
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        zero_init_adaln(self.blocks, self.final_layer)   # trunk and head: identity blocks, initial prediction 0

    # The head's output is laid out as DiT's: (N, T, p*p*C_out) -> (N, C_out, H, W).
    unpatchify = DiT.unpatchify

    def forward(self, x, t, y=None):
        """
        x: (N, C, H, W) latents; t: (N,) times in [0, 1]; y: (N,) class ids, or None for the null class.
        Returns (N, C_out, H, W).
        """
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        t = self.t_embedder(t)                               # (N, D_s)
        c = F.silu(t + self.y_embedder(y))                   # (N, D_s)
        s = self.s_embedder(x)                               # (N, T, D_s), T = H * W / p^2
        if self.pos_embed is not None:
            s = s + self.pos_embed
        rope = self.enc_feat_rope() if self.enc_feat_rope is not None else None
        for block in self.blocks[: self.trunk_depth]:
            s = block(s, c, rope)                            # (N, T, D_s)
        s = self.s_projector(F.silu(t.unsqueeze(1) + s))     # (N, T, D_h): the head's per-token condition
        x = self.x_embedder(x)                               # (N, T, D_h)
        rope = self.dec_feat_rope() if self.dec_feat_rope is not None else None
        for block in self.blocks[self.trunk_depth:]:
            x = block(x, s, rope)                            # (N, T, D_h)
        x = self.final_layer(x, s)                           # (N, T, p^2 * C_out)
        return self.unpatchify(x)                            # (N, C_out, H, W)


#################################################################################
#                                  Size table                                   #
#################################################################################

# The head every released DiT^DH uses (RAE's stage-2 configs): 2 blocks of width 2048 with 16 heads. The trunks are
# DiT's sizes (models/dit.py). S and XL are the official configs (configs/stage2/training/ImageNet256/DiTDH-{S,XL}_
# DINOv2-B.yaml; S is also XL's autoguidance model); B is not in the official repository: DiT-B's trunk with the
# same head, by the same rule. All take patch size 1 (256 tokens on 768x16x16 latents).
DDT_HEAD = dict(depth=2, hidden_size=2048, num_heads=16)
DITDH_OPTIONS = dict(norm="rmsnorm", mlp="swiglu", rope=True, qk_norm=False, wo_shift=False, use_pos_embed=True)
DITDH_NAMES = ("S/1", "B/1", "XL/1")


def _ditdh_constructor(name):
    size, patch_size = name.split("/")
    trunk = DIT_SIZES[size]
    pairs = {key: (trunk[key], DDT_HEAD[key]) for key in ("depth", "hidden_size", "num_heads")}

    def build(**kwargs):
        return DiTDH(**{"patch_size": int(patch_size), **pairs, **DITDH_OPTIONS, **kwargs})
    build.__name__ = f"DiTDH_{size}_{patch_size}"
    build.__doc__ = f"DiTDH-{name}: DiT-{size}'s trunk with patch size {patch_size}, then a 2 x 2048 DDT head."
    return build


# "DiTDH-XL/1" -> constructor: DiTDH_models["DiTDH-XL/1"](input_size=16, in_channels=768, num_classes=1000).
DiTDH_models = {f"DiTDH-{name}": _ditdh_constructor(name) for name in DITDH_NAMES}
