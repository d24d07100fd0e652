"""Training images/s from a latent cache against encoding with the VAE on the fly, DiT-S/2 at 256x256; and, with
--codecs, each tokenizer's encode and decode alone.

    python benchmarks/latent_cache.py           # CPU: batch 2, 3 timed steps, 4 images; about 2-3 minutes on 2 cores
    python benchmarks/latent_cache.py --device cuda --batch-size 64 --steps 20 --warmup 5 --images 512 \
        --workers 8 --precision bf16
    python benchmarks/latent_cache.py --codecs --device cuda --batch-size 32 --steps 3   # the GPU check's stage
    python benchmarks/latent_cache.py --codecs --tiny --image-size 32 --batch-size 2 --steps 1   # its CPU dry run

--codecs times encode (images -> the encoder's output: posterior moments or DC-AE's latent) and decode (latents ->
images) of the SD-VAE architecture (conf/vae/sd-vae-ft-*, and sdxl-vae: SDXL retrained the same architecture) and of
DC-AE f32c32 (conf/vae/dc-ae-f32c32: mit-han-lab/dc-ae-f32c32-in-1.0), random weights from the configs below (speed
does not depend on the weights), at --image-size (256) and --batch-size, as images/s over --steps calls after
--warmup, in fp32 (TF32 off: what models/vae.py asks for), tf32 (TF32 matmuls and convolutions: train.py's tf32=true
on the VAE inside a training step) and bf16 (weights and inputs cast: a possible fast path, not what the code runs).
--tiny: small widths of the same block types (the CPU dry run). RAE is not timed: diffusers' AutoencoderRAE needs
transformers for its DINOv2 encoder.

Both runs do what train.py does per step, with train.py's own helpers: load a batch through a DataLoader driven
by the step-indexed sampler, draw the step's flips and posterior noise, build the latents (on the fly: ADM crop of
a JPEG, flip, SD-VAE encoder in fp32; from the cache: pick the stored flip, mean + std * eps), then the diffusion
loss, backward, AdamW and the EMA update. The VAE is randomly initialised with the real SD-VAE architecture
(block_out_channels 128/256/512/512, 2 layers per block, 4 latent channels: 83.7M parameters), built from a
config dict, so nothing is downloaded; its speed is that of the real one. The cache is written by
extract_latents.py from the same images (timed too: the one-off cost), so its layout and reading are the real ones.
"""

import argparse
import copy
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
import extract_latents  # noqa: E402
from data import StepSampler, build_dataset  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from models import VAE, create_model, model_stats  # noqa: E402
from data.batches import apply_flips, step_generator  # noqa: E402
from utils.ema import update_ema  # noqa: E402

# Stable Diffusion's VAE (stabilityai/sd-vae-ft-ema config.json), minus the weights.
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                     layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256,
                     scaling_factor=0.18215)
# DC-AE f32c32, the ImageNet release (mit-han-lab/dc-ae-f32c32-in-1.0-diffusers, conf/vae/dc-ae-f32c32): 6 stages
# (3 residual, 3 EfficientViT), 32x downsampling, 32 channels; 323M parameters.
DC_AE_F32C32_CONFIG = dict(in_channels=3, latent_channels=32, attention_head_dim=32,
                           encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
                           decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
                           encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                           decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                           encoder_layers_per_block=(0, 4, 8, 2, 2, 2), decoder_layers_per_block=(0, 5, 10, 2, 2, 2),
                           encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6,
                           decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3,
                           decoder_act_fns=("relu",) * 3 + ("silu",) * 3, scaling_factor=0.3189)
# --tiny: the same block types at CPU widths (the GPU check's dry run).
TINY_CODECS = {
    "SD-VAE": {**SD_VAE_CONFIG, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1},
    "DC-AE f32c32": {**DC_AE_F32C32_CONFIG, "attention_head_dim": 8,
                     "encoder_block_out_channels": (8, 16, 16, 16, 32, 32),
                     "decoder_block_out_channels": (8, 16, 16, 16, 32, 32),
                     "encoder_layers_per_block": (0, 1, 1, 1, 1, 1), "decoder_layers_per_block": (0, 1, 1, 1, 1, 1)},
}
CODECS = {"SD-VAE": SD_VAE_CONFIG, "DC-AE f32c32": DC_AE_F32C32_CONFIG}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_images(root, count, classes=2, seed=0):
    """JPEGs shaped like ImageNet's (500x375), smooth like photographs rather than white noise."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        low.resize((500, 375), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)


def encoder_gflops(vae, image_size):
    """Forward multiply-accumulates of the encoder for one image, in G (the DiT paper's 'Gflops')."""
    x = torch.zeros(1, 3, image_size, image_size, device=next(vae.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        vae.encode_moments(x)
    return counter.get_total_flops() / 2 / 1e9


def train_throughput(dataset, vae, cached, args, device):
    """Images/s of train.py's step (data, latents, loss, backward, AdamW, EMA) on this dataset."""
    torch.manual_seed(0)
    latent = args.image_size // vae.downsample
    shape = (vae.latent_channels, latent, latent)
    model = create_model(args.model, input_size=latent, in_channels=shape[0], num_classes=dataset.num_classes)
    model.to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    diffusion = create_diffusion(timestep_respacing="")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    b = args.batch_size
    loader = iter(DataLoader(dataset, batch_size=b, sampler=StepSampler(len(dataset), b, seed=0),
                             num_workers=args.workers, pin_memory=device.type == "cuda", drop_last=True))

    def step(i):
        x, y = next(loader)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        gen = step_generator(0, i, device)
        t = torch.randint(0, diffusion.num_timesteps, (b,), generator=gen, device=device)
        noise = torch.randn((b, *shape), generator=gen, device=device)
        flip = torch.rand(b, generator=gen, device=device) < 0.5
        x = apply_flips(x, flip, cached)
        eps = torch.randn((b, *shape), generator=gen, device=device)
        z = vae.latents(x if cached else vae.encode_moments(x), eps)
        with autocast:
            loss = diffusion.training_losses(model, z, t, dict(y=y), noise=noise)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, model, 0.9999)

    for i in range(args.warmup):
        step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    sync(device)
    return b * args.steps / (time.perf_counter() - start)


def codec_speed(args, device):
    """--codecs: images/s of encode and decode of each tokenizer architecture, per precision; the Gflops per image."""
    from diffusers import AutoencoderDC

    b, size = args.batch_size, args.image_size
    print(f"tokenizers at {size}x{size}, batch {b}, {args.steps} timed calls after {args.warmup} warm-up, device "
          f"{device}, torch {torch.__version__}, random weights" + (" (--tiny: CPU widths)" if args.tiny else ""))
    cuda = device.type == "cuda"
    for name, config in (TINY_CODECS if args.tiny else CODECS).items():
        torch.manual_seed(0)
        with device:
            ae = (AutoencoderKL if name == "SD-VAE" else AutoencoderDC)(**config).eval().requires_grad_(False)
        kl = name == "SD-VAE"

        def encode(x):   # what models/vae.py's encode_moments keeps: posterior [mean; log-variance], or the latent
            out = ae.encode(x)
            return torch.cat([out.latent_dist.mean, out.latent_dist.logvar], 1) if kl else out.latent

        def decode(z):
            return ae.decode(z).sample

        x = torch.rand(b, 3, size, size, device=device) * 2 - 1
        z = encode(x[:1])
        z = torch.randn(b, z.shape[1] // (2 if kl else 1), *z.shape[2:], device=device)
        with FlopCounterMode(display=False) as counter:
            encode(x[:1])
        enc_gflops = counter.get_total_flops() / 2e9
        with FlopCounterMode(display=False) as counter:
            decode(z[:1])
        params = sum(p.numel() for p in ae.parameters()) / 1e6
        print(f"  {name}: {params:.1f}M parameters; latents {'x'.join(map(str, z.shape[1:]))}; encoder "
              f"{enc_gflops:.1f}, decoder {counter.get_total_flops() / 2e9:.1f} Gflops per image")
        for precision in ("fp32", "tf32", "bf16"):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            torch.nn.Module.to(ae, dtype)   # as nn.Module does (diffusers' own .to warns about keep-in-fp32 modules)
            line = []
            for what, fn, inp in (("encode", encode, x.to(dtype)), ("decode", decode, z.to(dtype))):
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    for _ in range(args.warmup):
                        fn(inp)
                    sync(device)
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        fn(inp)
                    sync(device)
                    seconds = (time.perf_counter() - start) / args.steps
                    memory = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if cuda else ""
                    line.append(f"{what} {b / seconds:8.1f} images/s ({seconds * 1000:.0f} ms/batch{memory})")
                except torch.OutOfMemoryError:
                    line.append(f"{what} OOM")
                    torch.cuda.empty_cache()
            print(f"    {precision}: " + "; ".join(line), flush=True)
        del ae
        if cuda:
            torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True   # torch's defaults


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per data source")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--images", type=int, default=4, help="images in the folder and the cache (cycled)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="autocast of the DiT")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--codecs", action="store_true", help="time the tokenizers' encode and decode instead "
                        "(SD-VAE = SDXL-VAE architecture, DC-AE f32c32; fp32, tf32, bf16)")
    parser.add_argument("--tiny", action="store_true", help="with --codecs: CPU widths (the GPU check's dry run)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.codecs:
        with torch.inference_mode():
            codec_speed(args, device)
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_images(tmp / "images", args.images)
        torch.manual_seed(0)
        AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(tmp / "vae")   # loaded back through the real path
        vae = VAE.from_pretrained(tmp / "vae").to(device)

        start = time.perf_counter()
        extract_latents.extract(OmegaConf.create({
            "data": {"name": "imagenet", "path": str(tmp / "images"), "image_size": args.image_size,
                     "random_flip": True, "num_workers": args.workers},
            "vae": {"name": "local", "id": None, "path": str(tmp / "vae"), "subfolder": None, "scaling_factor": None},
            "out": str(tmp / "cache"), "shard_size": 4096, "batch_size": max(args.batch_size, 1), "dtype": "float32",
            "device": args.device}))
        extract_rate = args.images / (time.perf_counter() - start)

        images = build_dataset("imagenet", path=tmp / "images", image_size=args.image_size)
        cache = build_dataset("latents", path=tmp / "cache")
        fly = train_throughput(images, vae, cached=False, args=args, device=device)
        cached = train_throughput(cache, vae, cached=True, args=args, device=device)

    latent = args.image_size // vae.downsample
    dit = model_stats(lambda: create_model(args.model, input_size=latent), (4, latent, latent))["gflops"]
    print(f"{args.model} at {args.image_size}x{args.image_size} (latents 4x{latent}x{latent}), "
          f"batch {args.batch_size}, {args.precision}, {args.steps} timed steps after {args.warmup} warm-up, device {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"  SD-VAE encoder: {encoder_gflops(vae, args.image_size):.1f} Gflops per image; "
          f"DiT training step: {3 * dit:.1f} Gflops per image (3 x {dit:.2f})")
    print(f"  extraction (one-off, both flips): {extract_rate:.3f} images/s")
    print(f"  training, encoding on the fly:    {fly:.3f} images/s")
    print(f"  training, from the latent cache:  {cached:.3f} images/s")
    print(f"  cache / on the fly: {cached / fly:.1f}x")


if __name__ == "__main__":
    main()
