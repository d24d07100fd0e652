"""Inception features from torch-fidelity's `inception-v3-compat` extractor, the network TF-FID uses.

The network, its weights (converted from TensorFlow's 2015-12-05 Inception graph) and its TensorFlow-1.x
compatible bilinear resize to 299x299 are torch-fidelity's own. This file only finds the weights without
surprises (a path, else torch's hub cache, else one download that fails with instructions), turns uint8
batches of any size and 1 or 3 channels into the (N, 3, H, W) uint8 the network wants, and keeps TF32 and
autocast away from it, so features are the same wherever they are computed.
"""

import contextlib
import hashlib
import os
import socket
import tempfile

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from tqdm.auto import tqdm

from utils.errors import MissingFile

EXTRACTOR_NAME = "inception-v3-compat"      # torch-fidelity's registry name for this network
INCEPTION_URL = URL_INCEPTION_V3
INCEPTION_FILENAME = os.path.basename(INCEPTION_URL)  # weights-inception-2015-12-05-6726825d.pth
FID_LAYER = "2048"                          # pool_3 features: FID, precision/recall
IS_LAYER = "logits_unbiased"                # fc without bias, as the original Inception Score code
# sFID (Nash et al. 2021, 2103.03841): the first 7 channels of the 17x17 map of TF's `mixed_6/conv` (ADM's
# evaluator), which is the 1x1 branch of the fourth 17x17 block, Mixed_6d.branch1x1 in torch-fidelity's port.
SFID_LAYER = "mixed_6/conv"
SFID_CHANNELS = 7
SFID_DIM = SFID_CHANNELS * 17 * 17          # every input is resized to 299x299 first, so the map is 17x17


class MissingInceptionWeights(MissingFile):
    """The Inception weights file is not on disk and could not be downloaded."""


# ---------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------

def hub_weights_path():
    """Where torch-fidelity's own download would put the weights: torch's hub cache (follows TORCH_HOME)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILENAME)


def _missing_message(reason):
    return (
        f"Inception weights for FID not found ({reason}).\n"
        f"  file:      {INCEPTION_FILENAME}\n"
        f"  source:    {INCEPTION_URL}\n"
        f"  put it at: {hub_weights_path()}  (torch's hub cache; TORCH_HOME moves it)\n"
        f"  or pass its path: --inception-weights PATH on the command line, "
        f"inception_weights=PATH in Python (FIDScorer, InceptionFeatures)."
    )


def resolve_inception_weights(weights_path=None, download=True, timeout_s=30):
    """Path of the Inception weights file: `weights_path` if given (it must exist; never downloads), else the
    copy in torch's hub cache, else one download into that cache (when `download`). Raises
    MissingInceptionWeights naming the file, its URL, the cache path and the flag otherwise."""
    if weights_path is not None:
        weights_path = os.fspath(weights_path)
        if os.path.isfile(weights_path):
            return weights_path
        raise MissingInceptionWeights(_missing_message(f"no file at the given path {weights_path!r}"))
    cached = hub_weights_path()
    if os.path.isfile(cached):
        return cached
    if not download:
        raise MissingInceptionWeights(_missing_message(f"not in the hub cache and downloads are off"))
    # torch's downloader opens the URL without a timeout; a machine without network would hang, not fail.
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, cached, progress=True)
    except Exception as e:  # no network, proxy, HTTP error, disk: all end the same way
        raise MissingInceptionWeights(_missing_message(f"the download failed: {e!r}")) from e
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return cached


def file_sha256(path, chunk_bytes=1 << 24):
    """Hex SHA-256 of a file, read in chunks (reference files can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


class _RandomInception(FeatureExtractorInceptionV3):
    """The real network class with its weight loading turned into a no-op (keeps the random init)."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


def write_random_inception_weights(path, seed=0):
    """Write a randomly initialised `inception-v3-compat` state_dict to `path`, without network.

    For tests and benchmarks only: the file has the real keys and shapes, so everything downstream runs the
    real code path, but the numbers it gives mean nothing. Convolutions are re-drawn He-normal so the
    features stay O(1) through the ~100 layers instead of vanishing; the fc layer is scaled up likewise.
    """
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty.pth")
        torch.save({}, empty)
        net = _RandomInception(EXTRACTOR_NAME, [FID_LAYER], feature_extractor_weights_path=empty)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.nn.init.normal_(net.fc.weight, std=16 / net.fc.in_features ** 0.5)  # logits O(1): a non-trivial IS
    torch.save(net.state_dict(), path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Extractor
# ---------------------------------------------------------------------------------------------------------

def as_rgb_uint8(images):
    """uint8 (N, C, H, W) with C in {1, 3} -> (N, 3, H, W); grey is repeated, as PIL's convert("RGB") does."""
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected a uint8 tensor (N, C, H, W), got {getattr(images, 'dtype', type(images))} "
                         f"of shape {tuple(getattr(images, 'shape', ()))}")
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels in dim 1 (N, C, H, W), got shape {tuple(images.shape)}")
    return images


@contextlib.contextmanager
def _full_float32(device):
    """No TF32 and no autocast inside: train.py may turn TF32 on, which would move features by ~1e-3."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type=device.type, enabled=False), torch.no_grad():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class InceptionFeatures:
    """torch-fidelity's Inception, loaded once; call it on uint8 (N, C, H, W) batches of any size and H, W.

    layers: which outputs to return, from "2048" (FID, precision/recall), "logits_unbiased" (IS) and
    "mixed_6/conv" (sFID: 7 x 17 x 17 = 2023 spatial features, flattened height, width, channel as in TF).
    Weights: `weights_path`, else torch's hub cache, else a download (see resolve_inception_weights).
    """

    name = "inception"
    fid_layer, is_layer, spatial_layer = FID_LAYER, IS_LAYER, SFID_LAYER

    def __init__(self, weights_path=None, device=None, batch_size=64, layers=(FID_LAYER,), download=True):
        self.weights_path = resolve_inception_weights(weights_path, download=download)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.layers = tuple(layers)
        provided = FeatureExtractorInceptionV3.get_provided_features_list()
        unknown = [name for name in self.layers if name not in (*provided, SFID_LAYER)]
        if unknown:
            raise ValueError(f"unknown Inception layers {unknown}; choose from {', '.join((*provided, SFID_LAYER))}")
        # torch-fidelity's own outputs; "768" (after Mixed_6e) is the cheapest that runs through Mixed_6d.
        self._own = [name for name in self.layers if name != SFID_LAYER] or ["768"]
        self.net = FeatureExtractorInceptionV3(
            EXTRACTOR_NAME, self._own, feature_extractor_weights_path=self.weights_path
        ).to(self.device)
        self._spatial = None
        if SFID_LAYER in self.layers:
            self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output[:, :SFID_CHANNELS].permute(0, 2, 3, 1).flatten(1).to(torch.float32)

    def __call__(self, images):
        """uint8 (N, C, H, W) -> {layer: float32 (N, D) on self.device}, run in chunks of batch_size."""
        images = as_rgb_uint8(images)
        out = {name: [] for name in self.layers}
        with _full_float32(self.device):
            for chunk in images.split(self.batch_size):
                features = dict(zip(self._own, self.net(chunk.to(self.device, non_blocking=True))))
                if SFID_LAYER in out:
                    features[SFID_LAYER], self._spatial = self._spatial, None
                for name in self.layers:
                    out[name].append(features[name])
        return {name: torch.cat(fs) for name, fs in out.items()}

    def iterate(self, batches, total=None, progress=True, desc="Inception features"):
        """Features of each batch of an iterable of uint8 batches, with a tqdm bar counting images."""
        with tqdm(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
            for images in batches:
                yield self(images)
                bar.update(images.shape[0])

    def provenance(self):
        """What produced the features, for result files."""
        import torch_fidelity

        return {
            "name": f"torch-fidelity {EXTRACTOR_NAME}",
            "torch_fidelity_version": torch_fidelity.__version__,
            "layers": list(self.layers),
            "weights": os.path.abspath(self.weights_path),
            "weights_sha256": file_sha256(self.weights_path),
        }


# ---------------------------------------------------------------------------------------------------------
# The feature networks behind one interface
# ---------------------------------------------------------------------------------------------------------

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
    """The feature network called `features`, with the InceptionFeatures interface (call, iterate, provenance,
    fid_layer / is_layer / spatial_layer). weights: a local weights file (inception: torch-fidelity's file, else
    the hub cache or a download; digits: the shipped file; dinov2: required). layers: default its FID layer."""
    network_layers(features)  # a clear error for an unknown name
    if features == "inception":
        return InceptionFeatures(weights, device=device, batch_size=batch_size,
                                 layers=layers or (FID_LAYER,), download=download)
    if features == "digits":
        from .digits import DigitsFeatures
        return DigitsFeatures(weights, device=device, batch_size=max(batch_size, 256), layers=layers or ("pool",))
    from .dinov2 import DINOv2Features
    return DINOv2Features(weights, device=device, batch_size=batch_size, layers=layers or ("cls",))
