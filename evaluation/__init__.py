"""Evaluation: FID (Heusel et al. 2017), Inception Score, precision/recall and class accuracy of uint8 images in the
feature space of a choice of networks: torch-fidelity's TF-compatible Inception (`inception-v3-compat`), the bundled
digits' own classifier (digits.py, no download) and DINOv2 ViT-L/14 (dinov2.py, FD-DINOv2), with float64 statistics
that merge across chunks, shards and DDP ranks. CLI: `python -m evaluation fid|ref|train-digits ...` (__main__.py).

Inside, imports point one way: network.py <- inception.py, digits.py, dinov2.py (the feature networks; the frozen
digits network and DINOv2 themselves are models/'s) <- features.py (the registry) <- evaluator.py <- real_digits.py
<- __main__.py, scaling.py, training.py; inputs.py, stats.py, fid.py and scores.py sit below the evaluator
(pyproject.toml's `evaluation-inside` import-linter contract, run by tests/test_layers.py)."""

from .digits import DigitsFeatures, digits_source
from .dinov2 import DINOv2Features, MissingDINOv2Weights
from .evaluator import FIDScorer, build_reference, class_accuracy, compute_statistics, evaluate
from .features import (
    FEATURE_NETWORKS,
    INCEPTION_FILENAME,
    INCEPTION_URL,
    InceptionFeatures,
    MissingInceptionWeights,
    build_features,
    hub_weights_path,
    resolve_inception_weights,
    write_random_inception_weights,
)
from .fid import fid_from_stats, frechet_distance
from .inputs import ImageSource, dataset_source, open_source, read_sidecar, to_uint8
from .real_digits import digits_floor, digits_reference
from .scores import inception_score, precision_recall
from .stats import FeatureStats, load_reference, save_reference

__all__ = [
    "DINOv2Features", "DigitsFeatures", "FEATURE_NETWORKS", "MissingDINOv2Weights", "build_features",
    "class_accuracy", "digits_floor", "digits_reference", "digits_source",
    "FIDScorer", "FeatureStats", "INCEPTION_FILENAME", "INCEPTION_URL", "ImageSource", "InceptionFeatures",
    "MissingInceptionWeights", "build_reference", "compute_statistics", "dataset_source", "evaluate",
    "fid_from_stats", "frechet_distance", "hub_weights_path", "inception_score", "load_reference", "open_source",
    "precision_recall", "read_sidecar", "resolve_inception_weights", "save_reference", "to_uint8",
    "write_random_inception_weights",
]
