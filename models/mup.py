"""μP (maximal update parametrization; Yang et al., Tensor Programs V) for Adam, for the DiT family and the U-Nets.

Width-independent hyperparameters: a learning rate tuned on a narrow proxy (width `base_width`) transfers to a wide
model. For Adam, with m = width / base_width (references: ../shared/references/scaling-mup.md §1-2; Zheng et al.,
arXiv 2505.15270, whose official μP-DiT code classifies DiT's parameters the same way):

| role   | which parameters                                                     | Adam lr    | init          |
|--------|----------------------------------------------------------------------|------------|---------------|
| input  | fixed fan-in, width-sized output: patch embedding, t_embedder.mlp.0, | η          | width-free    |
|        | label tables; U-Net conv_in, class embedding, cross-attn to_k/to_v  |            |               |
| hidden | both dims scale with width: attention, MLP, adaLN, t_embedder.mlp.2; | η / m      | var ∝ 1/fan_in|
|        | every other U-Net conv and linear (they scale by fan-in as linears)  |            |               |
| output | the readout: final_layer.linear; the U-Net's conv_out                | η          | zero          |
| vector | every 1-d parameter: biases, norm weights                            | η          | width-free    |

and the readout's input is multiplied by 1/m (the model's plain float `readout_scale`). Implemented as explicit
AdamW parameter groups keyed by parameter names (the `mup` package's width annotations live on the Parameter objects
and are lost under deepcopy (EMA), FSDP2 and compile; it also has no convolutional readout). The initialisation
equals the official one at width == base_width: DiT keeps xavier for hidden matrices (variance ∝ 1/n), adaLN-Zero and
the zero readout, rescales the N(0, 0.02²) of t_embedder.mlp.2 by √(base/n) and holds the patch embedding's xavier
variance at its base-width value; the U-Net keeps PyTorch's fan-in init and ADM's zero convs and holds the hidden
layers' biases at their base-width scale (× √m, as `mup.set_base_shapes` does). Attention keeps 1/√d_head: widths
grow by adding heads of a fixed size (DiT: num_heads with the width; U-Net: head_channels), as the official μP-DiT.

`param_groups(model, base_width)` is what the optimizer takes; the trainer sets each group's lr to
lr × group["lr_scale"] (utils/parallel.Trainables.zero_grad). `parametrize(model, param, base_width)` is what
models.build_model applies to a freshly built network from a checkpoint's model_args.
"""

import math

import torch
import torch.nn as nn

from utils.errors import ConfigError

from .dit import DiT
from .unet import UNet

PARAMS = ("sp", "mup")
ROLES = ("input", "hidden", "output", "vector")


def _plain(name):
    """A parameter's name without DDP/compile wrappers' prefixes."""
    name = name.replace("_orig_mod.", "")
    return name[len("module."):] if name.startswith("module.") else name


def _dit_role(name, p):
    if p.ndim < 2:
        return "vector"
    if name.startswith(("x_embedder.", "y_embedder.")) or name in (
            "t_embedder.mlp.0.weight", "dt_embedder.mlp.0.weight",   # the fixed-width sinusoidal features of each
            "omega_embedder.mlp.0.weight", "t_min_embedder.mlp.0.weight", "t_max_embedder.mlp.0.weight"):   # scalar
        return "input"
    return "output" if name == "final_layer.linear.weight" else "hidden"


def _unet_role(name, p):
    if p.ndim < 2:
        return "vector"
    if name in ("unet.conv_in.weight", "unet.class_embedding.weight", "class_embedder.weight") or (
            ".attn2.to_k." in name or ".attn2.to_v." in name):   # cross-attention keys/values read the fixed context
        return "input"
    return "output" if name == "unet.conv_out.weight" else "hidden"


def _family(model):
    if isinstance(model, DiT):
        return _dit_role
    if isinstance(model, UNet):
        return _unet_role
    raise ConfigError(f"model.param=mup knows the DiT family and the U-Nets, not {type(model).__name__}")


def classify(model):
    """{parameter name: "input" | "hidden" | "output" | "vector"} for every parameter of a DiT or U-Net."""
    role = _family(model)
    return {name: role(_plain(name), p) for name, p in model.named_parameters()}


def width(model):
    """The width μP scales: DiT's hidden_size, the U-Net's model_channels."""
    if isinstance(model, DiT):
        return model.x_embedder.proj.out_channels
    if isinstance(model, UNet):
        return model.unet.conv_in.out_channels
    raise ConfigError(f"model.param=mup knows the DiT family and the U-Nets, not {type(model).__name__}")


def _base(model, base_width):
    base = width(model) if base_width is None else base_width
    if not (isinstance(base, int) and base > 0):
        raise ConfigError(f"model.base_width={base_width!r}: give a positive integer width (or null: the model's own)")
    return base


def param_groups(model, base_width=None):
    """AdamW parameter groups: hidden matrices with lr_scale = base_width / width, every other parameter with 1 (in
    that group order, the lr_scale-1 group first so that param_groups[0]["lr"] is the base learning rate)."""
    scale = _base(model, base_width) / width(model)
    roles = classify(model)
    params = dict(model.named_parameters())
    other = [params[n] for n, r in roles.items() if r != "hidden"]
    hidden = [params[n] for n, r in roles.items() if r == "hidden"]
    groups = [{"params": other, "lr_scale": 1.0}, {"params": hidden, "lr_scale": scale}]
    return [g for g in groups if g["params"]]


def optimizer_params(model, param="sp", base_width=None):
    """What the optimizer takes: the parameters as one group under sp (the official run, its optimizer state
    unchanged), param_groups(model, base_width) under mup."""
    if param not in PARAMS:
        raise ConfigError(f"model.param={param!r}; choose one of {', '.join(PARAMS)}")
    return param_groups(model, base_width) if param == "mup" else model.parameters()


@torch.no_grad()
def mup_init_(model, base_width=None):
    """Re-initialise a freshly built (official-init) network as μP prescribes for width(model) against base_width;
    the identity at width == base_width. Rescales in place, so it draws no random numbers."""
    n, base = width(model), _base(model, base_width)
    if isinstance(model, DiT):
        # Input: the patch embedding's xavier variance 2 / (n + C·p²) (official: on the flattened kernel) held at
        # its base-width value; hidden: the constant std 0.02 of t_embedder.mlp.2 becomes 0.02·√(base/n).
        fan_in = model.x_embedder.proj.weight[0].numel()
        model.x_embedder.proj.weight.mul_(math.sqrt((n + fan_in) / (base + fan_in)))
        model.t_embedder.mlp[2].weight.mul_(math.sqrt(base / n))
        extra = [model.dt_embedder] if model.dt_embedder is not None else []
        for embedder in (*extra, *model.guidance_embedders()):   # the one-step objectives' conditions, as t's
            embedder.mlp[2].weight.mul_(math.sqrt(base / n))
    else:
        # PyTorch's fan-in init is already μP for the weights; a hidden layer's bias (uniform ±1/√fan_in) is held at
        # its base-width scale, as mup.set_base_shapes(rescale_params=True) does.
        roles = classify(model)
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None and \
                    roles.get(f"{name}.weight") == "hidden":
                module.bias.mul_(math.sqrt(n / base))
    return model


def set_readout_scale(model, base_width=None):
    """The output multiplier base_width / width on the readout's input, as the model's plain float readout_scale."""
    model.readout_scale = float(_base(model, base_width) / width(model))
    return model


def parametrize(model, param="sp", base_width=None):
    """Apply the parametrization `param` (sp: the official one, untouched; mup: mup_init_ and set_readout_scale) to
    a freshly built network; returns it."""
    if param not in PARAMS:
        raise ConfigError(f"model.param={param!r}; choose one of {', '.join(PARAMS)}")
    if param == "mup":
        set_readout_scale(mup_init_(model, base_width), base_width)
    return model
