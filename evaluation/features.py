"""The feature networks behind one interface (network.py): torch-fidelity's Inception (inception.py), the bundled
digits' classifier (digits.py, over models/digits_net.py) and DINOv2 ViT-L/14 (dinov2.py, over models/dinov2.py),
chosen by name. The evaluator (evaluator.py) builds them here and knows no network by its class.
"""

from .digits import DigitsFeatures
from .dinov2 import DINOv2Features
from .inception import (FID_LAYER, INCEPTION_FILENAME, INCEPTION_SHA256, INCEPTION_URL, IS_LAYER,  # noqa: F401
                        SFID_DIM, SFID_LAYER, BadInceptionWeights, InceptionFeatures, MissingInceptionWeights,
                        hub_weights_path, load_inception_state_dict, resolve_inception_weights,
                        write_random_inception_weights)
from .network import as_rgb_uint8, file_sha256  # noqa: F401  (re-exported: importable from here as before)

FEATURE_NETWORKS = ("inception", "digits", "dinov2")
# (FID / precision-recall layer, logits layer for IS and class accuracy, spatial layer for sFID) of each network.
NETWORK_LAYERS = {"inception": (FID_LAYER, IS_LAYER, SFID_LAYER), "digits": ("pool", "logits", None),
                  "dinov2": ("cls", None, None)}


def network_layers(features):
    """(fid_layer, is_layer, spatial_layer) of a feature network, by name (None where it has no such layer)."""
    if features not in NETWORK_LAYERS:
        raise ValueError(f"unknown feature network {features!r}; choose one of {', '.join(FEATURE_NETWORKS)}")
    return NETWORK_LAYERS[features]


def build_features(features="inception", weights=None, device=None, batch_size=64, layers=None, download=True):
    """The feature network called `features`, with the FeatureNetwork interface (call, iterate, provenance,
    fid_layer / is_layer / spatial_layer). weights: a local weights file (inception: torch-fidelity's file, else
    the hub cache or a download, SHA-256-checked under the published name and always loaded with weights_only=True;
    digits: the shipped file; dinov2: required). layers: default its FID layer."""
    network_layers(features)  # a clear error for an unknown name
    if features == "inception":
        return InceptionFeatures(weights, device=device, batch_size=batch_size,
                                 layers=layers or (FID_LAYER,), download=download)
    if features == "digits":
        return DigitsFeatures(weights, device=device, batch_size=max(batch_size, 256), layers=layers or ("pool",))
    return DINOv2Features(weights, device=device, batch_size=batch_size, layers=layers or ("cls",))
