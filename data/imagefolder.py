"""An ImageNet-layout folder (root/<class>/<image>) with ADM's centre crop."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from utils.errors import BadInput, MissingFile


def center_crop_arr(pil_image, image_size):
    """ADM's centre crop (Dhariwal & Nichol 2021): halve with a box filter while the short side is at least
    twice the target (cheap, alias-free), resize the short side to `image_size` with bicubic, crop the centre."""
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def _load_rgb(path):
    """Open an image as RGB; an unreadable file stops the run with its name (nothing is dropped silently)."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as error:  # PIL raises several types for broken files
        raise BadInput(f"cannot read image {path}: {error}. Remove or replace the file and re-run "
                           f"(the run resumes where it stopped).") from error


class ImageFolderDataset(ImageFolder):
    """Items are (x, y): x float32 (3, S, S) in [-1, 1], centre-cropped to S = image_size; y the class index.

    Random horizontal flips are applied per batch by the training loop (seeded by the step, so a resumed run
    sees the same flips), not here.
    """

    channels = 3

    def __init__(self, path, image_size):
        root = Path(path)
        if not root.is_dir():
            raise MissingFile(f"data folder {root} does not exist; set data.path to an ImageNet-layout "
                                    f"folder (one sub-folder of images per class)")
        try:
            super().__init__(str(root), loader=_load_rgb)
        except FileNotFoundError as error:
            raise MissingFile(f"no images found under {root} ({error}); expected one sub-folder per class "
                                    f"holding files ending in {', '.join(IMG_EXTENSIONS)}") from error
        self.image_size = image_size
        self.num_classes = len(self.classes)

    def __getitem__(self, i):
        path, y = self.samples[i]
        arr = center_crop_arr(self.loader(path), self.image_size)                  # (S, S, 3) uint8
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1    # (3, S, S) in [-1, 1]
        return x, y
