"""Parameter and Gflops counts, in the DiT paper's convention.

The paper's "Gflops" are forward multiply-accumulates per image (DiT-XL/2 at 256x256 = 118.6), so the
count from torch's FlopCounterMode (2 flops per multiply-accumulate) is halved. The model is built on the
meta device, so even DiT-XL/2 is counted in milliseconds without allocating its weights.
"""

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_params(model):
    """Trainable parameters plus buffers saved with the model (the fixed positional embedding counts, as
    in the official code where it is a frozen parameter)."""
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for name, b in model.named_buffers() if name.endswith("pos_embed"))
    return params + buffers


def forward_gflops(model, input_shape, num_classes=None):
    """Forward multiply-accumulates (in units of 1e9) for one sample of shape (C, H, W)."""
    device = next(model.parameters()).device
    x = torch.zeros(1, *input_shape, device=device)
    t = torch.zeros(1, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, y)
    return counter.get_total_flops() / 2 / 1e9


def model_stats(build, input_shape):
    """Build a model with `build()` on the meta device and return {"params": int, "gflops": float}."""
    with torch.device("meta"):
        model = build()
    return {"params": count_params(model), "gflops": forward_gflops(model, input_shape)}
