"""Sample from a trained model and write ADM-format samples.npz (+ grid.png, samples.json provenance).

    python sample.py ckpt=runs/digits/DiT-T-2                 # newest checkpoint of a run, EMA weights
    torchrun --nproc_per_node=8 sample.py ckpt=DiT-XL-2-256x256.pt num_samples=50000 cfg_scale=1.5 cfg_channels=3

Latent models are decoded to images by the VAE recorded in the checkpoint (official DiT checkpoints: sd-vae-ft-ema);
`vae=sd-vae-ft-mse` (plus `vae.path=/local/folder` offline) decodes with another one.

Under torchrun each rank draws a contiguous block of the samples; rank 0 merges them into one npz in order.
The starting noise of sample i is drawn from a generator seeded by (seed, i), so it does not depend on the
number of processes or the batch size.
"""

import json
import math
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from diffusion.sampling import resolve_sampler, sample
from models import VAE, DiT, build_vae, create_model
from models.dit import DIT_SIZES, EXTRA_SIZES
from utils.checkpoint import load_checkpoint, resolve_checkpoint
from utils.distributed import barrier, cleanup_distributed, setup_distributed
from utils.images import save_grid, to_uint8
from utils.speed import forward_context, resolve_precision
from utils.errors import ConfigError, report_user_errors

# The VAE of the official DiT checkpoints (latent models at 256 and 512), when no vae= is given.
OFFICIAL_VAE = Path(__file__).resolve().parent / "conf" / "vae" / "sd-vae-ft-ema.yaml"


def official_model_args(state_dict):
    """Rebuild the constructor arguments of an official DiT checkpoint (a bare state_dict) from its shapes.

    The number of heads leaves no trace in the shapes, so the size is looked up in the size table by its
    depth and width (a wrong head count would load with strict=True and silently compute something else).
    """
    patch_weight = state_dict["x_embedder.proj.weight"]               # (D, C, p, p)
    hidden, in_channels, patch = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[-1]
    grid = math.isqrt(state_dict["pos_embed"].shape[1])
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // patch ** 2
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    sizes = {(v["depth"], v["hidden_size"]): v for v in {**DIT_SIZES, **EXTRA_SIZES}.values()}
    if (depth, hidden) not in sizes:
        raise ConfigError(f"the checkpoint's DiT has depth {depth} and width {hidden}, which is no size in "
                         f"models/dit.py ({', '.join(f'{d}x{w}' for d, w in sizes)}); add it to the size table")
    return dict(input_size=grid * patch, patch_size=patch, in_channels=in_channels, **sizes[(depth, hidden)],
                num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
                learn_sigma=out_channels == 2 * in_channels)


def load_sampling_model(path, use_ema=True, ckpt=None):
    """(model, info) from our checkpoint or an official DiT .pt (`ckpt`: the file's contents, when already read);
    info has model_args, diffusion kwargs, step."""
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    if "model_args" in ckpt:  # ours
        args = dict(ckpt["model_args"])
        vae = args.pop("vae", None)   # how to rebuild the VAE of a latent model; None in pixel space
        model = create_model(args.pop("name"), **args)
        model.load_state_dict(ckpt["ema" if use_ema else "model"], strict=True)
        return model, {"model_args": ckpt["model_args"], "diffusion": ckpt["config"]["diffusion"],
                       "step": ckpt["step"], "weights": "ema" if use_ema else "model", "vae": vae,
                       "latent": vae is not None}
    if "x_embedder.proj.weight" in ckpt:  # an official DiT checkpoint: a bare state_dict of the model
        args = official_model_args(ckpt)
        model = DiT(**args)
        model.load_state_dict(ckpt, strict=True)
        return model, {"model_args": {"name": "official DiT", **args}, "diffusion": {"learn_sigma": args["learn_sigma"]},
                       "step": None, "weights": "official", "vae": None, "latent": True}
    raise ConfigError(f"{path} is neither a checkpoint of this codebase (keys model/ema/model_args) nor an "
                     f"official DiT state_dict (key x_embedder.proj.weight); found keys {list(ckpt)[:8]}")


def load_decoder(vae_cfg, info, channels):
    """The VAE that decodes the model's latents, or None for a pixel model: `vae=` when given, else the one
    recorded in the checkpoint, else (official DiT checkpoints) sd-vae-ft-ema."""
    if vae_cfg is not None:
        vae = build_vae(**vae_cfg)
        if (vae is None) == info["latent"]:
            fix = "choose a VAE to decode its latents" if info["latent"] else "leave out vae="
            raise ConfigError(f"vae={vae_cfg['name']} does not fit a {'latent' if info['latent'] else 'pixel'}-space "
                             f"model; {fix}")
    elif info["vae"] is not None:  # ours: the recorded folder if it is here, else the recorded hub id
        recorded = info["vae"]
        path = recorded.get("path")
        source = path if path and Path(path).is_dir() else recorded["id"]
        vae = VAE.from_pretrained(source, subfolder=recorded.get("subfolder"), identifier=recorded["id"],
                                  scaling_factor=recorded["scaling_factor"])
    elif info["latent"]:
        vae = build_vae(**OmegaConf.load(OFFICIAL_VAE))
    else:
        return None
    recorded = info.get("vae") or {}
    if "channel_mean" in recorded:  # trained on normalised latents: decoding undoes the normalisation
        vae.set_channel_stats(recorded["channel_mean"], recorded["channel_std"])
    if vae.latent_channels != channels:
        raise ConfigError(f"the VAE {vae.identifier} has {vae.latent_channels} latent channels but the model "
                         f"takes {channels}; choose the VAE it was trained with (vae=...)")
    return vae


TRAINING_ONLY = ("time_sampling", "time_mean", "time_std", "cosine_loss", "loss_weight", "train_eps", "use_kl",
                 "rescale_learned_sigmas", "timestep_respacing")


def load_guide(cfg, info, device, set_aside):
    """Autoguidance's guide network (guidance=auto): a checkpoint or run folder of the same objective and data as
    the main model, smaller or less trained; refused with the reason when it does not fit."""
    if cfg.guidance not in ("cfg", "auto"):
        raise ConfigError(f"guidance={cfg.guidance!r}; choose cfg (classifier-free) or auto (autoguidance, with "
                         f"guide_ckpt=<checkpoint or run_dir>)")
    if cfg.guidance == "cfg":
        if cfg.guide_ckpt is not None:
            raise ConfigError("guide_ckpt is autoguidance's guide: add guidance=auto (or leave guide_ckpt out)")
        return None
    if cfg.guide_ckpt is None:
        raise ConfigError("guidance=auto needs guide_ckpt=<checkpoint or run_dir> of a smaller or earlier model "
                         "trained with the same objective on the same data")
    path, ckpt = resolve_checkpoint(cfg.guide_ckpt, set_aside=set_aside)
    guide, guide_info = load_sampling_model(path, cfg.guide_use_ema, ckpt)
    main, other = info["model_args"], guide_info["model_args"]
    same = lambda key, a, b: a.get(key) == b.get(key)
    problems = [f"{key} {main.get(key)} against the guide's {other.get(key)}" for key in
                ("input_size", "in_channels", "num_classes", "learn_sigma") if not same(key, main, other)]
    if not same("vae", main, other) and (main.get("vae") or {}).get("id") != (other.get("vae") or {}).get("id"):
        problems.append(f"the VAE {(main.get('vae') or {}).get('id')} against the guide's "
                        f"{(other.get('vae') or {}).get('id')}")
    # What sampling reads of the objective must agree; how training drew t or weighted the loss may differ.
    objective = lambda d: {"objective": "ddpm", **{k: v for k, v in d.items() if k not in TRAINING_ONLY}}
    if objective(info["diffusion"]) != objective(guide_info["diffusion"]):
        problems.append(f"diffusion {info['diffusion']} against the guide's {guide_info['diffusion']}")
    if problems:
        raise ConfigError(f"the guide {path} does not fit the model: {'; '.join(problems)}. Autoguidance needs a "
                         f"guide trained with the same objective on the same data (a smaller or earlier model)")
    return guide.to(device).eval(), path


SAMPLER_KEYS = ("sampler", "steps", "eta", "cfg_scale", "cfg_channels", "guidance_low", "guidance_high", "time_shift",
                "ode", "sde")


def sampler_options(cfg, diffusion_kwargs):
    """The sampler settings of the config, with `auto` and a missing step count resolved for this checkpoint."""
    options = {k: OmegaConf.to_container(cfg[k]) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in SAMPLER_KEYS}
    options["sampler"], options["steps"] = resolve_sampler(diffusion_kwargs, cfg.sampler, cfg.steps)
    return options


def default_out(ckpt_arg, cfg, options):
    """Where samples go by default: inside the run folder when given one."""
    name = options["sampler"] + (f"-{options['ode']['method']}" if options["sampler"] == "ode" else "")
    tag = f"{name}{options['steps']}-{'auto' if cfg.guidance == 'auto' else 'cfg'}{cfg.cfg_scale:g}-seed{cfg.seed}"
    base = Path(ckpt_arg)
    return (base / "samples" if base.is_dir() else Path("samples") / base.stem) / tag


def run(cfg):
    dist = setup_distributed(cfg.device, tf32=cfg.tf32)
    device = dist.device
    ckpt_path, ckpt = resolve_checkpoint(cfg.ckpt, set_aside=dist.is_main)   # a run folder: its newest that loads
    model, info = load_sampling_model(ckpt_path, cfg.use_ema, ckpt)
    del ckpt
    model = model.to(device).eval()
    args = info["model_args"]
    num_classes, channels, size = args["num_classes"], args["in_channels"], args["input_size"]
    vae = load_decoder(cfg.vae, info, channels)
    if vae is not None:
        vae.to(device)
    # What lands on disk: decoded RGB images for latent models.
    image_channels, image_size = (vae.image_channels, size * vae.downsample) if vae else (channels, size)
    options = sampler_options(cfg, info["diffusion"])   # a sampler that does not fit the objective stops here
    guide, guide_path = load_guide(cfg, info, device, dist.is_main) or (None, None)
    out = Path(cfg.out) if cfg.out else default_out(cfg.ckpt, cfg, options)
    labels_cycle = list(cfg.class_labels) if cfg.class_labels else list(range(max(num_classes, 1)))
    if num_classes == 0:
        labels_cycle = [0]
    for label in labels_cycle:
        if not 0 <= label <= num_classes:
            raise ConfigError(f"class label {label} is outside 0..{num_classes} ({num_classes} = the null class)")

    # This rank's contiguous block of sample indices.
    indices = np.array_split(np.arange(cfg.num_samples), dist.world_size)[dist.rank]
    precision = resolve_precision(cfg.precision, device)  # auto: bf16 where it is fast (utils/speed.py)
    autocast = forward_context(precision, device)  # bf16 autocast for the network when precision is bf16
    images, labels = [], []
    torch.manual_seed(cfg.seed * 1000 + dist.rank)  # the per-step noise of DDPM, DDIM(eta > 0) and the SDE
    batches = [indices[i:i + cfg.batch_size] for i in range(0, len(indices), cfg.batch_size)]
    for batch in tqdm(batches, desc=f"sampling (rank {dist.rank})", disable=not dist.is_main):
        noise = torch.stack([torch.randn(channels, size, size, generator=torch.Generator().manual_seed(
            cfg.seed * 1_000_003 + int(i))) for i in batch]).to(device)
        y = torch.tensor([labels_cycle[int(i) % len(labels_cycle)] for i in batch], device=device)
        with torch.no_grad(), autocast():
            x0 = sample(model, noise, y, null_class=num_classes, **options, guidance=cfg.guidance, guide_model=guide,
                        clip_denoised=vae is None, diffusion_kwargs=info["diffusion"])  # latents are not in [-1, 1]
        if vae is not None:
            x0 = vae.decode(x0)                                          # fp32, (n, 3, H, W) in [-1, 1]
        images.append(to_uint8(x0).permute(0, 2, 3, 1).cpu().numpy())   # (n, H, W, C) uint8
        labels.append(y.cpu().numpy().astype(np.int64))

    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    arr = np.concatenate(images) if images else np.zeros((0, image_size, image_size, image_channels), np.uint8)
    lab = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
    np.savez(shard_dir / f"rank{dist.rank:05d}.npz", arr_0=arr, arr_1=lab)
    barrier()
    if dist.is_main:
        # One array filled shard by shard: peak memory is the samples plus one shard, not twice the samples.
        arr = np.empty((cfg.num_samples, image_size, image_size, image_channels), np.uint8)
        lab = np.empty((cfg.num_samples,), np.int64)
        start = 0
        for r in range(dist.world_size):
            with np.load(shard_dir / f"rank{r:05d}.npz") as shard:
                n = len(shard["arr_1"])
                arr[start:start + n], lab[start:start + n] = shard["arr_0"], shard["arr_1"]
            start += n
        assert start == cfg.num_samples, f"the shards hold {start} samples, expected {cfg.num_samples}"
        np.savez(out / "samples.npz", arr_0=arr, arr_1=lab)
        for r in range(dist.world_size):
            (shard_dir / f"rank{r:05d}.npz").unlink()
        shard_dir.rmdir()
        nrow = len(labels_cycle) if len(labels_cycle) <= 16 else 8
        grid = torch.from_numpy(arr[: nrow * 8]).permute(0, 3, 1, 2)
        save_grid(grid, out / "grid.png", nrow=nrow)
        provenance = {"ckpt": str(ckpt_path), "step": info["step"], "weights": info["weights"],
                      "model": args, "vae": vae.identifier if vae else None,
                      "objective": info["diffusion"].get("objective", "ddpm"), **options, "guidance": cfg.guidance,
                      "guide": None if guide_path is None else str(guide_path), "num_samples": int(len(arr)),
                      "seed": cfg.seed, "precision": precision, "world_size": dist.world_size}
        (out / "samples.json").write_text(json.dumps(provenance, indent=2))
        print(f"wrote {len(arr)} samples to {out / 'samples.npz'} and a grid to {out / 'grid.png'}")
    cleanup_distributed()
    return out


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
@report_user_errors
def main(cfg):
    run(cfg)


if __name__ == "__main__":
    main()
