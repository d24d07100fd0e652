"""DINOv2 (Oquab et al. 2023, 2304.07193) through timm, frozen, shared by FD-DINOv2 (evaluation/dinov2.py) and
REPA's `dinov2-vit-*` encoders (diffusion/repa.py). Each caller keeps its own preprocessing; this file only builds
the network from a local weights file and says where to get one when it is missing.

Weights are read from a local file only (no hub access at run time): timm's `model.safetensors` (or a .pth / .bin
state dict) of `vit_{small,base,large,giant}_patch14_dinov2.lvd142m`, or the original dinov2_vit*14_pretrain.pth
(timm converts it). The position embedding (37x37 in the files) is resampled to `img_size` once, at load time.
"""

from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import checkpoint_filter_fn

from utils.errors import MissingFile

# timm's names of the LVD-142M models without registers, by size letter (REPA's encoder names use the letter).
VARIANTS = {"s": "vit_small_patch14_dinov2.lvd142m", "b": "vit_base_patch14_dinov2.lvd142m",
            "l": "vit_large_patch14_dinov2.lvd142m", "g": "vit_giant_patch14_dinov2.lvd142m"}
MODEL_NAME = VARIANTS["l"]          # FD-DINOv2's ViT-L/14
HUB_ID = f"timm/{MODEL_NAME}"
ORIGINAL_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/dinov2_vit{size}14_pretrain.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESOLUTION = 224


class MissingDINOv2Weights(MissingFile):
    """The DINOv2 weights file is not on disk."""


def missing_message(path, model_name=MODEL_NAME, used_for="FD-DINOv2", setting=None):
    """What to download and where to point the run, for a missing weights file of `model_name`."""
    size = {v.split(".")[0]: k for k, v in VARIANTS.items()}.get(model_name.split(".")[0])   # s, b, l, g or None
    original = f" (or the original dinov2_vit{size}14_pretrain.pth)" if size else ""
    url = ORIGINAL_URL.format(size=size) if size else "https://github.com/facebookresearch/dinov2"
    where = f"no file at {path}" if path else "no weights file given"
    lines = [f"DINOv2 weights ({model_name}) for {used_for} not found ({where}).",
             f"  file:    model.safetensors of timm/{model_name}{original}",
             f"  source:  `huggingface-cli download timm/{model_name} model.safetensors --local-dir "
             f"{f'dinov2-vit{size}14' if size else 'dinov2'}` on a machine with network, or {url}"]
    return "\n".join(lines + ([f"  setting: {setting}"] if setting else []))


def load_state_dict(path):
    """A state dict from .safetensors, .pth, .pt or .bin."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state


def build_dinov2(weights_path, model_name=MODEL_NAME, img_size=RESOLUTION, used_for="FD-DINOv2", setting=None):
    """timm's DINOv2 at `img_size` with the weights of a local file (position embedding resampled at load), frozen.
    A missing file raises MissingDINOv2Weights; `used_for` and `setting` (the caller's option that names the file)
    go into its message."""
    if weights_path is None or not Path(weights_path).is_file():
        raise MissingDINOv2Weights(missing_message(weights_path, model_name, used_for, setting))
    model = timm.create_model(model_name.split(".")[0], pretrained=False, img_size=img_size, num_classes=0)
    state = checkpoint_filter_fn(load_state_dict(weights_path), model)  # hub keys -> timm's, pos_embed resampled
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)
