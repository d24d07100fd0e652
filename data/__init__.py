"""Datasets. Image datasets yield (x, y): x float32 (C, H, W) in [-1, 1], y an int class id; the latent cache
yields (posterior moments of both flips, y). All have the attributes num_classes, channels and image_size (for
the latent cache: the latents' channels and size)."""

from .digits import DigitsDataset
from .imagefolder import ImageFolderDataset, center_crop_arr
from .latents import LatentCacheDataset, check_cache, read_manifest
from .sampler import StepSampler
from utils.errors import ConfigError

DATASETS = ("digits", "imagefolder", "imagenet", "latents")

__all__ = ["DATASETS", "DigitsDataset", "ImageFolderDataset", "LatentCacheDataset", "StepSampler", "build_dataset",
           "center_crop_arr", "check_cache", "read_manifest"]


def build_dataset(name, path=None, image_size=None, **unused):
    """Build a dataset by its conf/data name. Extra config keys (loader settings) are ignored here."""
    if name == "digits":
        if image_size not in (None, 8):
            raise ConfigError(f"the digits are 8x8; data.image_size={image_size} is not supported")
        return DigitsDataset()
    if name in ("imagefolder", "imagenet"):  # imagenet: the same folder layout, set up for latent diffusion
        if path is None or image_size is None:
            raise ConfigError(f"data={name} needs data.path=/path/to/train (one folder per class) and data.image_size")
        return ImageFolderDataset(path, image_size)
    if name == "latents":
        if path is None:
            raise ConfigError("data=latents needs data.path=/path/to/cache (a folder written by extract_latents.py)")
        return LatentCacheDataset(path)
    raise ConfigError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
