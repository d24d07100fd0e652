"""Datasets. Every dataset yields (x, y): x float32 (C, H, W) in [-1, 1], y an int class id; and has the
attributes num_classes, channels and image_size."""

from .digits import DigitsDataset
from .imagefolder import ImageFolderDataset, center_crop_arr
from .sampler import StepSampler

DATASETS = ("digits", "imagefolder")

__all__ = ["DATASETS", "DigitsDataset", "ImageFolderDataset", "StepSampler", "build_dataset", "center_crop_arr"]


def build_dataset(name, path=None, image_size=None, **unused):
    """Build a dataset by its conf/data name. Extra config keys (loader settings) are ignored here."""
    if name == "digits":
        if image_size not in (None, 8):
            raise ValueError(f"the digits are 8x8; data.image_size={image_size} is not supported")
        return DigitsDataset()
    if name == "imagefolder":
        if path is None or image_size is None:
            raise ValueError("data=imagefolder needs data.path=/path/to/train (one folder per class) and data.image_size")
        return ImageFolderDataset(path, image_size)
    raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
