"""Inception Score and precision/recall, computed by torch-fidelity's own functions from our features.

Both need per-sample features (not just sums), so they are only kept when asked for.
- Inception Score (Salimans et al. 2016, 1606.03498): exp E_x KL(p(y|x) || p(y)) over `splits` splits of the
  bias-free logits, as torch-fidelity (and the original TF code) does; 10 splits of 50K = ADM's 5000 each.
- Improved precision/recall (Kynkaanniemi et al. 2019, 1904.06991) with k=3 neighbourhoods. torch-fidelity
  defaults to VGG16 features for it; we pass Inception pool features, as ADM's evaluator (and so the DiT
  paper's tables) does, which also spares a second network download.
"""

from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from utils.errors import ConfigError


def inception_score(logits, splits=10, shuffle=True, rng_seed=2020):
    """(mean, std) of the Inception Score over splits of (N, 1008) bias-free logits (torch-fidelity's defaults)."""
    if logits.shape[0] < splits:
        raise ConfigError(f"the Inception Score needs at least splits={splits} samples, got {logits.shape[0]}")
    out = isc_features_to_metric(logits.detach().float().cpu(), splits=splits, shuffle=shuffle, rng_seed=rng_seed)
    return out["inception_score_mean"], out["inception_score_std"]


def precision_recall(gen_features, ref_features, neighborhood=3, batch_size=10000):
    """(precision, recall) of generated vs reference (N, D) features. Runs on the features' device
    (a GPU makes 50K x 10K distances quick); batch_size bounds the distance blocks kept in memory."""
    if min(gen_features.shape[0], ref_features.shape[0]) <= neighborhood:
        raise ConfigError(f"precision/recall with k={neighborhood} needs more than {neighborhood} samples per set")
    gen = gen_features.detach().float()
    ref = ref_features.detach().float().to(gen.device)
    out = prc_features_to_metric(
        gen, ref, prc_neighborhood=neighborhood, prc_batch_size=batch_size, save_cpu_ram=True, verbose=False
    )
    return out["precision"], out["recall"]

