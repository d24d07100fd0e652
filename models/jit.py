"""JiT, "Just image Transformers": a plain ViT on pixels (Li & He, "Back to Basics: Let Denoising Generative Models
Denoise", arXiv 2511.13720; official code: github.com/LTH14/JiT, model_jit.py).

Read top to bottom: the bottleneck patch embedding -> the rotary tables -> the model -> the size table. Everything
else is DiT's (models/dit.py): the blocks are LightningDiT-style DiTBlocks (adaLN-Zero, RMSNorm, SwiGLU, QK-norm,
2-D RoPE), the final layer, the timestep and label embedders, the sin-cos positions.

Why it works on 16x16x3 = 768-value patches with a 768-wide network: it predicts the clean image (x-prediction,
`diffusion.prediction=x`, diffusion/transport.py), which lies near a low-dimensional manifold, and is trained with a
loss on the velocity that prediction implies; predicting the noise or the velocity at these patch sizes fails.

Data flow (official class JiT):

    c = t_emb + y_emb                                            (N, D)      one vector per sample
    x = proj2(proj1(patches)) + pos_embed                         (N, T, D)   a rank-`bottleneck_dim` patch embedding
    blocks 0 .. start-1: x = block(x; c, rope)                    (N, T, D)
    at block `start`: x = [y_emb + in_context_posemb (L tokens), x]  (N, L + T, D)  the class, once more, as tokens
    blocks start .. depth-1: x = block(x; c, rope with L un-rotated rows)
    out = final_layer(x[:, L:]; c) -> unpatchify                  (N, C_out, H, W)

The state_dict has the official key names and shapes (the rotary tables are not saved, as in the official code),
so the released PyTorch checkpoints load with `strict=True`; tests/test_jit.py checks the outputs against the
official network on the same weights. Unlike the official code the network does no label dropout and no guidance
(the training step and the sampler do), runs on any device (the official one is CUDA-only), takes non-square inputs,
and with learn_sigma=True outputs 2C channels (the official model has no such option). Its time is the official
t in [0, 1], 1 = data: SiT's convention, so JiT's flows are ours with prediction=x (docs/flows.md, "x-prediction").
"""

import torch
import torch.nn as nn
from utils.errors import ConfigError

from .dit import (DiT, DiTBlock, FinalLayer, LabelEmbedder, TimestepEmbedder, check_heads, init_linears, patch_grid,
                  rope_tables, sincos_2d, zero_init_adaln)


#################################################################################
#                          Bottleneck patch embedding                           #
#################################################################################

class BottleneckPatchEmbed(nn.Module):
    """Patch -> bottleneck_dim -> hidden_size: a p x p conv without bias (a linear map of each flattened patch to a
    small dimension, JiT's "pca_dim"), then a 1x1 conv with bias. Low rank on purpose: the patch (768 values at
    16x16x3) is embedded through 128 or 256 dimensions. Official key names proj1 / proj2."""

    def __init__(self, patch_size, in_channels, bottleneck_dim, hidden_size):
        super().__init__()
        self.proj1 = nn.Conv2d(in_channels, bottleneck_dim, kernel_size=patch_size, stride=patch_size, bias=False)
        self.proj2 = nn.Conv2d(bottleneck_dim, hidden_size, kernel_size=1)

    def forward(self, x):
        return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)   # (N, T, D), tokens row-major


#################################################################################
#                                 Rotary tables                                 #
#################################################################################

class RotaryTables(nn.Module):
    """2-D RoPE tables (models/dit.rope_tables, bit-equal to the official VisionRotaryEmbeddingFast's) with `prefix`
    leading rows of the identity rotation (cos 1, sin 0) for the in-context class tokens. Non-persistent buffers:
    they follow .to(device) but, as in the official code, are not in the state_dict."""

    def __init__(self, head_dim, grid_h, grid_w, prefix=0):
        super().__init__()
        cos, sin = rope_tables(head_dim, grid_h, grid_w)                       # (T, head_dim) each
        self.register_buffer("freqs_cos", torch.cat([torch.ones(prefix, head_dim), cos]), persistent=False)
        self.register_buffer("freqs_sin", torch.cat([torch.zeros(prefix, head_dim), sin]), persistent=False)

    def forward(self):
        return self.freqs_cos, self.freqs_sin


#################################################################################
#                                  The model                                    #
#################################################################################

class JiT(nn.Module):
    """Just image Transformer: patchify through a bottleneck -> depth DiT blocks, the class joining as
    in_context_len extra tokens from block in_context_start on -> unpatchify (module docstring).

    input_size: an int or (H, W), each divisible by patch_size (256 pixels at patch 16 in the paper).
    num_classes: number of real classes; id num_classes is the null class.
    learn_sigma: output 2C channels (not in the official model, whose output is the x-prediction: False).
    bottleneck_dim: the rank of the patch embedding. in_context_len / in_context_start: how many class tokens, and
        before which block they are prepended (in_context_len=0: none).
    attn_drop / proj_drop: training-time dropout in the middle half of the blocks (depth // 4 <= i < 3 * (depth //
        4)), as the official code (its JiT-H/16 recipe trains with proj_drop 0.2).
    """

    def __init__(
        self,
        input_size=256,
        patch_size=16,
        in_channels=3,
        hidden_size=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        num_classes=1000,
        learn_sigma=False,
        bottleneck_dim=128,
        in_context_len=32,
        in_context_start=4,
        attn_drop=0.0,
        proj_drop=0.0,
    ):
        super().__init__()
        height, width = patch_grid(input_size, patch_size)
        check_heads(hidden_size, num_heads)
        if in_context_len < 0 or (in_context_len and not 0 <= in_context_start < depth):
            raise ConfigError(f"in_context_len={in_context_len}, in_context_start={in_context_start}: the class tokens "
                              f"join before one of the {depth} blocks (0 <= in_context_start < depth)")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.in_context_len, self.in_context_start = in_context_len, in_context_start
        self.grid_size = (height // patch_size, width // patch_size)

        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.x_embedder = BottleneckPatchEmbed(patch_size, in_channels, bottleneck_dim, hidden_size)
        # Fixed sin-cos positions; a buffer, saved under the official key (there a frozen parameter).
        self.register_buffer("pos_embed", sincos_2d(hidden_size, *self.grid_size).unsqueeze(0))
        # Learned positions of the in-context class tokens (they get no rotary embedding).
        if in_context_len:
            self.in_context_posemb = nn.Parameter(torch.zeros(1, in_context_len, hidden_size))
        # The official names; the second has identity rows for the class tokens.
        head_dim = hidden_size // num_heads
        self.feat_rope = RotaryTables(head_dim, *self.grid_size)
        self.feat_rope_incontext = RotaryTables(head_dim, *self.grid_size, prefix=in_context_len)

        middle = range(depth // 4, depth // 4 * 3)   # the official blocks with dropout
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio, norm="rmsnorm", mlp="swiglu", qk_norm=True,
                     attn_drop=attn_drop if i in middle else 0.0, proj_drop=proj_drop if i in middle else 0.0)
            for i in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm="rmsnorm")
        self.initialize_weights()

    def initialize_weights(self):
        """The official initialisation, in one place (DiT's, plus the bottleneck and the class-token positions)."""
        init_linears(self)   # linear layers: Xavier-uniform weights, zero biases (ViT)

        # Both halves of the patch embedding: Xavier-uniform on the flattened kernel (a linear map), zero bias.
        for conv in (self.x_embedder.proj1, self.x_embedder.proj2):
            nn.init.xavier_uniform_(conv.weight.data.view(conv.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj2.bias)

        # Label table, timestep MLP and class-token positions: N(0, 0.02).
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.in_context_len:
            nn.init.normal_(self.in_context_posemb, std=0.02)

        zero_init_adaln(self.blocks, self.final_layer)   # identity blocks, initial prediction exactly 0

    # The output is laid out as DiT's: (N, T, p*p*C_out) -> (N, C_out, H, W).
    unpatchify = DiT.unpatchify

    def forward(self, x, t, y=None):
        """
        x: (N, C, H, W) images; t: (N,) times in [0, 1] (1 = data); y: (N,) class ids, or None for the null class.
        Returns (N, C_out, H, W): the predicted clean image.
        """
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        t = self.t_embedder(t)                                   # (N, D)
        y = self.y_embedder(y)                                   # (N, D)
        c = t + y                                                # (N, D)
        x = self.x_embedder(x) + self.pos_embed                  # (N, T, D), T = H * W / p^2
        rope = self.feat_rope()                                  # (cos, sin), each (T, D/h)
        for i, block in enumerate(self.blocks):
            if i == self.in_context_start:
                if self.in_context_len:
                    tokens = y.unsqueeze(1) + self.in_context_posemb    # (N, L, D): the class embedding, L times
                    x = torch.cat([tokens, x], dim=1)                   # (N, L + T, D)
                rope = self.feat_rope_incontext()                       # each (L + T, D/h)
            x = block(x, c, rope)                                # (N, [L +] T, D)
        x = x[:, self.in_context_len:]                           # (N, T, D)
        x = self.final_layer(x, c)                               # (N, T, p^2 * C_out)
        return self.unpatchify(x)                                # (N, C_out, H, W)


#################################################################################
#                                  Size table                                   #
#################################################################################

# The official sizes (model_jit.py: JiT_{B,L,H}_{16,32}); patch 16 at 256 pixels, 32 at 512. JiT-G (the paper's 2B
# model) is not in the official code. Mini is not in the paper: a CPU-sized model for the 8x8 digits (its bottleneck
# is no narrower than a patch there, so it only keeps the structure).
JIT_SIZES = {
    "B": dict(depth=12, hidden_size=768, num_heads=12, bottleneck_dim=128, in_context_len=32, in_context_start=4),
    "L": dict(depth=24, hidden_size=1024, num_heads=16, bottleneck_dim=128, in_context_len=32, in_context_start=8),
    "H": dict(depth=32, hidden_size=1280, num_heads=16, bottleneck_dim=256, in_context_len=32, in_context_start=10),
    "Mini": dict(depth=4, hidden_size=128, num_heads=4, bottleneck_dim=16, in_context_len=4, in_context_start=1),
}
JIT_NAMES = ("B/16", "B/32", "L/16", "L/32", "H/16", "H/32", "Mini/2", "Mini/4")


def _jit_constructor(name):
    size, patch_size = name.split("/")

    def build(**kwargs):
        # Keyword arguments win over the size table (checkpoints record what was built).
        return JiT(**{"patch_size": int(patch_size), **JIT_SIZES[size], **kwargs})
    build.__name__ = f"JiT_{size}_{patch_size}"
    build.__doc__ = f"JiT-{name}: patch size {patch_size}."
    return build


# "JiT-B/16" -> constructor, as in the official repository: JiT_models["JiT-B/16"](input_size=256, num_classes=1000).
JiT_models = {f"JiT-{name}": _jit_constructor(name) for name in JIT_NAMES}
