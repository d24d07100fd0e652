"""models/vae_convert.py: LDM KL-VAE checkpoints (LightningDiT's VA-VAE) -> diffusers AutoencoderKL, checked against
what LightningDiT's own network computes (tests/reference/make_vavae_reference.py -> tests/data/vavae_reference.pt)."""

import importlib.util

import pytest
import torch

from conftest import ROOT
from models.vae import VAE
from models.vae_convert import convert, diffusers_config, main, to_autoencoder_kl
from utils.errors import ConfigError

REFERENCE = torch.load(ROOT / "tests" / "data" / "vavae_reference.pt", weights_only=True)


def _reference_script():
    spec = importlib.util.spec_from_file_location("make_vavae_reference",
                                                  ROOT / "tests" / "reference" / "make_vavae_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_checkpoint():
    """The reference's small VA-VAE as a released .pt would hold it: under 'state_dict', with training tensors."""
    weights = _reference_script().fill_seeded(REFERENCE["order"])
    return {"state_dict": {**weights, "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight":
                           torch.ones(2, 3, 4, 4), "foundation_model.model.w": torch.ones(3)}, "epoch": 7}


def test_the_converted_autoencoder_encodes_and_decodes_as_lightningdits_network():
    model, dropped = to_autoencoder_kl(small_checkpoint(), sample_size=REFERENCE["small_config"]["resolution"])
    assert dropped == {"loss": 2, "foundation_model": 1}
    with torch.no_grad():
        moments = model.encode(REFERENCE["images"]).latent_dist
        decoded = model.decode(REFERENCE["mean"]).sample
    torch.testing.assert_close(moments.mean, REFERENCE["mean"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moments.logvar, REFERENCE["logvar"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decoded, REFERENCE["decoded"], rtol=1e-5, atol=1e-5)
    assert model.config.down_block_types[-1] == "AttnDownEncoderBlock2D"   # the 4x4 level attends, as in the LDM
    assert model.config.up_block_types[0] == "AttnUpDecoderBlock2D"
    # The in-level attention carries weight: with its output projection zeroed the decode is another function.
    with torch.no_grad():
        for block in model.decoder.up_blocks[0].attentions:
            block.to_out[0].weight.zero_()
        assert (model.decode(REFERENCE["mean"]).sample - REFERENCE["decoded"]).abs().max() > 1e-2


def test_every_tensor_of_the_released_f16d32_network_maps_onto_autoencoder_kl():
    from diffusers import AutoencoderKL

    sd = {k: torch.empty(shape, device="meta") for k, shape in REFERENCE["real_shapes"].items()}
    config = diffusers_config(sd)
    assert config["block_out_channels"] == [128, 128, 256, 256, 512] and config["latent_channels"] == 32
    assert config["down_block_types"] == ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"]
    assert config["up_block_types"] == ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 4
    assert config["layers_per_block"] == 2 and config["mid_block_add_attention"]
    with torch.device("meta"):
        expected = AutoencoderKL(**config).state_dict()
    converted = convert(sd, config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert len(converted) == len(sd)   # every LDM tensor used once


def test_the_command_writes_a_folder_that_loads_as_the_tokenizer(tmp_path, capsys):
    ckpt, out = tmp_path / "vavae.pt", tmp_path / "va-vae"
    torch.save(small_checkpoint(), ckpt)
    main([str(ckpt), str(out), "--sample-size", "16"])
    assert "left out: {'loss': 2, 'foundation_model': 1}" in capsys.readouterr().out
    vae = VAE.from_pretrained(out, local_files_only=True, scaling_factor=1.0)
    moments = vae.encode_moments(REFERENCE["images"])
    torch.testing.assert_close(moments[:, :4], REFERENCE["mean"], rtol=1e-5, atol=1e-5)
    # A second conversion into the same folder is refused rather than overwriting it.
    with pytest.raises(SystemExit, match="already holds a model"):
        main([str(ckpt), str(out)])


def test_bad_input_is_refused_with_the_reason(tmp_path):
    with pytest.raises(SystemExit, match="does not exist .*hustvl/vavae-imagenet256-f16d32-dinov2"):
        main([str(tmp_path / "missing.pt"), str(tmp_path / "out")])
    with pytest.raises(ConfigError, match="no LDM autoencoder in this checkpoint"):
        to_autoencoder_kl({"state_dict": {"model.diffusion_model.x": torch.ones(2)}})
    checkpoint = small_checkpoint()
    del checkpoint["state_dict"]["post_quant_conv.weight"]
    with pytest.raises(ConfigError, match="not a complete LDM KL-VAE: it has no 'post_quant_conv.weight'"):
        to_autoencoder_kl(checkpoint)
    checkpoint = small_checkpoint()
    checkpoint["state_dict"]["quant_conv.weight"] = torch.ones(4, 8, 1, 1)   # 4 = latent channels: not mean + logvar
    with pytest.raises(ConfigError, match="not a KL posterior"):
        to_autoencoder_kl(checkpoint)
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": small_checkpoint()["state_dict"], "config": ConfigError("an object")}, pickled)
    with pytest.raises(SystemExit, match="pass --allow-pickle"):
        main([str(pickled), str(tmp_path / "out2")])
