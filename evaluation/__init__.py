"""Evaluation: FID (Heusel et al. 2017), Inception Score and precision/recall of uint8 images, with
torch-fidelity's TF-compatible Inception (`inception-v3-compat`) and float64 statistics that merge across
chunks, shards and DDP ranks. CLI: `python -m evaluation fid|ref ...` (see __main__.py)."""

from .evaluator import FIDScorer, build_reference, compute_statistics, evaluate
from .features import (
    INCEPTION_FILENAME,
    INCEPTION_URL,
    InceptionFeatures,
    MissingInceptionWeights,
    hub_weights_path,
    resolve_inception_weights,
    write_random_inception_weights,
)
from .fid import fid_from_stats, frechet_distance
from .inputs import ImageSource, dataset_source, open_source, read_sidecar, to_uint8
from .scores import inception_score, precision_recall
from .stats import FeatureStats, load_reference, save_reference

__all__ = [
    "FIDScorer", "FeatureStats", "INCEPTION_FILENAME", "INCEPTION_URL", "ImageSource", "InceptionFeatures",
    "MissingInceptionWeights", "build_reference", "compute_statistics", "dataset_source", "evaluate",
    "fid_from_stats", "frechet_distance", "hub_weights_path", "inception_score", "load_reference", "open_source",
    "precision_recall", "read_sidecar", "resolve_inception_weights", "save_reference", "to_uint8",
    "write_random_inception_weights",
]
