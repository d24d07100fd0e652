"""Peak GPU memory of one training step of the ImageNet recipes at their per-GPU batch, with and without activation
checkpointing: whether a recipe fits a GPU as it is, or needs train.grad_checkpoint=true (or a smaller batch per GPU).

    python benchmarks/memory_probe.py                          # the three recipes on this machine's GPU
    python benchmarks/memory_probe.py --tiny --device cpu      # the same path with tiny sizes (the GPU check's dry run)

Each recipe is read from its real config (conf/experiment/*.yaml, composed as train.py composes it): the model and its
options, the latent shape (image size / vae.downsample, vae.latent_channels: SD-VAE 32x32x4 at 256 px, VA-VAE
16x16x32), the objective, the precision and the global batch,
of which one GPU takes train.batch_size / --gpus (8, as the recipes' torchrun commands). One step is train.py's
(train.train_step: forward, loss, backward, gradient norm; then fused AdamW and the EMA update, with the EMA copy on the
GPU as train.py keeps it), the step benchmarks/throughput.py times; the peak is torch.cuda.max_memory_allocated over a
second step, once the optimizer's moments exist. Latents come from a cache (data=latents): encoding images on the fly
adds the VAE's encoder. A step that does not fit prints OOM and the probe goes on.
"""

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import our_step  # noqa: E402
from diffusion import build_objective  # noqa: E402
from models import create_model  # noqa: E402
from utils.ema import update_ema  # noqa: E402
from utils.parallel import checkpoint_activations  # noqa: E402
from utils.speed import attention_backend, resolve_precision  # noqa: E402

# (experiment, what it is); each at train.batch_size / --gpus per GPU.
RECIPES = [("imagenet256", "DiT-XL/2 at 256 px"), ("imagenet512", "DiT-XL/2 at 512 px"),
           ("lightningdit-xl1-vavae-imagenet256", "LightningDiT-XL/1 on VA-VAE latents at 256 px")]
# --tiny: the same families at a CPU size, an eighth of the image size (at least a 4x4 latent), batch 2.
TINY_MODELS = {"DiT-XL/2": "DiT-T/2", "LightningDiT-XL/2": "LightningDiT-Mini/2", "LightningDiT-XL/1": "LightningDiT-Mini/2"}


def recipe(experiment):
    """The experiment's composed config (plain containers): model name and options, image size, objective settings,
    precision, global batch."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"])
    return dict(model=cfg.model.name, kwargs=OmegaConf.to_container(cfg.model.kwargs, resolve=True),
                image_size=cfg.data.image_size, diffusion=OmegaConf.to_container(cfg.diffusion, resolve=True),
                precision=cfg.precision, batch_size=cfg.train.batch_size, vae=cfg.vae.name,
                downsample=cfg.vae.downsample, latent_channels=cfg.vae.latent_channels)


def probe(spec, batch, device, grad_checkpoint):
    """(peak GiB allocated, peak GiB reserved, seconds) of the second of two training steps, or None on OOM."""
    if not spec.get("downsample") or not spec.get("latent_channels"):
        raise ValueError(f"the probe needs a latent recipe (vae.downsample and vae.latent_channels); the recipe has "
                         f"vae={spec['vae']}")
    latent, channels = spec["image_size"] // spec["downsample"], spec["latent_channels"]
    objective = build_objective(spec["diffusion"])
    precision = resolve_precision(spec["precision"], device)
    torch.manual_seed(0)
    with torch.device(device):                           # initialise on the device: seconds, not a minute on the CPU
        model = create_model(spec["model"], input_size=latent, in_channels=channels, num_classes=1000,
                             learn_sigma=objective.learn_sigma, **spec["kwargs"])
        x, y = torch.randn(batch, channels, latent, latent), torch.randint(0, 1000, (batch,))
    ema = copy.deepcopy(model).requires_grad_(False)
    if grad_checkpoint:
        checkpoint_activations(model)
    try:
        train = our_step(model, objective, x, y, precision, device,
                         attention=attention_backend("auto", device, precision, False))

        def step():
            train()
            update_ema(ema, model, 0.9999)
        step()                                           # the AdamW moments come into being here
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated(device) / 2 ** 30, torch.cuda.max_memory_reserved(device) / 2 ** 30,
                    time.perf_counter() - start)
        return None, None, time.perf_counter() - start
    except torch.cuda.OutOfMemoryError:
        return None


def release(device):
    """Give back what the last probe held (called once its frame, and any OOM traceback, are gone)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the global batch is split over (the recipes': 8)")
    parser.add_argument("--tiny", action="store_true", help="tiny models, images and batch (a dry run of the path)")
    parser.add_argument("--experiments", nargs="*", default=None, help="default: " + " ".join(e for e, _ in RECIPES))
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16", "auto"], help="default: the recipe's")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        props = torch.cuda.get_device_properties(device)
        print(f"{props.name}, {props.total_memory / 2 ** 30:.1f} GiB")
    names = dict(RECIPES)
    failed = False
    for experiment in args.experiments or names:
        spec = recipe(experiment)
        batch = spec["batch_size"] // args.gpus
        if args.tiny:
            spec.update(model=TINY_MODELS.get(spec["model"], spec["model"]),
                        image_size=max(spec["image_size"] // 8, 4 * (spec["downsample"] or 1)))
            batch = 2
        if args.precision:
            spec["precision"] = args.precision
        for grad_checkpoint in (False, True):
            label = (f"{names.get(experiment, experiment)} (experiment={experiment}: {spec['model']}, "
                     f"{spec['image_size']} px, {spec['diffusion']['objective']}, {spec['precision']}), batch {batch} "
                     f"per GPU, activation checkpointing {'on' if grad_checkpoint else 'off'}")
            try:
                result = probe(spec, batch, device, grad_checkpoint)
            except Exception as error:  # noqa: BLE001 - report and go on to the next config
                print(f"{label}: failed: {type(error).__name__}: {error}", flush=True)
                failed, result = True, False
            release(device)
            if result is False:
                continue
            if result is None:
                print(f"{label}: OOM", flush=True)
            elif result[0] is None:
                print(f"{label}: step {result[2]:.2f} s (no peak memory on {device.type})", flush=True)
            else:
                print(f"{label}: peak {result[0]:.1f} GiB allocated, {result[1]:.1f} GiB reserved, step {result[2]:.2f} s",
                      flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
