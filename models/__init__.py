"""Networks. Every model is called as model(x, t, y) -> (N, C_out, H, W); id num_classes is the null class."""

from .dit import BLOCK_TYPES, DIT_SIZES, EXTRA_SIZES, LIGHTNINGDIT_SIZES, DiT, DiT_models, LightningDiT_models
from .ditdh import DiTDH, DiTDH_models
from .jit import JiT, JiT_models
from .flops import count_params, forward_gflops, model_stats
from .mup import optimizer_params, param_groups, parametrize
from .unet import UNet_models
from .vae import VAE, build_vae
from utils.errors import ConfigError

# Every buildable model by name: "DiT-XL/2", "UNet-B", ... Each takes input_size, in_channels, num_classes,
# learn_sigma (and its own extra keyword arguments).
MODELS = {**DiT_models, **LightningDiT_models, **DiTDH_models, **JiT_models, **UNet_models}

__all__ = ["BLOCK_TYPES", "DIT_SIZES", "DiT", "DiT_models", "LightningDiT_models", "MODELS", "UNet_models", "count_params",
           "DiTDH", "DiTDH_models", "JiT", "JiT_models",
           "VAE", "build_model", "build_vae", "create_model", "forward_gflops", "model_stats",
           "optimizer_params", "param_groups", "with_width"]


def create_model(name, **kwargs):
    """Build the model called `name` (a key of MODELS, e.g. "DiT-XL/2")."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


def with_width(name, kwargs, width=None, head_width=None):
    """Model `name`'s constructor arguments `kwargs` (config model.kwargs) plus those that make it `width` wide
    (config model.width; None: none): a DiT's hidden_size, with heads `head_width` wide (config model.head_width;
    None: the named size's; num_heads = width / head_width: μP widens by adding heads of a fixed size), or a U-Net's
    model_channels (its heads are head_channels wide already)."""
    kwargs = dict(kwargs or {})
    if width is None:
        if head_width is not None:
            raise ConfigError(f"model.head_width={head_width} sizes the heads of model.width; set model.width too")
        return kwargs
    clash = sorted({"hidden_size", "num_heads", "model_channels"} & set(kwargs))
    if clash:
        raise ConfigError(f"model.width={width} sets the width; drop model.kwargs.{clash[0]} (or model.width)")
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    if name.startswith("UNet"):
        if head_width is not None:
            raise ConfigError("model.head_width is a DiT's; a U-Net's heads are model.kwargs.head_channels wide")
        return {**kwargs, "model_channels": int(width)}
    size = {**DIT_SIZES, **EXTRA_SIZES, **LIGHTNINGDIT_SIZES}.get(name.split("-")[1].split("/")[0])
    if size is None or not name.startswith(("DiT-", "LightningDiT-")):
        raise ConfigError(f"model.width is defined for the DiT, LightningDiT and U-Net sizes, not {name}; set its "
                          f"widths in model.kwargs instead")
    head = int(head_width or size["hidden_size"] // size["num_heads"])
    if width <= 0 or width % head:
        raise ConfigError(f"model.width={width}: {name}'s heads are {head} wide, so its width must be a positive "
                          f"multiple of {head}")
    return {**kwargs, "hidden_size": int(width), "num_heads": int(width) // head}


def build_model(model_args):
    """Rebuild a network from the arguments a checkpoint records (`model_args`: its name, the constructor's keyword
    arguments, its parametrization `param` (sp | mup, models/mup.py) and `base_width` and, for latent models, `vae`,
    which is not the network's). Checkpoints without `param` are sp."""
    kwargs = {k: v for k, v in model_args.items() if k not in ("vae", "param", "base_width")}
    return parametrize(create_model(kwargs.pop("name"), **kwargs), model_args.get("param", "sp"),
                       model_args.get("base_width"))
