"""LightningDiT's block options on the DiT family: formulas, initialisation, sizes, and parity with the official code.

The parity reference is tests/data/lightningdit_reference.pt, made by tests/reference/make_lightningdit_reference.py
from a hustvl/LightningDiT checkout; with LIGHTNINGDIT_OFFICIAL_PATH set to a checkout, the official model is also
run live.
"""

import os
from pathlib import Path

import pytest
import torch

from conftest import load_reference_script, tiny_dit
from models import DiT, LightningDiT_models, create_model, forward_gflops, model_stats
from models.dit import RMSNorm, SwiGLU, apply_rope, make_mlp, rope_tables
from utils.errors import ConfigError

REFERENCE = Path(__file__).parent / "data" / "lightningdit_reference.pt"
gen = load_reference_script("make_lightningdit_reference")


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE, weights_only=True)


def test_reference_covers_every_option(reference):
    options = set().union(*(cfg["options"] for cfg in reference["configs"].values()))
    assert options == {"norm", "mlp", "rope", "qk_norm", "wo_shift"}


@pytest.mark.parametrize("name", list(gen.CONFIGS))
def test_outputs_equal_the_official_lightningdit(name, reference):
    stored = reference["configs"][name]
    ours = gen.ours_for(stored["options"])
    state = ours.state_dict()
    # The same weights as when the reference was made (the seeded fill is reproducible), and bit-equal tables.
    checksum = float(sum(v.double().sum() for k, v in state.items() if k not in stored["tables"]))
    assert checksum == pytest.approx(stored["weights_checksum"], rel=1e-12)
    for key, table in stored["tables"].items():
        assert torch.equal(state[key], table), f"{key} differs from the official table"
    x, t, y = (reference["inputs"][k] for k in ("x", "t", "y"))
    with torch.no_grad():
        out = ours(x, t, y)
    torch.testing.assert_close(out, stored["output"], rtol=1e-5, atol=1e-6)


def test_xl1_has_the_official_key_names_and_shapes(reference):
    with torch.device("meta"):
        ours = create_model("LightningDiT-XL/1", input_size=16, in_channels=32, num_classes=1000, learn_sigma=False)
    assert {k: list(v.shape) for k, v in ours.state_dict().items()} == reference["xl1_shapes"]


@pytest.mark.skipif(not os.environ.get("LIGHTNINGDIT_OFFICIAL_PATH"),
                    reason="set LIGHTNINGDIT_OFFICIAL_PATH to a hustvl/LightningDiT checkout (needs einops)")
def test_live_official_code_gives_the_stored_reference(reference):
    live = gen.make_reference(gen.load_official(os.environ["LIGHTNINGDIT_OFFICIAL_PATH"]))
    for name, stored in reference["configs"].items():
        torch.testing.assert_close(live["configs"][name]["output"], stored["output"], rtol=0, atol=0)


def test_rmsnorm_is_its_formula_in_fp32():
    torch.manual_seed(0)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16) + 0.5)
    x = torch.randn(3, 5, 16) * 7
    expected = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), expected, rtol=1e-6, atol=1e-6)
    xb = x.bfloat16()  # normalised in fp32, rounded once to bf16
    assert norm(xb).dtype == torch.float32  # bf16 * fp32 weight promotes, as in the reference
    x32 = xb.float()
    torch.testing.assert_close(norm(xb), (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
                               .float() * norm.weight)


@pytest.mark.parametrize("dim, hidden", [(1152, 3072), (768, 2048), (1024, 2730), (1792, 4778), (128, 341)])
def test_swiglu_widths(dim, hidden):
    mlp = make_mlp("swiglu", dim, 4.0)
    assert isinstance(mlp, SwiGLU)
    assert tuple(mlp.w12.weight.shape) == (2 * hidden, dim) and tuple(mlp.w3.weight.shape) == (dim, hidden)


def test_swiglu_is_its_formula():
    torch.manual_seed(0)
    mlp = SwiGLU(8, 6)
    x = torch.randn(2, 3, 8)
    a, b = (x @ mlp.w12.weight.T + mlp.w12.bias).split(6, dim=-1)
    torch.testing.assert_close(mlp(x), (a * torch.sigmoid(a) * b) @ mlp.w3.weight.T + mlp.w3.bias)


def test_rope_preserves_norms_and_depends_only_on_relative_offsets():
    torch.manual_seed(0)
    head_dim, h, w = 16, 5, 7
    cos, sin = rope_tables(head_dim, h, w)
    assert cos.shape == (h * w, head_dim)
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    q_rot = apply_rope(q.expand(h * w, head_dim), cos.double(), sin.double())
    k_rot = apply_rope(k.expand(h * w, head_dim), cos.double(), sin.double())
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm().expand(h * w))
    token = lambda r, c: r * w + c
    dots = q_rot @ k_rot.T
    for (r1, c1, r2, c2), (dr, dc) in [((0, 0, 1, 2), (2, 3)), ((1, 4, 3, 1), (1, 2)), ((2, 2, 2, 2), (2, -2))]:
        torch.testing.assert_close(dots[token(r1, c1), token(r2, c2)], dots[token(r1 + dr, c1 + dc), token(r2 + dr, c2 + dc)])
    assert not torch.allclose(dots[token(0, 0), token(0, 1)], dots[token(0, 0), token(1, 0)])  # rows and columns differ


def test_rope_is_returned_in_the_input_dtype():
    cos, sin = rope_tables(8, 2, 2)
    q = torch.randn(1, 1, 4, 8).bfloat16()
    assert apply_rope(q, cos, sin).dtype == torch.bfloat16


@pytest.mark.parametrize("block_type", ["adaLN-Zero", "adaLN"])
def test_blocks_with_every_option_start_as_the_identity_and_the_model_as_zero(block_type):
    torch.manual_seed(0)
    model = tiny_dit(learn_sigma=False, block_type=block_type, norm="rmsnorm", mlp="swiglu", rope=True, qk_norm=True,
                     wo_shift=True)
    x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    rope = model.feat_rope()
    with torch.no_grad():
        out = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 10]))
        if block_type == "adaLN-Zero":
            for block in model.blocks:
                assert torch.equal(block(x, c, rope), x)
    assert torch.equal(out, torch.zeros_like(out))


def test_options_change_the_model_and_rope_changes_the_output():
    x, t, y = gen.inputs()
    with torch.no_grad():
        plain, rope = gen.ours_for({})(x, t, y), gen.ours_for({"rope": True})(x, t, y)
    assert not torch.allclose(plain, rope)


def test_gflops_count_the_swiglu_width():
    shape = (1, 8, 8)
    build = lambda mlp: DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=128, depth=4, num_heads=4,
                            num_classes=10, learn_sigma=False, mlp=mlp)
    tokens, dim, depth = 16, 128, 4
    delta = depth * tokens * dim * (3 * 341 - 2 * 512) / 1e9   # multiply-accumulates of SwiGLU minus GELU MLP
    assert forward_gflops(build("swiglu"), shape) - forward_gflops(build("gelu"), shape) == pytest.approx(delta)


# Published sizes: LightningDiT-B/L/XL have DiT-B/L/XL's parameter counts (DiT paper Table 1: 130M, 458M, 675M),
# 1p0B and 1p6B are named after theirs.
@pytest.mark.parametrize("name, params", [("B/1", 130e6), ("B/2", 130e6), ("L/2", 458e6), ("XL/1", 675e6),
                                          ("XL/2", 675e6), ("1p0B/1", 1.03e9), ("1p0B/2", 1.03e9),
                                          ("1p6B/1", 1.63e9), ("1p6B/2", 1.63e9)])
def test_lightningdit_sizes(name, params):
    patch = int(name.split("/")[1])
    size, channels = (16, 32) if patch == 1 else (32, 4)
    stats = model_stats(lambda: LightningDiT_models[f"LightningDiT-{name}"](input_size=size, in_channels=channels,
                                                                            num_classes=1000, learn_sigma=False),
                        (channels, size, size))
    assert stats["params"] == pytest.approx(params, rel=0.01)
    if name in ("XL/1", "XL/2"):  # 256 tokens of width 1152 either way: DiT-XL/2's 118.6 Gflops
        assert stats["gflops"] == pytest.approx(118.6, rel=0.002)


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="choose norm"):
        DiT(input_size=8, depth=1, hidden_size=32, num_heads=2, norm="batchnorm")
    with pytest.raises(ConfigError, match="options of the adaLN blocks"):
        DiT(input_size=8, depth=1, hidden_size=32, num_heads=2, block_type="cross-attn", rope=True)
    with pytest.raises(ConfigError, match="divisible by 4"):
        DiT(input_size=8, depth=1, hidden_size=36, num_heads=6, rope=True)


def test_the_published_recipes_compose():
    from conftest import compose_config
    cfg = compose_config(overrides=["experiment=lightningdit-xl1-vavae-imagenet256", "data.path=/nowhere"])
    assert cfg.model.name == "LightningDiT-XL/1" and dict(cfg.model.kwargs) == dict(
        norm="rmsnorm", mlp="swiglu", rope=True, qk_norm=False, wo_shift=False)
    assert (cfg.diffusion.objective, cfg.diffusion.time_sampling, cfg.diffusion.cosine_loss) == ("flow", "logit_normal", True)
    assert cfg.vae.name == "va-vae-f16d32" and cfg.vae.normalize == "channel"
    assert cfg.train.batch_size == 1024 and cfg.optim.lr == 2e-4 and list(cfg.optim.betas) == [0.9, 0.95]
    assert (cfg.sample.ode.method, cfg.sample.steps, cfg.sample.time_shift, cfg.sample.guidance_low) == ("euler", 250, 0.3, 0.11)
    cfg = compose_config(overrides=["experiment=repa-sit-xl2-imagenet256", "data.path=/nowhere"])
    assert cfg.model.name == "DiT-XL/2" and cfg.diffusion.objective == "flow" and cfg.diffusion.time_sampling == "uniform"
    assert (cfg.repa.encoder, cfg.repa.depth, cfg.repa.coeff, cfg.repa.projector_dim) == ("dinov2-vit-b", 8, 0.5, 2048)
    assert cfg.optim.grad_clip == 1.0 and cfg.vae.name == "sd-vae-ft-mse" and cfg.train.batch_size == 256


def test_with_every_option_off_it_is_the_dit_block_bit_for_bit():
    """conf/model/DiT-XL-1.yaml rests on this: LightningDiT with LayerNorm, GELU, no RoPE, no QK-norm and the shift
    kept is the DiT network, same state_dict keys and the same outputs on the same weights."""
    kw = dict(input_size=8, in_channels=4, num_classes=10, learn_sigma=False)
    torch.manual_seed(0)
    dit = create_model("DiT-Mini/2", **kw)
    for p in dit.parameters():   # past the zero initialisation, so that every path counts
        torch.nn.init.normal_(p, std=0.05)
    plain = create_model("LightningDiT-Mini/2", norm="layernorm", mlp="gelu", rope=False, qk_norm=False,
                         wo_shift=False, **kw)
    plain.load_state_dict(dit.state_dict(), strict=True)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    assert torch.equal(dit(x, t, y), plain(x, t, y))
