"""Networks. Every model is called as model(x, t, y) -> (N, C_out, H, W); id num_classes is the null class."""

from .dit import BLOCK_TYPES, DIT_SIZES, DiT, DiT_models
from .flops import count_params, forward_gflops, model_stats

__all__ = ["BLOCK_TYPES", "DIT_SIZES", "DiT", "DiT_models", "count_params", "forward_gflops", "model_stats"]
