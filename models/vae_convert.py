"""Latent-diffusion (LDM / taming) KL-autoencoder checkpoints -> diffusers AutoencoderKL folders, including attention
inside the resolution levels, which diffusers' single-file converter leaves unmapped. LightningDiT's VA-VAE
(vavae-imagenet256-f16d32-dinov2.pt: five levels, 32 channels, attention on the 16x16 level of the encoder and the
decoder) is such a checkpoint; converted, it loads with `vae=va-vae-f16d32 vae.path=<folder>`.

    python -m models.vae_convert /path/to/vavae-imagenet256-f16d32-dinov2.pt /path/to/va-vae-f16d32

The architecture is read from the checkpoint's shapes (channels per level, blocks per level, latent channels, which
levels attend), so any LDM KL-VAE converts; the mapping of every tensor is diffusers' own
(diffusers.loaders.single_file_utils), with the in-level attention blocks mapped the same way as the middle block's.
Tensors outside the autoencoder (the training loss, LPIPS, discriminator, VA-VAE's DINOv2 alignment) are left out and
counted. The conversion is checked against LightningDiT's own network (tests/reference/make_vavae_reference.py).
"""

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

import torch

from utils.errors import ConfigError, MissingFile

AUTOENCODER_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
NORM_GROUPS = 32   # the LDM's Normalize(): GroupNorm(32, eps 1e-6), as diffusers' AutoencoderKL default


def ldm_state_dict(checkpoint):
    """The autoencoder's tensors of an LDM checkpoint (a bare state dict, or one under 'state_dict' / 'model', with or
    without a 'first_stage_model.' prefix), and how many tensors of each other top-level name were left out."""
    sd = checkpoint
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    sd = {k.removeprefix("first_stage_model."): v for k, v in sd.items() if torch.is_tensor(v)}
    kept = {k: v for k, v in sd.items() if k.startswith(AUTOENCODER_PREFIXES)}
    dropped = Counter(k.split(".")[0] for k in sd if k not in kept)
    if not any(k.startswith("encoder.down.") for k in kept):
        raise ConfigError("no LDM autoencoder in this checkpoint: expected encoder.down.*, decoder.up.*, quant_conv.* "
                          f"tensors; found top-level names {sorted(Counter(k.split('.')[0] for k in sd))[:8]}")
    return kept, dict(dropped)


def _levels(sd, pattern):
    """{level: {block indices}} of the keys matching pattern (groups: level, block)."""
    found = {}
    for key in sd:
        m = re.match(pattern, key)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return found


def diffusers_config(sd):
    """The AutoencoderKL config of an LDM KL-VAE, read from its tensors' shapes."""
    blocks = _levels(sd, r"encoder\.down\.(\d+)\.block\.(\d+)\.")
    levels = len(blocks)
    channels = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    enc_attn = _levels(sd, r"encoder\.down\.(\d+)\.attn\.(\d+)\.")
    dec_attn = _levels(sd, r"decoder\.up\.(\d+)\.attn\.(\d+)\.")
    latent = sd["post_quant_conv.weight"].shape[0]
    if sd["quant_conv.weight"].shape[0] != 2 * latent:
        raise ConfigError(f"quant_conv gives {sd['quant_conv.weight'].shape[0]} channels for {latent} latent channels: "
                          f"not a KL posterior (mean and log-variance); only KL-VAEs convert to AutoencoderKL")
    return {
        "in_channels": sd["encoder.conv_in.weight"].shape[1],
        "out_channels": sd["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["AttnDownEncoderBlock2D" if i in enc_attn else "DownEncoderBlock2D" for i in range(levels)],
        # diffusers' up blocks run from the lowest resolution: up_blocks[k] is the LDM's up[levels - 1 - k]
        "up_block_types": ["AttnUpDecoderBlock2D" if levels - 1 - k in dec_attn else "UpDecoderBlock2D"
                           for k in range(levels)],
        "block_out_channels": channels,
        "layers_per_block": len(blocks[0]),
        "latent_channels": latent,
        "norm_num_groups": NORM_GROUPS,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
    }


def convert(sd, config):
    """diffusers' LDM VAE mapping, plus the attention blocks inside levels (encoder.down.i.attn.j ->
    encoder.down_blocks.i.attentions.j; decoder.up.(L-1-k).attn.j -> decoder.up_blocks.k.attentions.j)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, update_vae_attentions_ldm_to_diffusers

    in_level = re.compile(r"(encoder\.down|decoder\.up)\.\d+\.attn\.")
    out = convert_ldm_vae_checkpoint({k: v for k, v in sd.items() if not in_level.match(k)}, config)
    levels = len(config["block_out_channels"])
    for (side, i, j), keys in _group(k for k in sd if in_level.match(k)).items():
        new = f"down_blocks.{i}" if side == "encoder.down" else f"up_blocks.{levels - 1 - i}"
        update_vae_attentions_ldm_to_diffusers(keys, out, sd, {"old": f"{side.split('.')[1]}.{i}.attn.{j}",
                                                               "new": f"{new}.attentions.{j}"})
    return out


def _group(keys):
    groups = {}
    for key in keys:
        side, i, j = re.match(r"(encoder\.down|decoder\.up)\.(\d+)\.attn\.(\d+)\.", key).groups()
        groups.setdefault((side, int(i), int(j)), []).append(key)
    return groups


def to_autoencoder_kl(checkpoint, sample_size=256):
    """An LDM checkpoint (dict) -> (diffusers AutoencoderKL with its weights, tensors left out per name); every
    parameter of the AutoencoderKL must come from the checkpoint and every autoencoder tensor must be used."""
    from diffusers import AutoencoderKL

    sd, dropped = ldm_state_dict(checkpoint)
    try:
        config = diffusers_config(sd)
    except KeyError as missing:
        raise ConfigError(f"not a complete LDM KL-VAE: it has no {missing} tensor") from None
    model = AutoencoderKL(**config, sample_size=sample_size)
    weights = convert(sd, config)
    expected = model.state_dict()
    missing, unused = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unused or wrong:
        raise ConfigError(f"the checkpoint does not map onto AutoencoderKL({config}): missing {missing[:5]}, unused "
                          f"{unused[:5]}, shape mismatches {wrong[:5]}")
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)   # copied into its own tensors
    return model.eval(), dropped


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the LDM checkpoint (.pt / .ckpt / .safetensors)")
    parser.add_argument("out", help="the diffusers folder to write (config.json + diffusion_pytorch_model.safetensors)")
    parser.add_argument("--sample-size", type=int, default=256, help="the image size the VAE was trained at")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load a checkpoint that holds Python objects besides tensors (runs its pickle: only for "
                             "files you trust)")
    args = parser.parse_args(argv)
    path, out = Path(args.checkpoint), Path(args.out)
    try:
        if not path.is_file():
            raise MissingFile(f"{path} does not exist (LightningDiT's VA-VAE: vavae-imagenet256-f16d32-dinov2.pt from "
                              f"https://huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2)")
        if (out / "config.json").exists():
            raise ConfigError(f"{out} already holds a model (config.json): choose another folder or remove it")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            checkpoint = load_file(path)
        else:
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=not args.allow_pickle)
            except Exception as error:  # torch's UnpicklingError names the global it refused
                raise ConfigError(f"{path} holds more than tensors and torch refused to unpickle it "
                                  f"({str(error).splitlines()[0]}); if you trust the file, pass --allow-pickle") from None
        model, dropped = to_autoencoder_kl(checkpoint, args.sample_size)
    except (ConfigError, MissingFile) as error:
        sys.exit(f"error: {error}")
    model.save_pretrained(out)
    c = model.config
    print(f"wrote {out}: AutoencoderKL, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{len(c.block_out_channels)} levels {list(c.block_out_channels)}, {c.latent_channels} latent channels, "
          f"blocks {list(c.down_block_types)}; left out: {dropped or 'nothing'}. Use it with vae.path={out}")


if __name__ == "__main__":
    main()
