"""U-Net baselines: the DiT contract (shapes, timesteps, null class), ADM's zero-init, the Gflops match to DiT,
the published sizes of the reference U-Nets, a short training run and CFG sampling on the digits."""

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from sklearn.datasets import load_digits

from conftest import tiny_ldm, tiny_unet
from diffusion import classifier_free_guidance, create_diffusion
from models import MODELS, UNet_models, create_model, model_stats
from models.unet import DIGITS_MATCH, DIT_MATCH, EXTRA_SIZES, REFERENCE_PUBLISHED, UNET_SIZES

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def randomize_(model, std=0.05):
    """Move every parameter off its initial value, so zero-initialised branches and outputs are active."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


# ------------------------------------------------------------------------------------------------------
# Contract: shapes, timesteps, classes
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [tiny_unet, tiny_ldm], ids=["adagn", "cross-attn"])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_output_shape(build, learn_sigma):
    torch.manual_seed(0)
    model = build(learn_sigma=learn_sigma)
    out = model(torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 5, 10]))
    assert out.shape == (3, 2 if learn_sigma else 1, 8, 8)
    assert model.out_channels == out.shape[1]


def test_non_square_input_and_latent_shape():
    model = create_model("UNet-T", input_size=(8, 16), in_channels=4, num_classes=1000)
    out = model(torch.randn(2, 4, 8, 16), torch.tensor([1, 2]), torch.tensor([3, 1000]))
    assert out.shape == (2, 8, 8, 16)


@pytest.mark.parametrize("build", [tiny_unet, tiny_ldm], ids=["adagn", "cross-attn"])
def test_zero_init(build):
    # ADM (and LDM) zero-initialise the last layer of every residual branch and the output conv: each block
    # starts as the identity and the first prediction is exactly 0.
    model = build()
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0
    last = ("conv2", "conv_out", "proj_out" if model.conditioning == "cross-attn" else "to_out.0")
    zeroed = [n for n, p in model.named_parameters() if n.rsplit(".", 1)[0].endswith(last)]
    assert len(zeroed) > 4 and all(torch.count_nonzero(model.get_parameter(n)) == 0 for n in zeroed)


@pytest.mark.parametrize("build", [tiny_unet, tiny_ldm], ids=["adagn", "cross-attn"])
def test_timesteps_int_float_scalar(build):
    torch.manual_seed(0)
    model = randomize_(build()).eval()
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([4, 4])
    out_int = model(x, torch.tensor([250, 250]), y)
    torch.testing.assert_close(model(x, torch.tensor([250.0, 250.0]), y), out_int)
    torch.testing.assert_close(model(x, torch.tensor(250), y), out_int)  # a 0-d timestep is broadcast
    assert not torch.allclose(model(x, torch.tensor([250.5, 250.5]), y), out_int)  # fractional t is used


@pytest.mark.parametrize("build", [tiny_unet, tiny_ldm], ids=["adagn", "cross-attn"])
def test_class_conditioning_and_null_class(build):
    torch.manual_seed(0)
    model = randomize_(build()).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([100, 600])
    out = {c: model(x, t, torch.full((2,), c)) for c in (0, 1, 10)}
    assert not torch.allclose(out[0], out[1], atol=1e-5), "the class label does not change the output"
    assert not torch.allclose(out[0], out[10], atol=1e-5), "the null class equals a real class"
    torch.testing.assert_close(model(x, t, None), out[10])  # y=None is the null class, id num_classes


def test_unconditional_model():
    model = randomize_(tiny_unet(num_classes=0))
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    assert out.shape == (2, 2, 8, 8) and torch.isfinite(out).all()


def test_deepcopy_for_ema_and_dropout():
    model = randomize_(tiny_unet(dropout=0.1)).eval()
    ema = copy.deepcopy(model)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 6])
    torch.testing.assert_close(ema(x, t), model(x, t))
    dropouts = [m.dropout.p for m in model.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert dropouts and all(p == 0.1 for p in dropouts)  # including the attention up blocks'


# ------------------------------------------------------------------------------------------------------
# Input sizes and bad configs fail early, saying what to change
# ------------------------------------------------------------------------------------------------------

def test_small_inputs():
    # Four levels halve 8x8 three times (down to 1x1): allowed. 28x28 cannot be halved three times.
    assert create_model("UNet-S", input_size=8, in_channels=1, num_classes=10)(
        torch.randn(1, 1, 8, 8), torch.tensor([1])).shape == (1, 2, 8, 8)
    with pytest.raises(ValueError, match=r"divisible by 8.*28x28.*channel_mult=\[1, 2, 2\]"):
        create_model("UNet-S", input_size=28, in_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="divisible by 32"):
        create_model("UNet-ADM-256", input_size=8, in_channels=1, num_classes=10)
    # The fix the message names works.
    create_model("UNet-S", input_size=28, in_channels=1, num_classes=10, channel_mult=[1, 2, 2],
                 attention_levels=[1, 2])


def test_bad_configs():
    with pytest.raises(ValueError, match="attention_levels"):
        tiny_unet(attention_levels=(1, 5))
    with pytest.raises(ValueError, match="norm_groups"):
        tiny_unet(model_channels=48)
    with pytest.raises(ValueError, match="head_channels"):
        tiny_unet(head_channels=48)
    with pytest.raises(ValueError, match="conditioning"):
        tiny_unet(conditioning="concat")


# ------------------------------------------------------------------------------------------------------
# Sizes: the Gflops table and the reference U-Nets (counted on the meta device)
# ------------------------------------------------------------------------------------------------------

LATENT = dict(input_size=32, in_channels=4, num_classes=1000)


# The table in models/unet.py and docs/models.md: params (millions) and Gflops at 32x32x4.
UNET_TABLE = {"T": (3.3, 0.76), "S": (41.1, 6.46), "B": (163.5, 25.34), "L": (548.1, 84.39), "XL": (765.2, 117.66)}


@pytest.mark.parametrize("size", [size if size in ("T", "XL") else pytest.param(size, marks=pytest.mark.slow)
                                  for size in UNET_TABLE])   # 2 s a size: the ends in the default suite
def test_gflops_table(size):
    # Forward Gflops at 32x32x4 (the DiT paper's 256x256 setting) within +-15% of the matched DiT.
    unet = model_stats(lambda: UNet_models[f"UNet-{size}"](**LATENT), (4, 32, 32))
    dit = model_stats(lambda: MODELS[DIT_MATCH[size]](**LATENT), (4, 32, 32))
    assert abs(unet["gflops"] / dit["gflops"] - 1) < 0.15, (size, unet, dit)
    assert (round(unet["params"] / 1e6, 1), round(unet["gflops"], 2)) == UNET_TABLE[size], unet


@pytest.mark.parametrize("size", list(DIGITS_MATCH))
def test_digits_unets_match_their_dit_in_gflops_at_8x8(size):
    """The U-Nets of the CPU scaling study, each within 15% of its DiT's forward Gflops on the 8x8x1 digits."""
    digits = dict(input_size=8, in_channels=1, num_classes=10)
    unet = model_stats(lambda: MODELS[f"UNet-{size}"](**digits), (1, 8, 8))
    dit = model_stats(lambda: MODELS[DIGITS_MATCH[size]](**digits), (1, 8, 8))
    assert abs(unet["gflops"] / dit["gflops"] - 1) < 0.15, (size, unet, dit)
    x = torch.randn(2, 1, 8, 8)
    out = MODELS[f"UNet-{size}"](**digits)(x, torch.tensor([3, 700]), torch.tensor([1, 10]))
    assert out.shape == (2, 2, 8, 8)


def test_table_covers_the_family():
    assert set(UNET_TABLE) == {*UNET_SIZES, *EXTRA_SIZES} == set(DIT_MATCH)


@pytest.mark.parametrize("name", list(REFERENCE_PUBLISHED))
def test_reference_unets_reproduce_published_sizes(name):
    published = REFERENCE_PUBLISHED[name]
    c, h, w = published["input_shape"]
    stats = model_stats(lambda: UNet_models[f"UNet-{name}"](input_size=(h, w), in_channels=c, num_classes=1000),
                        published["input_shape"])
    assert abs(stats["params"] / published["params"] - 1) < 0.01, stats
    assert abs(stats["gflops"] / published["gflops"] - 1) < 0.01, stats


# ------------------------------------------------------------------------------------------------------
# Registry and Hydra configs
# ------------------------------------------------------------------------------------------------------

def test_every_unet_has_a_hydra_config():
    files = {p.stem: OmegaConf.load(p) for p in CONF.glob("UNet-*.yaml")}
    assert set(files) == set(UNet_models)
    for stem, cfg in files.items():
        assert cfg.name == stem and cfg.name in MODELS and OmegaConf.to_container(cfg.kwargs) == {}
        assert (CONF / f"{stem}.yaml").read_text().startswith(f"# {stem}: ")


# ------------------------------------------------------------------------------------------------------
# Training and CFG sampling on the digits
# ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    """sklearn's 8x8 digits (values 0..16) as (N, 1, 8, 8) in [-1, 1], with labels 0..9."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return x, torch.tensor(data.target, dtype=torch.long)


@pytest.fixture(scope="module")
def trained(digits):
    """UNet-T8 (the smallest digits U-Net: 3 s here against UNet-T's 13) after 25 AdamW steps on the digits, and its
    loss on a fixed batch before and after."""
    torch.manual_seed(0)
    x, y = digits
    model = create_model("UNet-T8", input_size=8, in_channels=1, num_classes=10)
    diffusion = create_diffusion(timestep_respacing="")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
    # A fixed evaluation batch (data, timesteps and noise), so the comparison is not noise.
    gen = torch.Generator().manual_seed(1)
    eval_idx = torch.randint(len(x), (256,), generator=gen)
    eval_t = torch.randint(diffusion.num_timesteps, (256,), generator=gen)
    eval_noise = torch.randn(256, 1, 8, 8, generator=gen)

    def eval_loss():
        with torch.no_grad():
            terms = diffusion.training_losses(model, x[eval_idx], eval_t, dict(y=y[eval_idx]), noise=eval_noise)
        return terms["mse"].mean().item()

    before = eval_loss()
    for _ in range(25):
        idx = torch.randint(len(x), (32,))
        t = torch.randint(diffusion.num_timesteps, (32,))
        loss = diffusion.training_losses(model, x[idx], t, dict(y=y[idx]))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), before, eval_loss()


def test_training_lowers_the_loss(trained):
    _, before, after = trained
    assert before == pytest.approx(1.0, abs=0.1)  # zero output: the epsilon MSE starts at E[eps^2] = 1
    assert after < 0.6 * before, (before, after)  # about 0.4 after 25 steps


def test_cfg_sampling(trained):
    model, _, _ = trained
    diffusion = create_diffusion("10")
    model_fn = classifier_free_guidance(model, cfg_scale=4.0, null_class=model.num_classes)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    samples = {}
    for c in (0, 1):
        torch.manual_seed(0)  # the same noise at every step: only the class differs
        samples[c] = diffusion.p_sample_loop(model_fn, (4, 1, 8, 8), noise=noise.clone(),
                                             model_kwargs=dict(y=torch.full((4,), c)))
    for s in samples.values():
        assert s.shape == (4, 1, 8, 8) and torch.isfinite(s).all()
    assert not torch.allclose(samples[0], samples[1]), "guided samples do not depend on the class"
