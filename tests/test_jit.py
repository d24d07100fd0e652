"""JiT (models/jit.py): outputs, tables and key names against the official LTH14/JiT network; sizes; configs.

The reference is tests/data/jit_reference.pt, made by tests/reference/make_jit_reference.py from an LTH14/JiT
checkout; with JIT_OFFICIAL_PATH set to a checkout, the official network is also run live.
"""

import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import compose_config, load_reference_script
from models import MODELS, JiT, JiT_models, build_model, create_model, model_stats
from utils.errors import ConfigError

REFERENCE = Path(__file__).parent / "data" / "jit_reference.pt"
gen = load_reference_script("make_jit_reference")
PIXELS = dict(input_size=256, in_channels=3, num_classes=1000, learn_sigma=False)


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE, weights_only=True)


@pytest.mark.parametrize("name", list(gen.CONFIGS))
def test_outputs_equal_the_official_jit(name, reference):
    stored = reference["configs"][name]
    ours = gen.ours_for(stored["options"])
    state = ours.state_dict()
    checksum = float(sum(v.double().sum() for k, v in state.items() if k != "pos_embed"))
    assert checksum == pytest.approx(stored["weights_checksum"], rel=1e-12)   # the same seeded weights
    # Our fixed tables are the official ones, bit for bit (the rotary tables are not saved, as in the official code).
    assert torch.equal(state["pos_embed"], stored["tables"]["pos_embed"])
    for rope in ("feat_rope", "feat_rope_incontext"):
        for part in ("freqs_cos", "freqs_sin"):
            assert torch.equal(getattr(getattr(ours, rope), part), stored["tables"][f"{rope}.{part}"]), (rope, part)
    x, t, y = (reference["inputs"][k] for k in ("x", "t", "y"))
    with torch.no_grad():
        out = ours(x, t, y)
    # The official attention is an explicit fp32 softmax, ours scaled_dot_product_attention: equal to ~1e-6.
    torch.testing.assert_close(out, stored["output"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", gen.REAL)
def test_real_sizes_have_the_official_keys_and_shapes(name, reference):
    """So the released checkpoints load with strict=True."""
    with torch.device("meta"):
        ours = create_model(name, **PIXELS)
    assert {k: list(v.shape) for k, v in ours.state_dict().items()} == reference["real"][name]


@pytest.mark.skipif(not os.environ.get("JIT_OFFICIAL_PATH"),
                    reason="set JIT_OFFICIAL_PATH to an LTH14/JiT checkout (needs einops)")
def test_live_official_network_gives_the_stored_reference(reference):
    live = gen.make_reference(gen.load_official(os.environ["JIT_OFFICIAL_PATH"]))
    for name, stored in reference["configs"].items():
        torch.testing.assert_close(live["configs"][name]["output"], stored["output"], rtol=0, atol=0)
    assert live["real"] == reference["real"]


# (params in millions, Gflops) as the paper's Table (256 px): B/16 131M 25, L/16 459M 88, H/16 953M 182.
@pytest.mark.parametrize("name, params, gflops", [("JiT-B/16", 131, 25), ("JiT-L/16", 459, 88),
                                                   ("JiT-H/16", 953, 182)])
def test_real_sizes_match_the_paper(name, params, gflops):
    stats = model_stats(lambda: create_model(name, **PIXELS), (3, 256, 256))
    assert round(stats["params"] / 1e6) == params
    assert round(stats["gflops"]) == gflops


def test_starts_at_zero_and_takes_the_model_signature():
    torch.manual_seed(0)
    model = create_model("JiT-Mini/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False)
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    assert torch.equal(model(x, t, torch.tensor([0, 4, 10])), torch.zeros(3, 1, 8, 8))   # zeroed output layer
    assert model(x, t).shape == (3, 1, 8, 8)                                             # y=None: the null class
    wide = create_model("JiT-Mini/2", input_size=(8, 12), in_channels=1, num_classes=10, learn_sigma=True)
    assert wide(torch.randn(2, 1, 8, 12), torch.rand(2), torch.tensor([1, 2])).shape == (2, 2, 8, 12)


def test_class_tokens_join_at_their_block_and_leave_before_the_output():
    """The blocks before in_context_start see T tokens, the rest L + T; the class tokens carry the class."""
    model = gen.ours_for(gen.CONFIGS["in_context"])
    lengths = []
    hooks = [b.register_forward_hook(lambda m, i, o: lengths.append(o.shape[1])) for b in model.blocks]
    x, t, y = (v[:2] for v in gen.inputs())
    with torch.no_grad():
        out = model(x, t, y)
    for h in hooks:
        h.remove()
    tokens = model.grid_size[0] * model.grid_size[1]
    assert lengths == [tokens, tokens, tokens + 3, tokens + 3] and out.shape == x.shape
    with torch.no_grad():   # without the class tokens' learned positions the output changes
        model.in_context_posemb.zero_()
        assert not torch.allclose(model(x, t, y), out)


def test_dropout_sits_in_the_middle_half_of_the_blocks():
    model = JiT(input_size=16, patch_size=4, hidden_size=32, depth=8, num_heads=2, num_classes=10, bottleneck_dim=8,
                in_context_len=2, in_context_start=2, attn_drop=0.1, proj_drop=0.2)
    with_dropout = [i for i, b in enumerate(model.blocks) if isinstance(b.attn.proj_drop, nn.Dropout)]
    assert with_dropout == [2, 3, 4, 5]                                 # depth // 4 <= i < 3 * (depth // 4)
    assert [b.attn.attn_drop for b in model.blocks] == [0.0] * 2 + [0.1] * 4 + [0.0] * 2
    assert model.blocks[3].mlp.drop.p == 0.2
    plain = JiT(input_size=16, patch_size=4, hidden_size=32, depth=8, num_heads=2, num_classes=10, bottleneck_dim=8,
                in_context_len=2, in_context_start=2)
    assert sorted(plain.state_dict()) == sorted(model.state_dict())     # dropout adds no keys
    model.eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 2])
    assert torch.equal(model(x, t, y), model(x, t, y))                  # off in eval


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="not divisible by the patch size"):
        JiT(input_size=30, patch_size=16)
    with pytest.raises(ConfigError, match="in_context_start"):
        JiT(input_size=16, patch_size=8, hidden_size=32, depth=2, num_heads=2, in_context_len=4, in_context_start=2)
    with pytest.raises(ConfigError, match="divisible by 4"):   # RoPE needs head widths divisible by 4
        JiT(input_size=16, patch_size=8, hidden_size=36, depth=2, num_heads=6, in_context_start=0)


def test_registered_sizes_and_configs():
    assert {"JiT-B/16", "JiT-L/16", "JiT-H/16", "JiT-Mini/2"} <= set(MODELS) and set(JiT_models) <= set(MODELS)
    for stem, name in (("JiT-B-16", "JiT-B/16"), ("JiT-L-16", "JiT-L/16"), ("JiT-H-16", "JiT-H/16"),
                       ("JiT-Mini-2", "JiT-Mini/2")):
        cfg = compose_config(overrides=[f"model={stem}"])
        assert cfg.model.name == name
    assert compose_config(overrides=["model=JiT-H-16"]).model.kwargs.proj_drop == 0.2   # the official H recipe


def test_checkpoint_arguments_rebuild_the_model():
    args = dict(name="JiT-Mini/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False, param="sp",
                base_width=None)
    a, b = build_model(args), build_model(args)
    b.load_state_dict(a.state_dict(), strict=True)


def test_the_published_recipe_composes():
    cfg = compose_config(overrides=["experiment=jit-b16-imagenet256", "data.path=/nowhere"])
    assert cfg.model.name == "JiT-B/16" and cfg.vae.name == "none" and cfg.data.image_size == 256
    assert (cfg.diffusion.objective, cfg.diffusion.path_type, cfg.diffusion.prediction) == ("flow", "Linear", "x")
    assert (cfg.diffusion.time_sampling, cfg.diffusion.time_mean, cfg.diffusion.time_std) == ("logit_normal", -0.8, 0.8)
    assert cfg.train.batch_size == 1024 and cfg.train.steps == 600 * 1251 and cfg.optim.warmup_steps == 5 * 1251
    assert cfg.optim.lr == 2e-4 and list(cfg.optim.betas) == [0.9, 0.95] and cfg.optim.weight_decay == 0
    assert cfg.ema.decay == 0.9999 and cfg.precision == "bf16"
    sampling = (cfg.sample.ode.method, cfg.sample.steps, cfg.sample.cfg_scale, cfg.sample.guidance_low)
    assert sampling == ("heun_last_euler", 51, 3.0, 0.1)
