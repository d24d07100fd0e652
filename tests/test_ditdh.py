"""DiT^DH (models/ditdh.py): bit-equal outputs, key names, parameter and Gflops counts against the official RAE network.

The reference is tests/data/ditdh_reference.pt, made by tests/reference/make_ditdh_reference.py from a bytetriper/RAE
checkout; with RAE_OFFICIAL_PATH set to a checkout, the official model is also run live.
"""

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config, load_reference_script
from models import (MODELS, DiTDH, DiTDH_models, build_model, count_params, create_model, model_stats,
                    with_width)
from models.dit import DiTBlock, modulate
from models.ditdh import DITDH_OPTIONS
from utils.errors import ConfigError

REFERENCE = Path(__file__).parent / "data" / "ditdh_reference.pt"
CONF = Path(__file__).parents[1] / "conf" / "model"
gen = load_reference_script("make_ditdh_reference")
LATENT = dict(input_size=16, in_channels=768, num_classes=1000, learn_sigma=False)   # RAE's DINOv2-B latents


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE, weights_only=True)


def official_state(stored):
    return {k: v.float() if v.is_floating_point() else v for k, v in stored["state_dict"].items()}


@pytest.mark.parametrize("name", list(gen.CONFIGS))
def test_outputs_are_bit_equal_to_the_official_network(name, reference):
    stored = reference["configs"][name]
    ours = DiTDH(**gen.ours_kwargs(stored["official_kwargs"])).eval()
    state = official_state(stored)
    # Our fixed tables (sin-cos positions, both rotary tables) are the official ones, bit for bit.
    fresh = ours.state_dict()
    for key in [k for k in state if k == "pos_embed" or "_feat_rope." in k]:
        assert torch.equal(fresh[key], state[key]), f"{key} differs from the official table"
    assert sorted(fresh) == sorted(state), "the key names differ"
    ours.load_state_dict(state, strict=True)
    x, t, y = (reference["inputs"][k] for k in ("x", "t", "y"))
    with torch.no_grad():
        out = ours(x, t, y)
    # Same operations in the same order on the same weights: no tolerance needed (CPU, fp32).
    assert torch.equal(out, stored["output"]), (out - stored["output"]).abs().max()


@pytest.mark.parametrize("name", list(gen.REAL))
def test_real_sizes_match_the_official_keys_params_and_gflops(name, reference):
    official = reference["real"][name]
    with torch.device("meta"):
        ours = create_model(name, **LATENT)
    assert {k: list(v.shape) for k, v in ours.state_dict().items()} == official["shapes"]
    # The official model counts its fixed Fourier frequencies t_embedder.W (256) as a (frozen) parameter; ours
    # is a buffer, which count_params leaves out (it counts the fixed pos_embed, as the DiT paper does).
    assert count_params(ours) == official["params"] - 256
    stats = model_stats(lambda: create_model(name, **LATENT), (768, 16, 16))
    assert stats["gflops"] == pytest.approx(official["gflops"], rel=1e-9)


# Ours at 768x16x16, 1000 classes. Published: DiT^DH-XL with DINOv2-B is 839M parameters (the RAE paper's system
# table, as quoted by later papers, e.g. RiT's comparison table); the paper and the official README give no Gflops.
@pytest.mark.parametrize("name, params, gflops", [("DiTDH-S/1", 196_455_508, 48.471), ("DiTDH-B/1", 294_295_636, 65.692),
                                                  ("DiTDH-XL/1", 838_675_540, 161.579)])
def test_sizes(name, params, gflops):
    stats = model_stats(lambda: MODELS[name](**LATENT), (768, 16, 16))
    assert stats["params"] == params
    assert stats["gflops"] == pytest.approx(gflops, abs=5e-4)
    if name == "DiTDH-XL/1":
        assert stats["params"] == pytest.approx(839e6, rel=1e-3)


@pytest.mark.skipif(not os.environ.get("RAE_OFFICIAL_PATH"),
                    reason="set RAE_OFFICIAL_PATH to a bytetriper/RAE checkout (needs einops)")
def test_live_official_code_gives_the_stored_reference(reference):
    live = gen.make_reference(gen.load_official(os.environ["RAE_OFFICIAL_PATH"]))
    for name, stored in reference["configs"].items():
        assert torch.equal(live["configs"][name]["output"], stored["output"]), name
    for name, stored in reference["real"].items():
        assert live["real"][name]["shapes"] == stored["shapes"] and live["real"][name]["params"] == stored["params"]


def tiny(**kwargs):
    config = dict(input_size=4, in_channels=8, hidden_size=(32, 48), depth=(2, 2), num_heads=(2, 3), num_classes=5)
    return DiTDH(**{**config, **kwargs})


def test_starts_at_zero_with_every_block_the_identity():
    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(3, 8, 4, 4)
    with torch.no_grad():
        out = model(x, torch.rand(3), torch.tensor([0, 4, 5]))
        for block, width in zip(model.blocks, (32, 32, 48, 48)):
            tokens, c = torch.randn(3, 16, width), torch.randn(3, 16, width)   # per-token conditioning
            assert torch.equal(block(tokens, c), tokens)
    assert torch.equal(out, torch.zeros_like(out))


def test_per_token_conditioning_generalises_the_per_sample_one():
    torch.manual_seed(0)
    block = DiTBlock(32, 2, norm="rmsnorm", mlp="swiglu")
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
        x, c = torch.randn(2, 5, 32), torch.randn(2, 32)
        torch.testing.assert_close(block(x, c.unsqueeze(1).expand(2, 5, 32)), block(x, c))
    # Per-token adaLN scales and shifts each token by its own vectors.
    shift, scale = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    assert torch.equal(modulate(x, shift, scale), x * (1 + scale) + shift)
    assert torch.equal(modulate(x, None, scale), x * (1 + scale))


def test_any_patch_size_non_square_inputs_learned_sigma_and_the_null_class():
    torch.manual_seed(0)
    model = gen.fill_seeded_(tiny(input_size=(4, 8), patch_size=2, learn_sigma=True))
    x = torch.randn(2, 8, 4, 8)
    with torch.no_grad():
        out = model(x, torch.rand(2), None)
        null = model(x, torch.rand(2).fill_(0.5), torch.tensor([5, 5]))
        same = model(x, torch.tensor([0.5, 0.5]), None)
    assert out.shape == (2, 16, 4, 8)
    torch.testing.assert_close(null, same)


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="not divisible by the patch size"):
        tiny(input_size=5, patch_size=2)
    with pytest.raises(ConfigError, match="pair"):
        tiny(depth=(1, 1, 1))
    with pytest.raises(ConfigError, match="model.width"):   # what models.with_width would pass: one width
        create_model("DiTDH-S/1", **with_width("DiTDH-S/1", {}, 512), input_size=4, in_channels=8, num_classes=5)
    with pytest.raises(ConfigError, match="num_heads"):
        tiny(num_heads=(3, 3))
    with pytest.raises(ConfigError, match="choose norm"):
        tiny(norm="batchnorm")


def test_every_size_has_a_hydra_config():
    files = {p.stem: OmegaConf.load(p) for p in CONF.glob("DiTDH-*.yaml")}
    assert {cfg.name for cfg in files.values()} == set(DiTDH_models) == {"DiTDH-S/1", "DiTDH-B/1", "DiTDH-XL/1"}
    for stem, cfg in files.items():
        assert stem == cfg.name.replace("/", "-") and cfg.name in MODELS
        assert OmegaConf.to_container(cfg.kwargs) == DITDH_OPTIONS
    cfg = compose_config(overrides=["model=DiTDH-XL-1", "data.path=/nowhere"])
    assert cfg.model.name == "DiTDH-XL/1"


def test_checkpoint_arguments_rebuild_the_model_and_mup_is_refused():
    args = dict(name="DiTDH-S/1", input_size=4, in_channels=8, num_classes=5, learn_sigma=False, depth=[1, 1],
                hidden_size=[32, 48], num_heads=[2, 3])
    assert isinstance(build_model(args), DiTDH)
    # models/mup.py knows the DiT family and the U-Nets; DiT^DH's two widths are not classified (yet).
    with pytest.raises(ConfigError, match="mup"):
        build_model({**args, "param": "mup"})


def test_every_parameter_is_trained_and_the_fourier_frequencies_are_not():
    torch.manual_seed(0)
    model = tiny()
    w = model.t_embedder.W.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    reached = set()
    for _ in range(4):   # the zero-initialised adaLN and output layers open the paths back one step at a time
        opt.zero_grad()
        out = model(torch.randn(2, 8, 4, 4), torch.rand(2), torch.tensor([1, 5]))
        (out - torch.randn_like(out)).pow(2).mean().backward()
        opt.step()
        reached |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == set(dict(model.named_parameters()))
    assert "t_embedder.W" not in dict(model.named_parameters()) and torch.equal(model.t_embedder.W, w)
