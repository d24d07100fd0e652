"""Diffusion Transformer (DiT), Peebles & Xie, "Scalable Diffusion Models with Transformers" (2212.09748).

Read top to bottom: helpers -> embedders -> blocks -> final layer -> model -> size table.

The state_dict of `DiT` (with the default adaLN-Zero block) has exactly the key names and shapes of the
official facebookresearch/DiT implementation, so the released checkpoints load with `strict=True`.
Unlike the official code, the network does no label dropout and no classifier-free guidance: both belong
to the training step and the sampler (see `diffusion/guidance.py`). The label `num_classes` is the null
(unconditional) class.

LightningDiT's block options (Yao et al. 2025, hustvl/LightningDiT), each off by default: `norm="rmsnorm"`,
`mlp="swiglu"`, `rope=True` (2-D axial rotary embedding on q and k; the sin-cos `pos_embed` is still added),
`qk_norm=True` and `wo_shift=True` (adaLN without the shifts). With them on, the state_dict has the official
LightningDiT key names and shapes (the identity key mapping), so its checkpoints load with `strict=True`.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention as TimmAttention
from timm.models.vision_transformer import Block
from utils.errors import ConfigError

BLOCK_TYPES = ("adaLN-Zero", "adaLN", "cross-attn", "in-context")
NORMS = ("layernorm", "rmsnorm")
# iMF's guidance conditions, the columns of `guidance` (diffusion/imeanflow.py): 1 - 1/omega, interval start and end.
GUIDANCE_CONDITIONS = ("omega", "t_min", "t_max")
MLPS = ("gelu", "swiglu")


def refuse_unbuilt_conditions(net, dt, guidance):
    """A DiT's or U-Net's second time `dt` or iMF guidance conditions, given to a network built without their
    embedders (second_time, guidance_cond): refused, naming the objective that builds them."""
    if net.dt_embedder is None and dt is not None:
        raise ConfigError("this network was built without second_time, so it takes no dt; the one-step "
                          "objectives (diffusion=meanflow | shortcut) build it with one")
    if net.omega_embedder is None and guidance is not None:
        raise ConfigError("this network was built without guidance_cond, so it takes no guidance conditions; "
                          "diffusion=meanflow diffusion.variant=imf builds it with them")


#################################################################################
#                                   Helpers                                     #
#################################################################################

def patch_grid(input_size, patch_size):
    """(H, W) of input_size (an int or (H, W)), refused unless patch_size divides both."""
    height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if height % patch_size or width % patch_size:
        raise ConfigError(f"input size {height}x{width} is not divisible by the patch size {patch_size}; "
                          f"choose a patch size that divides it or resize the data (e.g. data.image_size)")
    return height, width


def check_heads(hidden_size, num_heads):
    """Refuse a width the attention heads do not divide."""
    if hidden_size % num_heads:
        raise ConfigError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")


def per_token(v):
    """A conditioning vector per sample (N, D) as (N, 1, D), to broadcast over the tokens; one per token (N, T, D),
    as DiT^DH's head has (models/ditdh.py), as it is."""
    return v.unsqueeze(1) if v.dim() == 2 else v


def init_linears(model):
    """ViT's init of every nn.Linear in `model`: Xavier-uniform weights, zero biases."""
    def init(module):
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    model.apply(init)


def zero_init_adaln(blocks, final_layer):
    """adaLN-Zero: zero the blocks' modulation regressors (every gate starts at 0: each block is the identity; pass
    no blocks to leave them) and the final layer's modulation and readout (the initial prediction is exactly 0)."""
    for block in blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    for layer in (final_layer.adaLN_modulation[-1], final_layer.linear):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def modulate(x, shift, scale):
    """adaLN: scale and shift the normalised tokens (N, T, D) by per-sample (N, D) or per-token (N, T, D) vectors;
    no shift if None."""
    x = x * (1 + per_token(scale))
    return x if shift is None else x + per_token(shift)


def approx_gelu():
    # The paper's MLP uses the tanh approximation of GELU (as the official code does).
    return nn.GELU(approximate="tanh")


def sincos_1d(dim, pos):
    """1-D sin-cos embedding (Vaswani et al. 2017) of positions (M,) -> (M, dim), computed in float64."""
    assert dim % 2 == 0, f"sin-cos embedding needs an even width, got {dim}"
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    out = pos.reshape(-1, 1).double() * omega[None]                                     # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)                          # (M, dim)


def sincos_2d(dim, grid_h, grid_w):
    """Fixed 2-D sin-cos positional embedding (MAE convention) for a grid_h x grid_w token grid.

    Tokens are in row-major order; the first half of the channels encodes the column (x) index and the
    second half the row (y) index, which is what the released DiT checkpoints were trained with.
    """
    assert dim % 4 == 0, f"2-D sin-cos embedding needs a width divisible by 4, got {dim}"
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, xs), sincos_1d(dim // 2, ys)], dim=1).float()  # (H*W, dim)


def rope_tables(head_dim, grid_h, grid_w, theta=10000):
    """cos and sin tables (T, head_dim) of a 2-D axial rotary embedding for a grid_h x grid_w token grid.

    The first half of a head's channels rotates with the token's row, the second half with its column, at
    frequencies theta^(-2i/(head_dim/2)); each frequency drives one adjacent channel pair (2i, 2i+1). Tokens are
    row-major, as PatchEmbed orders them. Positions and frequencies are computed in fp32 exactly as
    LightningDiT's VisionRotaryEmbeddingFast computes them, so the tables are bit-equal to its buffers.
    """
    half = head_dim // 2
    if head_dim % 4:
        raise ConfigError(f"rope needs a head width divisible by 4, got {head_dim} (hidden_size / num_heads)")
    freqs = 1.0 / theta ** (torch.arange(0, half, 2)[: half // 2].float() / half)            # (half/2,)

    def axis(n):
        pos = torch.arange(n) / n * n                                                          # fp32 positions
        return (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)                      # (n, half)
    rows, cols = axis(grid_h), axis(grid_w)
    angles = torch.cat([rows[:, None].expand(grid_h, grid_w, half), cols[None].expand(grid_h, grid_w, half)], -1)
    angles = angles.reshape(grid_h * grid_w, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each adjacent channel pair of x (N, heads, T, head_dim) by its token's angles; the rotation is
    computed in the tables' precision and returned in x's dtype."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)   # (x1, x2) -> (-x2, x1)
    return (x * cos + rotated * sin).to(x.dtype)


class RoPE2d(nn.Module):
    """Holds the rotary tables as buffers (saved, under LightningDiT's names freqs_cos / freqs_sin)."""

    def __init__(self, head_dim, grid_h, grid_w):
        super().__init__()
        cos, sin = rope_tables(head_dim, grid_h, grid_w)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self):
        return self.freqs_cos, self.freqs_sin


#################################################################################
#                     Normalisation, attention and MLP layers                   #
#################################################################################

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), normalised in fp32 whatever x's dtype; the
    learnable weight starts at 1."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(kind, dim):
    """The blocks' and the final layer's norm: LayerNorm without affine (DiT) or RMSNorm (LightningDiT)."""
    return RMSNorm(dim) if kind == "rmsnorm" else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention, with optional QK-norm (per head:
    RMSNorm with norm="rmsnorm", else an affine LayerNorm) and rotary embedding (applied after the QK-norm).
    With neither, it computes exactly what timm's Attention computes, under the same key names. attn_drop / proj_drop:
    dropout on the attention weights / after the output projection while training (JiT's; 0 = none, the default)."""

    def __init__(self, dim, num_heads, qk_norm=False, norm="layernorm", attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop else nn.Identity()   # no parameters: the keys stay
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        make_qk_norm = lambda: (RMSNorm(head_dim) if norm == "rmsnorm" else nn.LayerNorm(head_dim))
        self.q_norm = make_qk_norm() if qk_norm else nn.Identity()
        self.k_norm = make_qk_norm() if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        N, T, D = x.shape
        q, k, v = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        drop = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)                        # (N, h, T, D/h)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(N, T, D)))


class SwiGLU(nn.Module):
    """w3(silu(a) * b) with (a, b) = w12(x) split in two (Shazeer 2020); LightningDiT's key names. drop: dropout on
    silu(a) * b while training (JiT's; 0 = none, the default)."""

    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop else nn.Identity()

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.drop(F.silu(a) * b))


def make_mlp(kind, dim, mlp_ratio, drop=0.0):
    """GELU(tanh) MLP of width ratio * dim (DiT), or SwiGLU of width int(2/3 * ratio * dim), which has the same
    parameters and flops (LightningDiT). drop: dropout while training (SwiGLU: on its hidden activations; GELU: timm's
    Mlp, after the activation and after fc2); 0 by default."""
    hidden = int(dim * mlp_ratio)
    return SwiGLU(dim, int(2 / 3 * hidden), drop) if kind == "swiglu" else Mlp(dim, hidden, act_layer=approx_gelu,
                                                                                 drop=drop)


#################################################################################
#               Embedding layers for timesteps and class labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a (possibly fractional) timestep, then a 2-layer MLP (DDPM / ADM)."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """(N,) timesteps -> (N, dim) features [cos(t w_i), sin(t w_i)], w_i = max_period^(-i/half)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = F.pad(embedding, (0, 1))
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        # Under autocast the MLP runs in low precision; the features themselves are fp32.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """A table of num_classes + 1 vectors; the last row is the null class used for guidance."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes

    def forward(self, y):
        return self.embedding_table(y)


#################################################################################
#                                   Blocks                                      #
#################################################################################

class DiTBlock(nn.Module):
    """Transformer block conditioned by adaptive layer norm (adaLN), with or without the zero-init gates.

    adaLN-Zero (paper Sec. 3.2): the conditioning c regresses shift, scale and a gate per branch; the gate
    is initialised to zero so every block starts as the identity. c is one vector per sample (N, D) or one per
    token (N, T, D) (DiT^DH's head). attn_drop / proj_drop: training-time dropout (JiT's; off by default).
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, gated=True, norm="layernorm", mlp="gelu",
                 qk_norm=False, wo_shift=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.gated, self.wo_shift = gated, wo_shift
        self.norm1 = make_norm(norm, hidden_size)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, norm=norm, attn_drop=attn_drop,
                              proj_drop=proj_drop)
        self.norm2 = make_norm(norm, hidden_size)
        self.mlp = make_mlp(mlp, hidden_size, mlp_ratio, drop=proj_drop)
        # Per branch: shift (unless wo_shift), scale, gate (unless ungated adaLN).
        self.chunks = (2 if wo_shift else 3) - (0 if gated else 1)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * self.chunks * hidden_size))

    def forward(self, x, c, rope=None):
        # In LightningDiT's order: [shift_msa], scale_msa, [gate_msa], [shift_mlp], scale_mlp, [gate_mlp].
        params = iter(self.adaLN_modulation(c).chunk(2 * self.chunks, dim=-1))
        take = lambda used: next(params) if used else None
        shift_msa, scale_msa, gate_msa = take(not self.wo_shift), take(True), take(self.gated)
        shift_mlp, scale_mlp, gate_mlp = take(not self.wo_shift), take(True), take(self.gated)
        h = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + (h if gate_msa is None else per_token(gate_msa) * h)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + (h if gate_mlp is None else per_token(gate_mlp) * h)


class CrossAttention(nn.Module):
    """Multi-head attention from the image tokens (queries) to a short conditioning sequence."""

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, context):
        N, T, D = x.shape
        q = self.q(x).view(N, T, self.num_heads, -1).transpose(1, 2)                      # (N, h, T, D/h)
        k, v = self.kv(context).view(N, -1, 2, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)                                      # (N, h, T, D/h)
        return self.proj(out.transpose(1, 2).reshape(N, T, D))


class CrossAttentionBlock(nn.Module):
    """Paper Sec. 3.2 "cross-attention block": a cross-attention layer over [t, y] after self-attention."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = TimmAttention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=approx_gelu)

    def forward(self, x, context):
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm_cross(x), context)
        x = x + self.mlp(self.norm2(x))
        return x


class FinalLayer(nn.Module):
    """adaLN, then a linear map from each token to its p x p x C_out patch."""

    def __init__(self, hidden_size, patch_size, out_channels, norm="layernorm"):
        super().__init__()
        self.norm_final = make_norm(norm, hidden_size)   # LightningDiT keeps the shift here even with wo_shift
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c, readout_scale=1.0):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        x = modulate(self.norm_final(x), shift, scale)
        # muP's output multiplier on the readout's input (models/mup.py); 1.0 (SP) leaves the official computation.
        return self.linear(x if readout_scale == 1.0 else x * readout_scale)


#################################################################################
#                                  The model                                    #
#################################################################################

class DiT(nn.Module):
    """Diffusion model with a Transformer backbone: patchify -> N blocks -> unpatchify.

    input_size: an int or (H, W), each divisible by patch_size (latent 32 for 256x256 images).
    num_classes: number of real classes; id num_classes is the null class. An unconditional model is
        num_classes=0, called with y=None (or all zeros).
    learn_sigma: output 2C channels, epsilon then the variance interpolation v (improved DDPM).
    block_type: "adaLN-Zero" (default), "adaLN", "cross-attn" or "in-context" (paper Fig. 3 / Table 4).
    norm, mlp, rope, qk_norm, wo_shift: LightningDiT's options for the adaLN blocks (module docstring).
    second_time: also condition on a second time `dt` (N,), the length of the jump the objective asks for (MeanFlow's
        t - r, a shortcut model's step size), through an embedder of its own (`dt_embedder`, as `t_embedder`) whose
        output adds to t's embedding, as the official MeanFlow DiT adds its h embedding. Off (the default): no such
        module, the official state_dict.
    guidance_cond: also condition on the guidance of improved MeanFlow (iMF, diffusion/imeanflow.py), three scalars
        per sample `guidance` (N, 3) = (1 - 1/omega, t_min, t_max): the guidance scale and the interval it applies in,
        each through an embedder of its own shaped as `t_embedder` (`omega_embedder`, `t_min_embedder`,
        `t_max_embedder`, the official iMF DiT's names but for its cfg_t_start / cfg_t_end), added to t's embedding.
        Off (the default): no such modules.
    """

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        num_classes=1000,
        learn_sigma=True,
        block_type="adaLN-Zero",
        norm="layernorm",
        mlp="gelu",
        rope=False,
        qk_norm=False,
        wo_shift=False,
        second_time=False,
        guidance_cond=False,
    ):
        super().__init__()
        height, width = patch_grid(input_size, patch_size)
        if block_type not in BLOCK_TYPES:
            raise ConfigError(f"unknown block_type {block_type!r}; choose one of {', '.join(BLOCK_TYPES)}")
        check_heads(hidden_size, num_heads)
        if norm not in NORMS or mlp not in MLPS:
            raise ConfigError(f"norm={norm!r}, mlp={mlp!r}: choose norm from {', '.join(NORMS)} and mlp from "
                              f"{', '.join(MLPS)}")
        lightning = dict(norm=norm, mlp=mlp, qk_norm=qk_norm, wo_shift=wo_shift)
        if block_type not in ("adaLN-Zero", "adaLN") and (rope or lightning != dict(
                norm="layernorm", mlp="gelu", qk_norm=False, wo_shift=False)):
            raise ConfigError(f"norm, mlp, rope, qk_norm and wo_shift are options of the adaLN blocks; "
                              f"block_type={block_type} takes none of them")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.block_type = block_type
        self.grid_size = (height // patch_size, width // patch_size)

        self.x_embedder = PatchEmbed((height, width), patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        # The second time of the one-step objectives (diffusion/meanflow.py, shortcut.py); None keeps the official keys.
        self.dt_embedder = TimestepEmbedder(hidden_size) if second_time else None
        # iMF's guidance conditions (scale, interval start, interval end); None keeps the keys of the other objectives.
        self.omega_embedder, self.t_min_embedder, self.t_max_embedder = (
            [TimestepEmbedder(hidden_size) for _ in GUIDANCE_CONDITIONS] if guidance_cond else [None] * 3)
        # Fixed (not learned) sin-cos positions; a buffer, saved in the state_dict as the official code does.
        self.register_buffer("pos_embed", sincos_2d(hidden_size, *self.grid_size).unsqueeze(0))
        # Rotary tables shared by every block, under LightningDiT's name; kept beside the absolute positions.
        self.feat_rope = RoPE2d(hidden_size // num_heads, *self.grid_size) if rope else None

        if block_type in ("adaLN-Zero", "adaLN"):
            make_block = lambda: DiTBlock(hidden_size, num_heads, mlp_ratio, gated=block_type == "adaLN-Zero",
                                          **lightning)
        elif block_type == "cross-attn":
            make_block = lambda: CrossAttentionBlock(hidden_size, num_heads, mlp_ratio)
        else:  # in-context: t and y are two extra tokens in the sequence of a standard ViT block
            make_block = lambda: Block(hidden_size, num_heads, mlp_ratio, qkv_bias=True, act_layer=approx_gelu)
        self.blocks = nn.ModuleList([make_block() for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm=norm)
        self.readout_scale = 1.0   # a plain float: muP's output multiplier base_width / width (models/mup.py)
        self.initialize_weights()

    def initialize_weights(self):
        """All of the paper's initialisation, in one place."""
        init_linears(self)   # transformer layers: Xavier-uniform weights, zero biases (ViT)

        # Patch embedding: initialise like the nn.Linear it is (not like a conv).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        # Label table and timestep MLP: N(0, 0.02).
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        extra = [self.dt_embedder] if self.dt_embedder is not None else []
        for embedder in (*extra, *self.guidance_embedders()):   # the extra conditions' MLPs as t's
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero's identity blocks; the output layer zeroed for every block type (initial prediction exactly 0).
        zero_init_adaln(self.blocks if self.block_type == "adaLN-Zero" else (), self.final_layer)

    def unpatchify(self, x):
        """(N, T, p*p*C) tokens -> (N, C, H, W) image."""
        p, c = self.patch_size, self.out_channels
        h, w = self.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def guidance_embedders(self):
        """The embedders of iMF's guidance conditions, in the order of `guidance`'s columns ([] when not built)."""
        return [e for e in (self.omega_embedder, self.t_min_embedder, self.t_max_embedder) if e is not None]

    def embed_time(self, t, dt=None, guidance=None):
        """t's embedding (N, D), plus dt's in a model built with second_time and the guidance conditions' in one built
        with guidance_cond (None: zeros, as FLOP counting calls it); an input the model was built without is
        refused."""
        refuse_unbuilt_conditions(self, dt, guidance)
        emb = self.t_embedder(t)
        if self.dt_embedder is not None:
            emb = emb + self.dt_embedder(torch.zeros_like(t) if dt is None else dt)
        if self.omega_embedder is not None:
            if guidance is None:
                guidance = torch.zeros(len(t), len(GUIDANCE_CONDITIONS), device=t.device)
            for i, embedder in enumerate(self.guidance_embedders()):
                emb = emb + embedder(guidance[:, i])
        return emb

    def forward(self, x, t, y=None, dt=None, guidance=None):
        """
        x: (N, C, H, W) images or latents; t: (N,) timesteps, int or float; y: (N,) class ids, or None for
        the null class; dt: (N,) the second time (models built with second_time only); guidance: (N, 3) iMF's
        (1 - 1/omega, t_min, t_max) (models built with guidance_cond only). Returns (N, C_out, H, W).
        """
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H * W / p^2
        t = self.embed_time(t, dt, guidance)     # (N, D)
        y = self.y_embedder(y)                   # (N, D)
        c = t + y                                # (N, D)
        if self.block_type == "in-context":
            x = torch.cat([t[:, None], y[:, None], x], dim=1)  # (N, T + 2, D)
            for block in self.blocks:
                x = block(x)
            x = x[:, 2:]                                        # (N, T, D)
        elif self.block_type == "cross-attn":
            context = torch.stack([t, y], dim=1)                # (N, 2, D)
            for block in self.blocks:
                x = block(x, context)                           # (N, T, D)
        else:
            rope = self.feat_rope() if self.feat_rope is not None else None   # (cos, sin), each (T, D/h)
            for block in self.blocks:
                x = block(x, c, rope)                           # (N, T, D)
        x = self.final_layer(x, c, self.readout_scale)   # (N, T, p^2 * C_out)
        return self.unpatchify(x)                # (N, C_out, H, W)


#################################################################################
#                                  Size table                                   #
#################################################################################

# Paper Table 1: the four configurations; each is used with patch sizes 2, 4 and 8.
DIT_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
# Not in the paper: CPU-sized models. T has DeiT-Tiny's width (UNet-T is matched to it); Mini is the
# bundled-digits default, small enough to see ~300K images in a few CPU minutes.
EXTRA_SIZES = {
    "T": dict(depth=6, hidden_size=192, num_heads=3),
    "Mini": dict(depth=4, hidden_size=128, num_heads=4),
}
PATCH_SIZES = (2, 4, 8)


def _constructor(size, patch_size):
    def build(**kwargs):
        # Keyword arguments win over the size table, so a named size is a starting point for custom ones
        # (`+model.kwargs.depth=6 +model.kwargs.hidden_size=512`); checkpoints record what was built.
        return DiT(**{"patch_size": patch_size, **{**DIT_SIZES, **EXTRA_SIZES}[size], **kwargs})
    build.__name__ = f"DiT_{size}_{patch_size}"
    build.__doc__ = f"DiT-{size}/{patch_size}, patch size {patch_size}."
    return build


# "DiT-XL/2" -> constructor, as in the official repository: DiT_models["DiT-XL/2"](input_size=32, num_classes=1000).
DiT_models = {f"DiT-{s}/{p}": _constructor(s, p) for s in (*DIT_SIZES, *EXTRA_SIZES) for p in PATCH_SIZES}

# LightningDiT (hustvl/LightningDiT): the DiT sizes plus two wider ones, with the options of its shipped config
# (RMSNorm, SwiGLU, RoPE; QK-norm and wo_shift off). Each option can still be set: LightningDiT-XL/1 with
# qk_norm=True is LightningDiT's advice when a long run goes NaN. Mini/2 and Mini/4 are for the digits.
LIGHTNINGDIT_SIZES = {
    "1p0B": dict(depth=24, hidden_size=1536, num_heads=24),
    "1p6B": dict(depth=28, hidden_size=1792, num_heads=28),
}
LIGHTNINGDIT_OPTIONS = dict(norm="rmsnorm", mlp="swiglu", rope=True)
LIGHTNINGDIT_NAMES = ("B/1", "B/2", "L/2", "XL/1", "XL/2", "1p0B/1", "1p0B/2", "1p6B/1", "1p6B/2", "Mini/2", "Mini/4")


def _lightning_constructor(name):
    size, patch_size = name.split("/")
    table = {**DIT_SIZES, **EXTRA_SIZES, **LIGHTNINGDIT_SIZES}

    def build(**kwargs):
        return DiT(**{"patch_size": int(patch_size), **table[size], **LIGHTNINGDIT_OPTIONS, **kwargs})
    build.__name__ = f"LightningDiT_{size}_{patch_size}"
    build.__doc__ = f"LightningDiT-{name}: DiT-{name} with RMSNorm, SwiGLU and RoPE."
    return build


LightningDiT_models = {f"LightningDiT-{name}": _lightning_constructor(name) for name in LIGHTNINGDIT_NAMES}
