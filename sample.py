"""Sample from a trained model and write ADM-format samples.npz (+ grid.png, samples.json provenance).

    python sample.py ckpt=runs/digits/DiT-T-2                 # newest checkpoint of a run, EMA weights
    torchrun --nproc_per_node=8 sample.py ckpt=DiT-XL-2-256x256.pt num_samples=50000 cfg_scale=1.5 cfg_channels=3

Latent models are decoded by the VAE recorded in the checkpoint (official DiT checkpoints: sd-vae-ft-ema) when it is
on this machine (the recorded folder, or the local Hugging Face cache): nothing is downloaded that the user did not
ask for. `vae=sd-vae-ft-ema` (or `vae=... vae.path=/local/folder`) chooses the decoder, and downloads it if needed.

Under torchrun each rank draws a contiguous block of the samples; rank 0 merges them into one npz in order.
The starting noise of sample i is drawn from a generator seeded by (seed, i), so it does not depend on the
number of processes or the batch size.
"""

import hashlib
import json
import math
import secrets
import shutil
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from diffusion.objectives import canonical_config, objective_name
from diffusion.sampling import resolve_sampler, sample_images
from models import VAE, DiT, build_model, build_vae
from models.dit import DIT_SIZES, EXTRA_SIZES
from utils.checkpoint import load_checkpoint, resolve_checkpoint
from utils.collective import on_main
from utils.distributed import barrier, cleanup_distributed, setup_distributed
from utils.files import atomic_write, atomic_write_text
from utils.images import save_grid
from utils.speed import forward_context, resolve_precision
from utils.errors import ConfigError, MissingFile, report_user_errors

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
        vae = ckpt["model_args"].get("vae")   # how to rebuild the VAE of a latent model; None in pixel space
        model = build_model(ckpt["model_args"])
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


def _vae_option(identifier):
    """The conf/vae entry whose hub id is `identifier` (e.g. sd-vae-ft-ema), else None."""
    for config in sorted(OFFICIAL_VAE.parent.glob("*.yaml")):
        if OmegaConf.load(config).get("id") == identifier:
            return config.stem
    return None


def _recorded_vae(recorded, whose):
    """(VAE, where it came from) for a VAE a checkpoint records (or the official checkpoints' default): its folder
    when it is on this machine, else its hub id from the local Hugging Face cache only. The record is a suggestion:
    nothing is downloaded that the user did not ask for with vae=...; a VAE that is not here stops with the settings
    that choose one."""
    identifier, path, subfolder = recorded.get("id"), recorded.get("path"), recorded.get("subfolder")
    kwargs = dict(subfolder=subfolder, identifier=identifier, scaling_factor=recorded.get("scaling_factor"),
                  local_files_only=True)
    if path and Path(path).is_dir():
        return VAE.from_pretrained(path, **kwargs), f"the folder {path}"
    try:
        if identifier:
            return VAE.from_pretrained(identifier, **kwargs), "the local Hugging Face cache"
    except FileNotFoundError:   # not in the cache (or a recorded folder that is gone): no download, ask
        pass
    option = _vae_option(identifier)
    is_folder = str(identifier).startswith(("/", ".", "~"))
    where = f" (from the folder {path}, which is not on this machine)" if path else ""
    if option:
        choices = (f"    vae={option} vae.path=/local/folder/{option}   # a copy on disk\n"
                   f"    vae={option}   # downloads {identifier} from the Hugging Face hub once")
    elif is_folder:
        choices = "    vae=local vae.path=/local/folder   # the same VAE on this machine"
    else:
        choices = (f"    vae=local vae.path=/local/folder   # a copy of {identifier} on disk\n"
                   f"    vae=local vae.id={identifier} vae.path=null   # downloads it from the Hugging Face hub once")
    absent = "here" if is_folder else "in the local Hugging Face cache"
    raise MissingFile(f"{whose} the VAE {identifier!r}{where}; it is not {absent}, and sample.py downloads nothing a "
                      f"checkpoint merely records. Choose the VAE that decodes:\n{choices}")


def load_decoder(vae_cfg, info, channels):
    """The VAE that decodes the model's latents, or None for a pixel model: `vae=` when given (loaded, or downloaded,
    as asked), else the one recorded in the checkpoint, else (official DiT checkpoints) sd-vae-ft-ema; a recorded or
    default VAE comes from its folder or the local Hugging Face cache only, never from a download. Prints which VAE
    decodes."""
    recorded = info.get("vae") or {}
    if vae_cfg is not None:
        vae = build_vae(**vae_cfg)
        if (vae is None) == info["latent"]:
            fix = "choose a VAE to decode its latents" if info["latent"] else "leave out vae="
            raise ConfigError(f"vae={vae_cfg['name']} does not fit a {'latent' if info['latent'] else 'pixel'}-space "
                             f"model; {fix}")
        source = f"vae={vae_cfg['name']}" + (f" vae.path={vae_cfg['path']}" if vae_cfg.get("path") else "")
        if recorded.get("id"):
            source += f"; the checkpoint records {recorded['id']}"
    elif info["vae"] is not None:  # ours: the recorded folder if it is here, else the recorded hub id if cached
        vae, where = _recorded_vae(recorded, "the checkpoint records")
        source = f"recorded in the checkpoint, from {where}"
    elif info["latent"]:
        vae, where = _recorded_vae(OmegaConf.to_container(OmegaConf.load(OFFICIAL_VAE)),
                                   "official DiT checkpoints (no VAE recorded) decode with")
        source = f"the official DiT checkpoints' VAE, from {where}"
    else:
        return None
    if "channel_mean" in recorded:  # trained on normalised latents: decoding undoes the normalisation
        vae.set_channel_stats(recorded["channel_mean"], recorded["channel_std"])
    if vae.latent_channels != channels:
        raise ConfigError(f"the VAE {vae.identifier} has {vae.latent_channels} latent channels but the model "
                         f"takes {channels}; choose the VAE it was trained with (vae=...)")
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"decoding with the VAE {vae.identifier} ({source})", flush=True)
    return vae


TRAINING_ONLY = ("time_sampling", "time_mean", "time_std", "time_shift", "cosine_loss", "loss_weight", "train_eps",
                 "use_kl", "rescale_learned_sigmas", "timestep_respacing")


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
    path, ckpt = resolve_checkpoint(cfg.guide_ckpt, set_aside=set_aside)   # never set_aside: not our folder
    guide, guide_info = load_sampling_model(path, cfg.guide_use_ema, ckpt)
    main, other = info["model_args"], guide_info["model_args"]
    same = lambda key, a, b: a.get(key) == b.get(key)
    problems = [f"{key} {main.get(key)} against the guide's {other.get(key)}" for key in
                ("input_size", "in_channels", "num_classes", "learn_sigma") if not same(key, main, other)]
    if not same("vae", main, other) and (main.get("vae") or {}).get("id") != (other.get("vae") or {}).get("id"):
        problems.append(f"the VAE {(main.get('vae') or {}).get('id')} against the guide's "
                        f"{(other.get('vae') or {}).get('id')}")
    # What sampling reads of the objective must agree; how training drew t or weighted the loss may differ.
    objective = lambda d: {k: v for k, v in canonical_config(d).items() if k not in TRAINING_ONLY}
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


def sample_settings(cfg, ckpt_path, info, options, precision, labels_cycle, vae, guide_path, world_size):
    """Everything that changes the samples: the checkpoint, its step and weights (EMA or raw), the decoder, every
    sampler and guidance setting, precision, seed, number of samples and class labels; for samplers that draw noise
    at every step (from each rank's RNG, batch by batch) also the batch size and number of processes. Its hash
    names the default output folder, and samples.json records it (check_out)."""
    stochastic = options["sampler"] in ("ddpm", "sde") or (options["sampler"] == "ddim" and options["eta"])
    settings = {"ckpt": str(Path(ckpt_path).absolute()), "step": info["step"], "weights": info["weights"],
                "vae": vae.identifier if vae else None, **options, "guidance": cfg.guidance,
                "guide": None if guide_path is None else str(Path(guide_path).absolute()),
                "guide_weights": None if guide_path is None else ("ema" if cfg.guide_use_ema else "model"),
                "num_samples": int(cfg.num_samples), "class_labels": [int(c) for c in labels_cycle],
                "seed": cfg.seed, "precision": precision,
                **({"batch_size": cfg.batch_size, "world_size": world_size} if stochastic else {})}
    settings = json.loads(json.dumps(settings, default=str))   # as samples.json will hold them
    return settings, hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def default_out(ckpt_arg, cfg, options, settings, digest):
    """Where samples go by default: inside the run folder when given one, in a folder named by the main settings and
    the hash of all of them (sample_settings), so samplers with different settings never share one."""
    name = options["sampler"] + (f"-{options['ode']['method']}" if options["sampler"] == "ode" else "")
    step = "" if settings["step"] is None else f"-step{settings['step']}"
    tag = (f"{name}{options['steps']}-{'auto' if cfg.guidance == 'auto' else 'cfg'}{cfg.cfg_scale:g}-seed{cfg.seed}"
           f"-n{cfg.num_samples}{step}-{digest}")
    base = Path(ckpt_arg)
    return (base / "samples" if base.is_dir() else Path("samples") / base.stem) / tag


def check_out(out, settings, digest):
    """Refuse to replace samples made with other settings: an existing out/samples.json must record the same ones
    (and a samples.npz without it is of unknown settings)."""
    provenance, samples = out / "samples.json", out / "samples.npz"
    if not provenance.exists():
        if samples.exists():
            raise ConfigError(f"{samples} exists without samples.json, so its settings are unknown; refusing to "
                              f"replace it: choose another out= (or leave out= unset), or remove it")
        return
    try:
        old = json.loads(provenance.read_text())
    except (OSError, ValueError):
        old = {}
    if old.get("settings_hash") == digest:
        return
    differ = [f"{k}={old[k]!r} there, {v!r} now" for k, v in settings.items() if k in old and old[k] != v]
    if old.get("settings_hash") is not None or differ or not old:
        raise ConfigError(f"{out} holds samples made with other settings ({'; '.join(differ[:6]) or 'unknown'}); "
                          f"refusing to replace them: choose another out= (or leave out= unset for a folder named "
                          f"by the settings), or remove {out}")


def write_samples(out, shard_dir, world_size, shape, num_labels, provenance):
    """Merge the ranks' shards into out/samples.npz (ADM's format), then grid.png and samples.json, each through a
    temporary file and a rename (a reader sees the old file or the new one, never half); samples of other settings
    in `out` are refused (check_out). The shards go however it ends."""
    try:
        check_out(out, provenance, provenance["settings_hash"])   # again: another sampler may have written there
        # One array filled shard by shard: peak memory is the samples plus one shard, not twice the samples.
        arr, lab, start = np.empty(shape, np.uint8), np.empty(shape[:1], np.int64), 0
        for r in range(world_size):
            with np.load(shard_dir / f"rank{r:05d}.npz") as shard:
                n = len(shard["arr_1"])
                arr[start:start + n], lab[start:start + n] = shard["arr_0"], shard["arr_1"]
            start += n
        assert start == shape[0], f"the shards hold {start} samples, expected {shape[0]}"
        atomic_write(out / "samples.npz", lambda tmp: np.savez(tmp, arr_0=arr, arr_1=lab))
        nrow = num_labels if num_labels <= 16 else 8
        grid = torch.from_numpy(arr[: nrow * 8]).permute(0, 3, 1, 2)
        atomic_write(out / "grid.png", lambda tmp: save_grid(grid, tmp, nrow=nrow))
        atomic_write_text(out / "samples.json", json.dumps(provenance, indent=2))   # last: it vouches for the rest
        print(f"wrote {len(arr)} samples to {out / 'samples.npz'} and a grid to {out / 'grid.png'}")
    finally:
        shutil.rmtree(shard_dir, ignore_errors=True)


def run(cfg):
    dist = setup_distributed(cfg.device, tf32=cfg.tf32)
    device = dist.device
    ckpt_path, ckpt = resolve_checkpoint(cfg.ckpt, set_aside=False)   # a run folder: its newest that loads, untouched
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
    guide, guide_path = load_guide(cfg, info, device, set_aside=False) or (None, None)
    labels_cycle = list(cfg.class_labels) if cfg.class_labels else list(range(max(num_classes, 1)))
    if num_classes == 0:
        labels_cycle = [0]
    for label in labels_cycle:
        if not 0 <= label <= num_classes:
            raise ConfigError(f"class label {label} is outside 0..{num_classes} ({num_classes} = the null class)")
    precision = resolve_precision(cfg.precision, device)  # auto: bf16 where it is fast (utils/speed.py)
    settings, digest = sample_settings(cfg, ckpt_path, info, options, precision, labels_cycle, vae, guide_path,
                                       dist.world_size)
    out = Path(cfg.out) if cfg.out else default_out(cfg.ckpt, cfg, options, settings, digest)
    on_main(check_out, out, settings, digest)   # before sampling: other samples there stop every rank now

    # This rank's contiguous block of sample indices.
    indices = np.array_split(np.arange(cfg.num_samples), dist.world_size)[dist.rank]
    autocast = forward_context(precision, device)  # bf16 autocast for the network when precision is bf16
    images, labels = [], []
    torch.manual_seed(cfg.seed * 1000 + dist.rank)  # the per-step noise of DDPM, DDIM(eta > 0) and the SDE
    batches = [indices[i:i + cfg.batch_size] for i in range(0, len(indices), cfg.batch_size)]
    for batch in tqdm(batches, desc=f"sampling (rank {dist.rank})", disable=not dist.is_main):
        y = [labels_cycle[int(i) % len(labels_cycle)] for i in batch]
        x = sample_images(model, batch, y, seed=cfg.seed, shape=(channels, size, size), device=device, decoder=vae,
                          context=autocast, null_class=num_classes, guidance=cfg.guidance, guide_model=guide,
                          diffusion_kwargs=info["diffusion"], **options)  # starting noise of sample i from (seed, i)
        images.append(x.permute(0, 2, 3, 1).cpu().numpy())   # (n, H, W, C) uint8
        labels.append(np.asarray(y, dtype=np.int64))

    shard_dir = out / f".shards-{on_main(secrets.token_hex, 4)}"   # this sampler's own, whoever else writes to out
    shard_dir.mkdir(parents=True, exist_ok=True)
    arr = np.concatenate(images) if images else np.zeros((0, image_size, image_size, image_channels), np.uint8)
    lab = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
    atomic_write(shard_dir / f"rank{dist.rank:05d}.npz", lambda tmp: np.savez(tmp, arr_0=arr, arr_1=lab))
    barrier()

    provenance = {**settings, "model": args, "objective": objective_name(info["diffusion"]),
                  "batch_size": cfg.batch_size, "world_size": dist.world_size, "settings_hash": digest}
    # Rank 0 merges and writes for all ranks: a failure (a full disk, other samples in out) stops every rank.
    on_main(write_samples, out, shard_dir, dist.world_size, (cfg.num_samples, image_size, image_size, image_channels),
            len(labels_cycle), provenance)
    cleanup_distributed()
    return out


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
@report_user_errors
def main(cfg):
    run(cfg)


if __name__ == "__main__":
    main()
