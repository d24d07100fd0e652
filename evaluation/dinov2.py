"""FD-DINOv2 features (Stein et al. 2023, 2306.04675; as EDM2's calculate_metrics.py computes them) of the frozen
DINOv2 of models/dinov2.py.

The network is DINOv2 ViT-L/14 (LVD-142M weights, no registers), timm's `vit_large_patch14_dinov2.lvd142m`, built
with img_size=224; the feature is the CLS token after the final LayerNorm (1024-d). Preprocessing is EDM2's
default: uint8 RGB -> float, bicubic resize to 224x224 with antialiasing (values 0..255, no crop), /255, ImageNet
mean and std. Statistics are float64, as for every metric here.

One known difference from EDM2: timm resamples the 37x37 position embedding to 16x16 once, at load time (bicubic,
antialiased, to an exact size), where the DINOv2 hub code interpolates it at run time (no antialiasing, a +0.1
scale-factor offset). The features, and so FD-DINOv2, differ slightly between the two pipelines: compute the
reference statistics and the samples' with the same one (this one), never mix with EDM2's published refs.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from models.dinov2 import (HUB_ID, IMAGENET_MEAN, IMAGENET_STD, MODEL_NAME, RESOLUTION,  # noqa: F401
                           MissingDINOv2Weights, build_dinov2, missing_message)
from utils.errors import ConfigError

from .network import FeatureNetwork, as_rgb_uint8, file_sha256, full_float32

SETTING = "--features dinov2 --weights PATH on the command line, fid.features=dinov2 fid.weights=PATH in training"


def preprocess(images, size=RESOLUTION):
    """uint8 (N, 3, H, W) -> the network's float input: EDM2's torch-mode resize, then ImageNet normalisation."""
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x / 255 - mean) / std


class DINOv2Features(FeatureNetwork):
    """DINOv2 ViT-L/14 CLS features with the FeatureNetwork interface: uint8 (N, C, H, W), C in {1, 3}."""

    name = "dinov2"
    fid_layer, is_layer, spatial_layer = "cls", None, None

    def __init__(self, weights_path=None, device=None, batch_size=64, layers=("cls",), model_name=MODEL_NAME):
        if tuple(layers) != ("cls",):
            raise ConfigError(f"DINOv2 features offer the layer 'cls' only (no logits: no IS or class accuracy); "
                             f"got {list(layers)}")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.weights_path = weights_path
        self.model = build_dinov2(weights_path, model_name, used_for="FD-DINOv2", setting=SETTING).to(self.device)
        self.batch_size, self.layers, self.model_name = batch_size, ("cls",), model_name

    def __call__(self, images):
        images = as_rgb_uint8(images)
        out = []
        with full_float32(self.device):
            for chunk in images.split(self.batch_size):
                tokens = self.model.forward_features(preprocess(chunk.to(self.device)))  # (n, 1 + 256, 1024), normed
                out.append(tokens[:, 0].float())
        return {"cls": torch.cat(out)}

    def provenance(self):
        return {"name": "dinov2", "model": f"timm {self.model_name} img_size={RESOLUTION}", "layers": ["cls"],
                "weights": str(Path(self.weights_path).resolve()), "weights_sha256": file_sha256(self.weights_path)}
