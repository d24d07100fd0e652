"""Networks. Every model is called as model(x, t, y) -> (N, C_out, H, W); id num_classes is the null class."""

from .dit import BLOCK_TYPES, DIT_SIZES, DiT, DiT_models, LightningDiT_models
from .flops import count_params, forward_gflops, model_stats
from .unet import UNet_models
from .vae import VAE, build_vae
from utils.errors import ConfigError

# Every buildable model by name: "DiT-XL/2", "UNet-B", ... Each takes input_size, in_channels, num_classes,
# learn_sigma (and its own extra keyword arguments).
MODELS = {**DiT_models, **LightningDiT_models, **UNet_models}

__all__ = ["BLOCK_TYPES", "DIT_SIZES", "DiT", "DiT_models", "LightningDiT_models", "MODELS", "UNet_models", "count_params",
           "VAE", "build_vae", "create_model", "forward_gflops", "model_stats"]


def create_model(name, **kwargs):
    """Build the model called `name` (a key of MODELS, e.g. "DiT-XL/2")."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)
