"""FD-DINOv2 features (Stein et al. 2023, 2306.04675; as EDM2's calculate_metrics.py computes them) through timm.

The network is DINOv2 ViT-L/14 (LVD-142M weights, no registers), timm's `vit_large_patch14_dinov2.lvd142m`, built
with img_size=224; the feature is the CLS token after the final LayerNorm (1024-d). Preprocessing is EDM2's
default: uint8 RGB -> float, bicubic resize to 224x224 with antialiasing (values 0..255, no crop), /255, ImageNet
mean and std. Statistics are float64, as for every metric here.

One known difference from EDM2: timm resamples the 37x37 position embedding to 16x16 once, at load time (bicubic,
antialiased, to an exact size), where the DINOv2 hub code interpolates it at run time (no antialiasing, a +0.1
scale-factor offset). The features, and so FD-DINOv2, differ slightly between the two pipelines: compute the
reference statistics and the samples' with the same one (this one), never mix with EDM2's published refs.

Weights are read from a local file only (no hub access at run time): timm's `model.safetensors` (or a .pth / .bin
state dict) of vit_large_patch14_dinov2.lvd142m, or the original dinov2_vitl14_pretrain.pth (timm converts it).
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from utils.errors import ConfigError, MissingFile

MODEL_NAME = "vit_large_patch14_dinov2.lvd142m"
HUB_ID = "timm/vit_large_patch14_dinov2.lvd142m"
ORIGINAL_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESOLUTION = 224


class MissingDINOv2Weights(MissingFile):
    """The DINOv2 weights file is not on disk."""


def missing_message(path):
    where = f"no file at {path}" if path else "no weights file given"
    return (f"DINOv2 ViT-L/14 weights for FD-DINOv2 not found ({where}).\n"
            f"  file:    model.safetensors of {HUB_ID} (or the original dinov2_vitl14_pretrain.pth)\n"
            f"  source:  `huggingface-cli download {HUB_ID} model.safetensors --local-dir dinov2-vitl14` on a machine "
            f"with network, or {ORIGINAL_URL}\n"
            f"  setting: --features dinov2 --weights PATH on the command line, fid.features=dinov2 fid.weights=PATH "
            f"in training")


def load_state_dict(path):
    """A state dict from .safetensors, .pth, .pt or .bin."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state


def build_dinov2(weights_path, model_name=MODEL_NAME, img_size=RESOLUTION):
    """timm's DINOv2 at `img_size` with the weights of a local file (position embedding resampled at load)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    if weights_path is None or not Path(weights_path).is_file():
        raise MissingDINOv2Weights(missing_message(weights_path))
    model = timm.create_model(model_name.split(".")[0], pretrained=False, img_size=img_size, num_classes=0)
    state = checkpoint_filter_fn(load_state_dict(weights_path), model)  # hub keys -> timm's, pos_embed resampled
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def preprocess(images, size=RESOLUTION):
    """uint8 (N, 3, H, W) -> the network's float input: EDM2's torch-mode resize, then ImageNet normalisation."""
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x / 255 - mean) / std


class DINOv2Features:
    """DINOv2 ViT-L/14 CLS features with InceptionFeatures' interface: uint8 (N, C, H, W), C in {1, 3}."""

    name = "dinov2"
    fid_layer, is_layer, spatial_layer = "cls", None, None

    def __init__(self, weights_path=None, device=None, batch_size=64, layers=("cls",), model_name=MODEL_NAME):
        if tuple(layers) != ("cls",):
            raise ConfigError(f"DINOv2 features offer the layer 'cls' only (no logits: no IS or class accuracy); "
                             f"got {list(layers)}")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.weights_path = weights_path
        self.model = build_dinov2(weights_path, model_name).to(self.device)
        self.batch_size, self.layers, self.model_name = batch_size, ("cls",), model_name

    def __call__(self, images):
        from .features import _full_float32, as_rgb_uint8
        images = as_rgb_uint8(images)
        out = []
        with _full_float32(self.device):
            for chunk in images.split(self.batch_size):
                tokens = self.model.forward_features(preprocess(chunk.to(self.device)))  # (n, 1 + 256, 1024), normed
                out.append(tokens[:, 0].float())
        return {"cls": torch.cat(out)}

    def iterate(self, batches, total=None, progress=True, desc="DINOv2 features"):
        from tqdm.auto import tqdm
        with tqdm(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
            for images in batches:
                yield self(images)
                bar.update(images.shape[0])

    def provenance(self):
        from .features import file_sha256
        return {"name": "dinov2", "model": f"timm {self.model_name} img_size={RESOLUTION}", "layers": ["cls"],
                "weights": str(Path(self.weights_path).resolve()), "weights_sha256": file_sha256(self.weights_path)}
