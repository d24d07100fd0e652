"""The latent cache: the tokenizer's encoding of every image and of its mirror image, in memory-mapped .npy shards.

Written once by `extract_latents.py`, read by `data=latents`. A cache folder holds

    manifest.json          what the cache is: tokenizer, scaling and shift factors, resolution, crop, counts, encoding,
                           layout (see make_manifest); once complete also statistics of the latents: channel_mean and
                           channel_std (per channel, of the scaled latents), latent_mean / latent_std (all elements,
                           raw latents; data_scaling_factor = 1 / latent_std, SD's recipe measured) and `stats`
    stats.npz              per-element sums of the raw latents over both flips (count, sum, sum_sq; models.vae.
                           latent_sums) and their mean and var: every normalisation derives from them exactly
    labels.npy             (num_images,) int64 class ids, in ImageFolder order (sorted class folders)
    shard-00000.npy ...    (n, 2, E, h, w) float: image, flip (0 = as is, 1 = mirrored), encoding, h, w; the encoding
                           is a posterior [mean; log-variance] (E = 2C, encoding "posterior") or a deterministic
                           encoder's latent (E = C, encoding "deterministic": DC-AE, RAE)
    shard-00000.stats.npz  that shard's latent sums, for the statistics
    shard-00000.repa.npy   with `repa.encoder=...` at extraction: (n, 2, T, d) float16 REPA encoder features of each
                           image as is and mirrored (manifest["repa"] names the encoder), so training need not run it

Storing the posterior (mean, log-variance) rather than one sample keeps the VAE's noise: each training step
draws its own sample z = mean + exp(logvar / 2) * eps, as on-the-fly encoding would; a deterministic encoder's latent
is stored as it is and nothing is drawn. Storing both flips keeps random horizontal flips exact (an encoder is not
mirror-equivariant, so flipping latents would not do).
Shards are opened lazily with np.load(mmap_mode="r") in each DataLoader worker, so the cache is never read
into memory as a whole; the page cache keeps what is hot.
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from utils.errors import ConfigError, MissingFile
from utils.files import atomic_write, temp_name

FORMAT = 1
MANIFEST = "manifest.json"
LABELS = "labels.npy"
CROP = "adm-center"        # data/imagefolder.py: center_crop_arr
FLIPS = ["none", "horizontal"]
DTYPES = ("float32", "float16")
STATS = "stats.npz"
ENCODINGS = ("posterior", "deterministic")
LAYOUT = {"posterior": "shard-NNNNN.npy: (images, flip [none, horizontal], [mean; logvar] channels, h, w)",
          "deterministic": "shard-NNNNN.npy: (images, flip [none, horizontal], latent channels, h, w)"}


#################################################################################
#                                   Helpers                                     #
#################################################################################

def shard_path(root, index, part=""):
    """The file of shard `index` (part "repa": its REPA encoder features)."""
    return Path(root) / f"shard-{index:05d}{'.' + part if part else ''}.npy"


def stats_path(root, index):
    """The latent sums of shard `index` (written beside it)."""
    return Path(root) / f"shard-{index:05d}.stats.npz"


def write_sums(path, sums, **extra):
    """Latent sums ({count, sum, sum_sq}, plus any arrays in `extra`) to an .npz, atomically."""
    atomic_write(path, lambda tmp: np.savez(tmp, count=np.float64(sums["count"]), sum=sums["sum"],
                                            sum_sq=sums["sum_sq"], **extra))


def read_sums(path):
    """The latent sums an .npz written by write_sums holds."""
    with np.load(path) as f:
        return {"count": float(f["count"]), "sum": f["sum"], "sum_sq": f["sum_sq"]}


def shard_range(index, shard_size, num_images):
    """The image indices shard `index` holds (shards are contiguous blocks of shard_size images)."""
    return range(index * shard_size, min((index + 1) * shard_size, num_images))


def make_manifest(*, vae, scaling_factor, image_size, latent_channels, latent_size, num_images, classes,
                  shard_size, dtype, source=None, repa=None, encoding="posterior", shift_factor=0.0):
    """The manifest of a cache (complete=False until every shard is on disk)."""
    if dtype not in DTYPES:
        raise ConfigError(f"latent cache dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return {"format": FORMAT, "vae": str(vae), "scaling_factor": float(scaling_factor),
            "shift_factor": float(shift_factor), "image_size": int(image_size), "crop": CROP, "flips": FLIPS,
            "latent_channels": int(latent_channels), "latent_size": int(latent_size), "encoding": encoding,
            "num_images": int(num_images), "num_classes": len(classes), "classes": list(classes),
            "shard_size": int(shard_size), "num_shards": math.ceil(num_images / shard_size), "dtype": dtype,
            "layout": LAYOUT[encoding], "source": None if source is None else str(source), "repa": repa,
            "complete": False}


def with_defaults(manifest):
    """A manifest with the keys of caches made before deterministic encoders and shifts (posteriors, shift 0)."""
    return {"encoding": "posterior", "shift_factor": 0.0, **manifest}


def entry_channels(manifest):
    """Channels of a cache entry's encoding: 2C for a posterior, C for a deterministic latent."""
    return manifest["latent_channels"] * (2 if with_defaults(manifest)["encoding"] == "posterior" else 1)


def cache_bytes(manifest):
    """(latent shards, REPA features) bytes on disk of the whole cache a manifest describes."""
    n, size = manifest["num_images"], manifest["latent_size"]
    latents = n * 2 * entry_channels(manifest) * size * size * np.dtype(manifest["dtype"]).itemsize
    repa = manifest.get("repa")
    return latents, (n * 2 * repa["tokens"] * repa["width"] * 2 if repa else 0)


def write_manifest(root, manifest):
    atomic_write(Path(root) / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))


def write_labels(root, labels):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(labels, dtype=np.int64))
    atomic_write(Path(root) / LABELS, write)


def read_manifest(root):
    """The manifest of the cache in folder `root` (older caches' missing keys filled in); a clear error when there
    is none."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise MissingFile(f"no latent cache at {root} (no {MANIFEST}); make one with "
                                f"`python extract_latents.py data.path=/data/imagenet/train out={root}`")
    return with_defaults(json.loads(path.read_text()))


def check_cache(manifest, *, vae, scaling_factor, image_size, source="the latent cache"):
    """Refuse a cache that is incomplete or disagrees with the config (VAE, scaling factor, resolution)."""
    if not manifest.get("complete"):
        raise ConfigError(f"{source} is incomplete (its extraction stopped early); re-run the same extraction "
                         f"command to finish it (finished shards are kept)")
    problems = []
    if vae is None:
        problems.append(f"it holds latents of the VAE {manifest['vae']!r} but the config is in pixel space "
                        f"(vae=none); set vae= to that VAE")
    elif manifest["vae"] != vae:
        problems.append(f"it was made with the VAE {manifest['vae']!r} but the config's VAE is {vae!r}")
    if vae is not None and not math.isclose(manifest["scaling_factor"], scaling_factor, rel_tol=1e-6):
        problems.append(f"its scaling factor is {manifest['scaling_factor']} but the config's VAE scales by "
                        f"{scaling_factor} (vae.scaling_factor)")
    if image_size is not None and manifest["image_size"] != image_size:
        problems.append(f"it was made at {manifest['image_size']}x{manifest['image_size']} but "
                        f"data.image_size={image_size}")
    if problems:
        raise ConfigError(f"{source} does not fit the config: " + "; ".join(problems) +
                         ". Use the settings the cache was made with, or extract a new cache for these settings.")


#################################################################################
#                                Writing shards                                 #
#################################################################################

class ShardWriter:
    """Fills one shard through a temporary memory-mapped .npy beside it; `commit` renames it into place, so a
    shard file exists only when complete (an interrupted extraction leaves only temporary files)."""

    def __init__(self, root, index, count, entry_shape, dtype, part=""):
        self.path = shard_path(root, index, part)
        self.tmp = temp_name(self.path)   # renamed over the shard's name once complete (commit)
        self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype, shape=(count, *entry_shape))
        self.filled = 0

    @property
    def remaining(self):
        return len(self.array) - self.filled

    def write(self, entries):
        """Append as many of `entries` (n, *entry_shape) as fit; returns how many were taken."""
        take = min(len(entries), self.remaining)
        self.array[self.filled:self.filled + take] = entries[:take]
        self.filled += take
        return take

    def commit(self):
        assert self.remaining == 0, f"{self.path}: {self.remaining} entries still missing"
        self.array.flush()
        del self.array
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)


#################################################################################
#                                 The dataset                                   #
#################################################################################

class LatentCacheDataset(Dataset):
    """Items are (encodings, y): encodings float32 (2, E, h, w) = [as is, mirrored] x [mean; log-variance] (E = 2C)
    or x the deterministic latent (E = C), y the class id. The training loop picks the flip and draws the posterior
    sample (if any) from its step generator, so a resumed run replays them exactly.

    channels and image_size are the latents' (what the network sees); `resolution` is the images'.
    """

    def __init__(self, path):
        self.root = Path(path)
        self.with_repa_features = False   # set by the trainer when it reads the stored REPA features
        if not self.root.is_dir():
            raise MissingFile(f"latent cache folder {self.root} does not exist; set data.path to a folder "
                                    f"written by extract_latents.py")
        self.manifest = read_manifest(self.root)
        m = self.manifest
        if m.get("format") != FORMAT:
            raise ConfigError(f"{self.root}: latent cache format {m.get('format')}, this code reads format {FORMAT}")
        self.num_classes, self.channels, self.image_size = m["num_classes"], m["latent_channels"], m["latent_size"]
        self.resolution, self.shard_size, self.num_images = m["image_size"], m["shard_size"], m["num_images"]
        self.encoding = m["encoding"]     # posterior | deterministic
        self.entry_shape = (2, entry_channels(m), self.image_size, self.image_size)
        self.labels = np.load(self.root / LABELS)   # (num_images,) int64: small, kept in memory
        self._shards = {}   # (index, part) -> np.memmap, opened on first use in each process
        self.repa = m.get("repa")         # {"encoder", "tokens", "width"} when the cache holds REPA features

    def __len__(self):
        return self.num_images

    def __getstate__(self):  # DataLoader workers get the description, never open memory maps
        return {**self.__dict__, "_shards": {}}

    def shard(self, index, part=""):
        """Shard `index` (or its REPA features, part="repa") as a read-only memory map, opened once per process and
        checked against the manifest."""
        if (index, part) not in self._shards:
            path = shard_path(self.root, index, part)
            array = np.load(path, mmap_mode="r")
            entry, dtype = ((2, self.repa["tokens"], self.repa["width"]), "float16") if part else (
                self.entry_shape, self.manifest["dtype"])
            expected = (len(shard_range(index, self.shard_size, self.num_images)), *entry)
            if array.shape != expected or array.dtype != np.dtype(dtype):
                raise ConfigError(f"{path} holds {array.dtype} {array.shape}, the manifest says "
                                 f"{dtype} {expected}; delete it and re-run the extraction")
            self._shards[(index, part)] = array
        return self._shards[(index, part)]

    def __getitem__(self, i):
        """(encodings, y), or (encodings, y, REPA features (2, T, d) float32) when with_repa_features is set."""
        index, row = divmod(i, self.shard_size)
        moments = torch.from_numpy(np.array(self.shard(index)[row], dtype=np.float32))   # (2, E, h, w)
        if not self.with_repa_features:
            return moments, int(self.labels[i])
        return moments, int(self.labels[i]), torch.from_numpy(np.array(self.shard(index, "repa")[row], dtype=np.float32))


def input_shape(dataset, vae=None):
    """(C, H, W) of the network's input: the dataset's items (images, or a latent cache's latents), or the latents
    of its images when `vae` encodes them on the fly."""
    if vae is None or isinstance(dataset, LatentCacheDataset):
        return dataset.channels, dataset.image_size, dataset.image_size
    return vae.latent_shape(dataset.channels, dataset.image_size)


def cache_channel_stats(dataset, path):
    """The latent statistics a cache records, for VAE.set_channel_stats: (per-element latent sums from stats.npz,
    None), from which every normalisation derives; or, for caches made before stats.npz, (mean, std) per channel."""
    manifest = dataset.manifest
    if "channel_mean" not in manifest:
        raise ConfigError(f"the latent cache {path} has no channel statistics (it was made before extract_latents.py "
                          f"recorded them); re-run the extract_latents.py command that made it (it adds them without "
                          f"encoding again), or set vae.normalize=false")
    if manifest.get("stats") and (dataset.root / manifest["stats"]).is_file():
        return read_sums(dataset.root / manifest["stats"]), None
    return manifest["channel_mean"], manifest["channel_std"]

