"""The DiT network: shapes, zero output at initialisation, the paper's parameter / Gflops table, input sizes."""

import functools

import pytest
import torch

from conftest import tiny_digits_dit, tiny_dit
from models import BLOCK_TYPES, DiT_models, model_stats

PAPER_SIZES = [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]

# DiT paper (2212.09748) Table 4: forward Gflops at 256x256 (32x32x4 latents), and Table 1's parameter counts.
PAPER_GFLOPS = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06,
    "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
    "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71,
    "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}
PAPER_PARAMS_M = {"S": 33, "B": 130, "L": 458, "XL": 675}
# Paper Sec. 4 / Fig. 3: the block-design study, DiT-XL/2 Gflops per conditioning mechanism.
PAPER_BLOCK_GFLOPS = {"adaLN-Zero": 118.64, "adaLN": 118.56, "cross-attn": 137.62, "in-context": 119.37}


def randomise_(module, seed=0):
    """Overwrite every parameter with random values (a trained-looking model, not the zero-init one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def inputs(n=3, c=4, h=8, w=8, num_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, h, w, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, num_classes + 1, (n,), generator=g))


# ------------------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DiT_models))
def test_every_size_gives_the_right_output_shape(name):
    # The meta device propagates shapes through the real forward without allocating the weights.
    with torch.device("meta"):
        model = DiT_models[name](input_size=16, num_classes=7)
        out = model(torch.zeros(2, 4, 16, 16), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 8, 16, 16)


def test_paper_sizes_are_all_registered():
    assert set(PAPER_SIZES) <= set(DiT_models)


@pytest.mark.parametrize("name", ["DiT-T/2", "DiT-T/4", "DiT-T/8"])
def test_small_sizes_run_for_real(name):
    model = randomise_(DiT_models[name](input_size=16, num_classes=7))
    x, t, y = inputs(2, 4, 16, 16, num_classes=7)
    out = model(x, t, y)
    assert out.shape == (2, 8, 16, 16) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------------------
# Initialisation
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_output_is_exactly_zero_at_initialisation(block_type):
    # The final layer is zeroed for every block type, so training starts from a zero prediction.
    model = tiny_dit(block_type=block_type)
    x, t, y = inputs()
    out = model(x, t.float() + 0.5, y)
    assert out.shape == (3, 8, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))


def test_adaln_zero_blocks_start_as_the_identity():
    # adaLN-Zero (paper Sec. 3.2): zero gates, so every block passes its input through unchanged.
    model = tiny_dit()
    tokens, c = torch.randn(3, 16, 64), torch.randn(3, 64)
    for block in model.blocks:
        assert torch.equal(block(tokens, c), tokens)


def test_plain_adaln_blocks_are_not_the_identity():
    # Only adaLN-Zero zeroes the block modulation; plain adaLN blocks change their input from the start.
    model = tiny_dit(block_type="adaLN")
    tokens, c = torch.randn(3, 16, 64), torch.randn(3, 64)
    assert not torch.allclose(model.blocks[0](tokens, c), tokens)


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_every_block_type_trains_its_output(block_type):
    # Zero output must not mean a dead network: the zeroed output layer gets a gradient at the first step, and
    # once it is non-zero the output depends on x, t and y.
    model = tiny_dit(block_type=block_type)
    x, t, y = inputs()
    model(x, t, y).sub(1).square().mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    randomise_(model.final_layer)
    out = model(x, t, y)
    assert not torch.allclose(out, model(x, t, (y + 1) % 11))
    assert not torch.allclose(out, model(x, t + 1, y))
    assert not torch.allclose(out, model(x + 1, t, y))


# ------------------------------------------------------------------------------------------------------------
# The paper's numbers
# ------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def stats(name, block_type="adaLN-Zero"):
    build = functools.partial(DiT_models[name], input_size=32, num_classes=1000, block_type=block_type)
    return model_stats(build, (4, 32, 32))


@pytest.mark.parametrize("name", PAPER_SIZES)
def test_gflops_match_paper_table_4(name):
    assert stats(name, "adaLN-Zero")["gflops"] == pytest.approx(PAPER_GFLOPS[name], rel=0.01)


@pytest.mark.parametrize("name", PAPER_SIZES)
def test_params_match_paper(name):
    size = name.split("-")[1].split("/")[0]
    assert stats(name, "adaLN-Zero")["params"] / 1e6 == pytest.approx(PAPER_PARAMS_M[size], rel=0.01)


def test_xl2_params_match_paper_exactly():
    assert stats("DiT-XL/2", "adaLN-Zero")["params"] / 1e6 == pytest.approx(675.1, abs=0.05)


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_block_design_gflops_match_paper(block_type):
    assert stats("DiT-XL/2", block_type)["gflops"] == pytest.approx(PAPER_BLOCK_GFLOPS[block_type], rel=0.01)


def test_named_size_takes_custom_depth_width_heads():
    model = DiT_models["DiT-S/2"](input_size=8, num_classes=10, depth=3, hidden_size=96, num_heads=2)
    assert len(model.blocks) == 3 and model.x_embedder.proj.out_channels == 96
    assert model.blocks[0].attn.num_heads == 2
    assert model.x_embedder.patch_size == (2, 2)                   # what was not overridden comes from the name


def test_gflops_scale_with_tokens():
    # Halving the patch size quadruples the tokens; compute grows at least 4x (attention grows faster).
    assert stats("DiT-B/2")["gflops"] > 4 * stats("DiT-B/4")["gflops"]


# ------------------------------------------------------------------------------------------------------------
# Inputs: sizes, channels, conditioning
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("input_size, patch_size", [((8, 16), 2), ((16, 8), 4), ((24, 8), 8), (12, 4)])
def test_any_size_divisible_by_the_patch(input_size, patch_size):
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    model = randomise_(tiny_dit(input_size=input_size, patch_size=patch_size))
    x, t, y = inputs(2, 4, h, w)
    assert model(x, t, y).shape == (2, 8, h, w)
    assert model.pos_embed.shape == (1, (h // patch_size) * (w // patch_size), 64)


def test_non_square_patches_land_where_they_came_from():
    # At adaLN-Zero initialisation the blocks are the identity, so (with a non-zero final layer) each output
    # patch depends only on the input patch at the same place: a test of patchify / unpatchify orientation.
    model = tiny_dit(input_size=(8, 12), patch_size=2)
    randomise_(model.final_layer)
    x, t, y = inputs(1, 4, 8, 12)
    x2 = x.clone()
    x2[0, :, 2:4, 6:8] += 1.0  # patch row 1, column 3
    changed = (model(x2, t, y) - model(x, t, y)).abs().sum(dim=(0, 1)) > 0  # (H, W)
    expected = torch.zeros(8, 12, dtype=torch.bool)
    expected[2:4, 6:8] = True
    assert torch.equal(changed, expected)


def test_pos_embed_encodes_column_then_row():
    # MAE / official DiT layout: token k = (row k // w, column k % w); first half of the width encodes the
    # column, the second half the row, each as [sin, cos] of pos * 10000^(-2i/d) (Vaswani et al. eq. for PE).
    h, w, d = 2, 3, 16
    model = tiny_dit(input_size=(2 * h, 2 * w), hidden_size=d, num_heads=4)
    pos = model.pos_embed[0].double()
    half = d // 2
    omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64) / (half / 2))
    for k in range(h * w):
        row, col = divmod(k, w)
        col_emb = torch.cat([torch.sin(col * omega), torch.cos(col * omega)])
        row_emb = torch.cat([torch.sin(row * omega), torch.cos(row * omega)])
        assert torch.allclose(pos[k], torch.cat([col_emb, row_emb]), atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_any_channel_count(channels):
    model = randomise_(tiny_dit(in_channels=channels))
    x, t, y = inputs(2, channels, 8, 8)
    assert model(x, t, y).shape == (2, 2 * channels, 8, 8)
    assert tiny_dit(in_channels=channels, learn_sigma=False)(x, t, y).shape == (2, channels, 8, 8)


def test_pixel_space_1x8x8():
    model = randomise_(tiny_digits_dit())
    x, t, y = inputs(5, 1, 8, 8)
    out = model(x, t, y)
    assert out.shape == (5, 2, 8, 8) and torch.isfinite(out).all()


def test_unconditional_model():
    # num_classes=0: the table holds only the null class (id 0); y=None means the null class.
    model = randomise_(tiny_dit(num_classes=0))
    assert model.y_embedder.embedding_table.weight.shape == (1, 64)
    x, t, _ = inputs(2)
    out = model(x, t, None)
    assert out.shape == (2, 8, 8, 8)
    assert torch.equal(out, model(x, t, torch.zeros(2, dtype=torch.long)))


def test_y_none_is_the_null_class():
    model = randomise_(tiny_dit())
    x, t, y = inputs(2)
    assert torch.equal(model(x, t, None), model(x, t, torch.full((2,), 10)))
    assert not torch.allclose(model(x, t, None), model(x, t, torch.zeros(2, dtype=torch.long)))


def test_fractional_timesteps_are_continuous():
    # Sampling with respaced or continuous timesteps feeds fractional t; the embedding interpolates smoothly.
    model = randomise_(tiny_dit())
    x, _, y = inputs(2)
    t = torch.tensor([100.0, 100.0])
    near = (model(x, t + 1e-3, y) - model(x, t, y)).abs().max()
    far = (model(x, t + 50, y) - model(x, t, y)).abs().max()
    assert 0 < near < far * 1e-2


@pytest.mark.parametrize("input_size, patch_size", [(30, 4), ((8, 12), 8), ((9, 8), 2)])
def test_size_not_divisible_by_patch_is_a_clear_error(input_size, patch_size):
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        tiny_dit(input_size=input_size, patch_size=patch_size)


def test_unknown_block_type_is_an_error():
    with pytest.raises(ValueError, match="block_type"):
        tiny_dit(block_type="film")


def test_batch_elements_are_independent():
    # No batch statistics anywhere (LayerNorm, not BatchNorm): a sample's output does not depend on its batch.
    model = randomise_(tiny_dit())
    x, t, y = inputs(4)
    together = model(x, t, y)
    alone = torch.cat([model(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(4)])
    # Different batch sizes take different fp32 kernels: equal up to rounding, relative to the output's scale.
    assert (together - alone).abs().max() <= 1e-5 * together.abs().max()
