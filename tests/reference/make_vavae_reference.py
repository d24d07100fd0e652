"""Record what LightningDiT's own VA-VAE network computes, for tests/test_vae_convert.py to check the LDM -> diffusers
AutoencoderKL conversion (models/vae_convert.py) against.

Regenerate (from the repository root, with the project's environment active; CPU only, seconds):

    git clone https://github.com/hustvl/LightningDiT /path/to/LightningDiT        # or any checkout of it
    python tests/reference/make_vavae_reference.py --official /path/to/LightningDiT --commit <the checkout's commit>

It writes tests/data/vavae_reference.pt (loads with torch.load(weights_only=True)). Nothing of the official code is
copied here: tokenizer/autoencoder.py is imported from the checkout; only what it computes is stored, with the file's
SHA-256.

Stored: (1) a small LDM KL-VAE in LightningDiT's classes (Encoder / Decoder of tokenizer/autoencoder.py with the
VA-VAE's layout at a small size: three levels of 32, 32, 64 channels, one block per level, attention on the lowest
level (4x4) in the encoder and decoder as the VA-VAE has on 16x16, 4 latent channels, 16 px), its parameters refilled
in order with seeded values rounded to fp16 (fill_seeded: the test regenerates them from the stored names and shapes,
so no weights are stored); fixed images; the official posterior mean and log-variance and the official
decode of the mean. (2) The released f16d32 network's key -> shape map (AutoencoderKL(embed_dim=32,
ch_mult=(1, 1, 2, 2, 4)) built on the meta device), so the test can check that every tensor of the real checkpoint
maps onto diffusers' AutoencoderKL.
"""

import argparse
import hashlib
import importlib.util
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO_ROOT / "tests" / "data" / "vavae_reference.pt"
OFFICIAL_FILE = "tokenizer/autoencoder.py"
SMALL = dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=16, z_channels=4,
             in_channels=3, out_ch=3, dropout=0.0)
SEED = 0


def load_official(official):
    path = Path(official).resolve() / OFFICIAL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{official} is not a hustvl/LightningDiT checkout (no {OFFICIAL_FILE})")
    spec = importlib.util.spec_from_file_location("lightningdit_autoencoder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, hashlib.sha256(path.read_bytes()).hexdigest()


class SmallKL(torch.nn.Module):
    """The official AutoencoderKL's modules and encode/decode at a small size (its constructor fixes ch=128)."""

    def __init__(self, official):
        super().__init__()
        self.encoder = official.Encoder(**SMALL, double_z=True)
        self.decoder = official.Decoder(**SMALL)
        z = SMALL["z_channels"]
        self.quant_conv = torch.nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = torch.nn.Conv2d(z, z, 1)


def fill_seeded(names_shapes, seed=SEED):
    """{name: tensor} for [(name, shape)] in order: N(0, 1/fan_in) for matrices and kernels, N(0, 0.1^2) for vectors
    (+1 for GroupNorm weights), rounded to fp16 values. tests/test_vae_convert.py draws the same."""
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for name, shape in names_shapes:
        std = torch.Size(shape)[1:].numel() ** -0.5 if len(shape) > 1 else 0.1
        out[name] = (torch.randn(shape, generator=g) * std + (1.0 if len(shape) == 1 and "norm" in name else 0.0)
                     ).half().float()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="a hustvl/LightningDiT checkout")
    parser.add_argument("--commit", required=True, help="the checkout's commit, recorded with the values")
    parser.add_argument("--out", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args()
    official, sha = load_official(args.official)

    torch.manual_seed(SEED)
    model = SmallKL(official).eval()
    order = [(name, tuple(p.shape)) for name, p in model.state_dict().items()]
    model.load_state_dict(fill_seeded(order))
    x = torch.rand(3, 3, SMALL["resolution"], SMALL["resolution"], generator=torch.Generator().manual_seed(SEED + 2))
    x = x * 2 - 1   # images in [-1, 1]
    with torch.no_grad():
        posterior = official.DiagonalGaussianDistribution(model.quant_conv(model.encoder(x)))
        decoded = model.decoder(model.post_quant_conv(posterior.mean))
    with torch.device("meta"):
        real = official.AutoencoderKL(embed_dim=32, ch_mult=(1, 1, 2, 2, 4))
    torch.save({"commit": args.commit, "file": OFFICIAL_FILE, "sha256": sha, "small_config": SMALL,
                "order": order, "images": x, "mean": posterior.mean, "logvar": posterior.logvar,
                "decoded": decoded,
                "real_shapes": {k: tuple(v.shape) for k, v in real.state_dict().items()}}, args.out)
    print(f"wrote {args.out}: {len(order)} small tensors, {len(real.state_dict())} real keys; decoded "
          f"{tuple(decoded.shape)}, |mean| {posterior.mean.abs().mean():.3f}")


if __name__ == "__main__":
    sys.exit(main())
