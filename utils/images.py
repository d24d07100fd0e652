"""Converting model outputs to pictures."""

import torch
from torchvision.utils import save_image


def to_uint8(x):
    """[-1, 1] float images (N, C, H, W) -> uint8 (N, C, H, W), rounding to the nearest of the 256 levels (ties to
    even). The official DiT's sample_ddp.py rounds too (127.5 x + 128, then truncation: ties up, the only
    difference); ADM's image_sample.py truncates ((x + 1) * 127.5 cast to uint8), a level lower for about half the
    values. Samples (sample.py), training grids and datasets scored by evaluation/ all go through this one."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def save_grid(images_uint8, path, nrow):
    """Save uint8 (N, C, H, W) images as one PNG grid with `nrow` images per row, upscaled if tiny."""
    x = images_uint8.float() / 255
    if x.shape[-1] < 32:  # 8x8 digits are invisible at 1:1
        x = torch.nn.functional.interpolate(x, scale_factor=32 // x.shape[-1], mode="nearest")
    save_image(x, path, nrow=nrow, padding=2, pad_value=1.0)
