"""Extract a latent cache once: the tokenizer's encoding (a VAE's posterior, or a deterministic encoder's latent) of
every image and of its mirror image, in .npy shards.

    python extract_latents.py data.path=/data/imagenet/train out=/data/in256-sd-vae-ft-ema
    torchrun --nproc_per_node=8 extract_latents.py data.path=/data/imagenet/train data.image_size=512 \
        out=/data/in512-sd-vae-ft-ema
    python train.py experiment=imagenet256 data=latents data.path=/data/in256-sd-vae-ft-ema

Each rank encodes a contiguous block of shards. A shard is written to a temporary file and renamed when
complete, so re-running the same command after a crash or kill skips the finished shards and redoes the rest.
manifest.json says what the cache holds (tokenizer, scaling factor, resolution, crop, counts, encoding) and is marked
complete, with the latents' statistics, by whichever rank finishes last; training refuses an incomplete cache or one
made with other settings. What the cache will take on disk is printed before anything is written.
Ranks never wait for each other, so a resumed run with uneven remaining work cannot hit a collective timeout.
"""

from pathlib import Path

import hydra
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from data import ImageFolderDataset, build_dataset
from data.latents import (LABELS, MANIFEST, STATS, ShardWriter, cache_bytes, make_manifest, read_manifest, read_sums,
                          shard_path, shard_range, stats_path, write_labels, write_manifest, write_sums)
from models.vae import add_sums, latent_sums, norm_stats
from models import build_vae
from utils.distributed import setup_distributed
from utils.errors import ConfigError, report_user_errors


def check_existing(out, manifest):
    """Refuse to add shards to a cache made with other settings (the `complete` flag may differ)."""
    if not (Path(out) / MANIFEST).is_file():
        return
    existing = read_manifest(out)
    differ = [k for k in manifest if k not in ("complete", "source") and existing.get(k) != manifest[k]]
    if differ:
        details = "; ".join(f"{k}: cache {existing.get(k)!r}, now {manifest[k]!r}" for k in differ if k != "classes")
        raise ConfigError(f"{out} holds a latent cache made with other settings ({details or 'other classes'}); "
                         f"choose another out= or the settings it was made with")


def shard_sums(out, index, stochastic, rows=256):
    """The latent sums of a finished shard, from its stats file, or read from the shard once (in blocks of `rows`
    images) and saved: caches made before the statistics existed get them by re-running the same command."""
    path = stats_path(out, index)
    if path.is_file():
        return read_sums(path)
    shard = np.load(shard_path(out, index), mmap_mode="r")
    sums = add_sums(latent_sums(torch.from_numpy(shard[i:i + rows].astype(np.float32)), stochastic)
                    for i in range(0, len(shard), rows))
    write_sums(path, sums)
    return sums


def size_text(nbytes):
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def cost_line(manifest):
    """What the cache will take on disk, said before anything is written."""
    latents, repa = cache_bytes(manifest)
    entry = "x".join(map(str, (2 * manifest["latent_channels"] if manifest["encoding"] == "posterior" else
                               manifest["latent_channels"], manifest["latent_size"], manifest["latent_size"])))
    return (f"latent cache on disk: {manifest['num_images']} images x 2 flips x {entry} {manifest['dtype']} "
            f"({manifest['encoding']}) = {size_text(latents)}" + (f", + REPA features {size_text(repa)}" if repa else "")
            + f"; total {size_text(latents + repa)}")


@torch.no_grad()
def encode_features_both_flips(encoder, x):
    """Images (n, 3, H, W) -> (n, 2, T, d) float16 REPA encoder features of each image as is and mirrored."""
    feats = encoder(torch.cat([x, x.flip(-1)]))
    return torch.stack(feats.chunk(2), dim=1).half().cpu().numpy()


@torch.no_grad()
def encode_both_flips(vae, x):
    """Images (n, 3, H, W) -> (n, 2, E, h, w): the encoding (posterior [mean; logvar], or a deterministic latent) of
    each image as is and mirrored."""
    moments = vae.encode_moments(torch.cat([x, x.flip(-1)]))    # (2n, 2C, h, w)
    return torch.stack(moments.chunk(2), dim=1)


def extract(cfg):
    dist = setup_distributed(cfg.device)  # no collectives below: ranks only share the file system
    device = dist.device
    out = Path(cfg.out)
    dataset = build_dataset(**cfg.data)
    if not isinstance(dataset, ImageFolderDataset):
        raise ConfigError(f"data={cfg.data.name}: latent caches are made from image folders (data=imagenet or "
                         f"data=imagefolder with data.path=...)")
    vae = build_vae(**cfg.vae)
    if vae is None:
        raise ConfigError("vae=none: a latent cache needs a tokenizer (vae=sd-vae-ft-ema, ..., rae-dinov2-b or local: "
                          "conf/vae/)")
    vae.to(device)
    _, latent_size, _ = vae.latent_shape(3, cfg.data.image_size)   # refuses sizes the tokenizer cannot take
    encoder, repa = None, None
    if cfg.repa.encoder:  # REPA's encoder features of both flips, stored beside the latents (float16)
        from diffusion.repa import build_encoder
        encoder = build_encoder(cfg.repa.encoder, weights=cfg.repa.weights, resolution=cfg.data.image_size,
                                device=device)
        probe = encoder(torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size, device=device))
        repa = {"encoder": cfg.repa.encoder, "tokens": int(probe.shape[1]), "width": int(probe.shape[2])}
    manifest = make_manifest(vae=vae.identifier, scaling_factor=vae.scaling_factor, image_size=cfg.data.image_size,
                             latent_channels=vae.latent_channels, latent_size=latent_size, num_images=len(dataset),
                             classes=dataset.classes, shard_size=cfg.shard_size, dtype=cfg.dtype,
                             source=Path(cfg.data.path).resolve(), repa=repa, shift_factor=vae.shift_factor,
                             encoding="posterior" if vae.stochastic else "deterministic")
    check_existing(out, manifest)   # every rank checks before it writes anything
    if dist.is_main:
        print(cost_line(manifest), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / LABELS).is_file():  # every rank may write it (same content, atomically): there before any manifest
        write_labels(out, dataset.targets)
    if dist.is_main and not (out / MANIFEST).is_file():
        write_manifest(out, manifest)
        print(f"latent cache {out}: {len(dataset)} images, {len(dataset.classes)} classes, "
              f"{manifest['num_shards']} shards of {cfg.shard_size}; latents {vae.latent_channels}x"
              f"{latent_size}x{latent_size} from {vae.identifier}")

    # This rank's contiguous block of shards, minus those already on disk.
    mine = np.array_split(np.arange(manifest["num_shards"]), dist.world_size)[dist.rank].tolist()
    for index in mine:  # temporary files of an interrupted run of this rank's shards
        for stale in [*out.glob(f".{shard_path(out, index).name}.tmp*"),
                      *out.glob(f".{shard_path(out, index, 'repa').name}.tmp*")]:
            stale.unlink()
    todo = [i for i in mine if not shard_path(out, i).is_file()]
    indices = [j for i in todo for j in shard_range(i, cfg.shard_size, len(dataset))]
    entry_shape = (2, vae.encoding_channels, latent_size, latent_size)
    loader = DataLoader(Subset(dataset, indices), batch_size=cfg.batch_size, num_workers=cfg.data.num_workers,
                        pin_memory=device.type == "cuda")
    done = sum(len(shard_range(i, cfg.shard_size, len(dataset))) for i in mine) - len(indices)
    progress = tqdm(total=done + len(indices), initial=done, desc=f"extract (rank {dist.rank})", unit="img",
                    disable=not dist.is_main, mininterval=2)
    pending, writer, features = iter(todo), None, None
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
        entries = encode_both_flips(vae, x).cpu().numpy()
        feats = encode_features_both_flips(encoder, x) if encoder is not None else None
        progress.update(len(entries))
        while len(entries):  # a batch may end one shard and start the next
            if writer is None:
                index = next(pending)
                count = len(shard_range(index, cfg.shard_size, len(dataset)))
                writer = ShardWriter(out, index, count, entry_shape, cfg.dtype)
                if encoder is not None:
                    features = ShardWriter(out, index, count, (2, repa["tokens"], repa["width"]), "float16", "repa")
            taken = writer.write(entries)
            entries = entries[taken:]
            if features is not None:
                features.write(feats[:taken])
                feats = feats[taken:]
            if writer.remaining == 0:
                if features is not None:
                    features.commit()    # before the latents: a shard file on disk means the whole shard is done
                writer.commit()
                shard_sums(out, index, vae.stochastic)   # its statistics, while the shard is in the page cache
                writer = features = None
    progress.close()

    # Whoever finds every shard on disk marks the cache complete (the last rank to finish always does), with the
    # statistics of its latents (both flips; for vae.normalize), exact from each shard's latent sums: per element in
    # stats.npz, per channel and over all elements in the manifest.
    if all(shard_path(out, i).is_file() for i in range(manifest["num_shards"])):
        sums = add_sums(shard_sums(out, i, vae.stochastic) for i in range(manifest["num_shards"]))
        mean, std = norm_stats(sums, "channel", vae.shift_factor, vae.scaling_factor)
        raw_mean, raw_std = norm_stats(sums, "shift-scale")            # of the raw latents, over all elements
        element_mean = sums["sum"] / sums["count"]
        write_sums(out / STATS, sums, mean=element_mean, var=np.clip(sums["sum_sq"] / sums["count"] -
                                                                      element_mean ** 2, 0, None))
        write_manifest(out, {**manifest, "channel_mean": mean, "channel_std": std, "latent_mean": raw_mean,
                             "latent_std": raw_std, "data_scaling_factor": 1 / raw_std if raw_std else None,
                             "stats": STATS, "complete": True})
        if dist.is_main:
            print(f"latent cache complete: {out} (train with data=latents data.path={out})")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return out


@hydra.main(config_path="conf", config_name="extract", version_base="1.3")
@report_user_errors
def main(cfg):
    extract(cfg)


if __name__ == "__main__":
    main()
