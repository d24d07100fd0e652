"""What every feature network here shares (inception.py, digits.py, dinov2.py): the uint8 input check, a
full-float32 context for the forward pass, iteration with a progress bar, and the hash that identifies a file.

A feature network is called on uint8 (N, C, H, W) batches and returns {layer: float32 (N, D)}; it names its
layers for FID / precision-recall (`fid_layer`), IS and class accuracy (`is_layer`) and sFID (`spatial_layer`),
None where it has none, and says what produced its features (`provenance()`).
"""

import contextlib
import hashlib

import torch
from tqdm.auto import tqdm


def file_sha256(path, chunk_bytes=1 << 24):
    """Hex SHA-256 of a file, read in chunks (reference files can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def as_rgb_uint8(images):
    """uint8 (N, C, H, W) with C in {1, 3} -> (N, 3, H, W); grey is repeated, as PIL's convert("RGB") does."""
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected a uint8 tensor (N, C, H, W), got {getattr(images, 'dtype', type(images))} "
                         f"of shape {tuple(getattr(images, 'shape', ()))}")
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels in dim 1 (N, C, H, W), got shape {tuple(images.shape)}")
    return images


@contextlib.contextmanager
def full_float32(device):
    """No TF32 and no autocast inside: train.py may turn TF32 on, which would move features by ~1e-3."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type=device.type, enabled=False), torch.no_grad():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class FeatureNetwork:
    """The interface's shared part; subclasses set name, device, the layer names and implement __call__."""

    name = None
    fid_layer = is_layer = spatial_layer = None

    def iterate(self, batches, total=None, progress=True, desc=None):
        """Features of each batch of an iterable of uint8 batches, with a tqdm bar counting images."""
        with tqdm(total=total, unit="img", desc=desc or f"{self.name} features", disable=not progress,
                  dynamic_ncols=True) as bar:
            for images in batches:
                yield self(images)
                bar.update(images.shape[0])
