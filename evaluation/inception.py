"""Inception features from torch-fidelity's `inception-v3-compat` extractor, the network TF-FID uses.

The network, its weights (converted from TensorFlow's 2015-12-05 Inception graph) and its TensorFlow-1.x
compatible bilinear resize to 299x299 are torch-fidelity's own. This file only finds the weights without
surprises (a path, else torch's hub cache, else one download that fails with instructions), turns uint8
batches of any size and 1 or 3 channels into the (N, 3, H, W) uint8 the network wants, and keeps TF32 and
autocast away from it, so features are the same wherever they are computed.

Nothing loaded runs code: torch-fidelity's own loader unpickles the weights with weights_only=False and its download
is not hash-checked, so a file planted in a shared hub cache would run in every FID run. Here the weights are read
once into memory, a file named as torch-fidelity's published one (the hub cache's, a download's, or a user's) must
have its SHA-256, and the state_dict is unpickled with torch.load(weights_only=True) (plain tensors only) before
torch-fidelity's network is built from it.
"""

import hashlib
import io
import os
import pickle
import socket
import uuid

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from utils.errors import BadInput, MissingFile

from .network import FeatureNetwork, as_rgb_uint8, full_float32

EXTRACTOR_NAME = "inception-v3-compat"      # torch-fidelity's registry name for this network
INCEPTION_URL = URL_INCEPTION_V3
INCEPTION_FILENAME = os.path.basename(INCEPTION_URL)  # weights-inception-2015-12-05-6726825d.pth
# SHA-256 of that file (95,628,359 bytes). torch-fidelity publishes its first 8 hex digits in the file name (torch.hub's
# hash-prefix convention, `6726825d`); the full digest is the one recorded independently by several projects that
# pin this file, and it starts with that prefix. Both are checked.
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_HASH_PREFIX = INCEPTION_FILENAME.rsplit("-", 1)[-1].split(".")[0]   # 6726825d, as torch.hub reads it
assert INCEPTION_SHA256.startswith(INCEPTION_HASH_PREFIX), "the pinned SHA-256 must carry the file name's prefix"
FID_LAYER = "2048"                          # pool_3 features: FID, precision/recall
IS_LAYER = "logits_unbiased"                # fc without bias, as the original Inception Score code
# sFID (Nash et al. 2021, 2103.03841): the first 7 channels of the 17x17 map of TF's `mixed_6/conv` (ADM's
# evaluator), which is the 1x1 branch of the fourth 17x17 block, Mixed_6d.branch1x1 in torch-fidelity's port.
SFID_LAYER = "mixed_6/conv"
SFID_CHANNELS = 7
SFID_DIM = SFID_CHANNELS * 17 * 17          # every input is resized to 299x299 first, so the map is 17x17


class MissingInceptionWeights(MissingFile):
    """The Inception weights file is not on disk and could not be downloaded."""


class BadInceptionWeights(BadInput):
    """An Inception weights file that is not the published one (wrong SHA-256) or not plain tensors."""


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
    copy in torch's hub cache, else one download into that cache (when `download`; the file lands there only
    once its SHA-256 is the published one). Raises MissingInceptionWeights naming the file, its URL, the cache
    path and the flag otherwise. The file's content is checked when it is read (load_inception_state_dict)."""
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
    partial = f"{cached}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"  # unique across hosts
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, partial, progress=True)
        with open(partial, "rb") as f:
            check_inception_sha256(f.read(), INCEPTION_URL)
        os.replace(partial, cached)
    except BadInceptionWeights:
        raise
    except Exception as e:  # no network, proxy, HTTP error, disk: all end the same way
        raise MissingInceptionWeights(_missing_message(f"the download failed: {e!r}")) from e
    finally:
        socket.setdefaulttimeout(previous_timeout)
        if os.path.exists(partial):
            os.remove(partial)
    return cached


def check_inception_sha256(data, source):
    """Refuse bytes that do not have the published file's SHA-256 (BadInceptionWeights naming `source` and the fix);
    returns the digest."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != INCEPTION_SHA256:
        raise BadInceptionWeights(
            f"{source} is not torch-fidelity's published Inception weights: its SHA-256 is {digest}, the published "
            f"{INCEPTION_FILENAME} has {INCEPTION_SHA256}. It was not loaded. A damaged or replaced file: delete it "
            f"and let the evaluation download it again from {INCEPTION_URL} (or copy a good one there). Weights of "
            f"your own (e.g. a conversion) must not carry the published file's name: rename the file and pass its "
            f"path (--inception-weights PATH).")
    return digest


def load_inception_state_dict(path):
    """(state_dict, sha256) of an Inception weights file, without running anything in it.

    The file is read once into memory; a file named as torch-fidelity's published one (the hub cache's copy, or a
    path given with that name) must have the published SHA-256 (check_inception_sha256); any other file, given
    explicitly by the user, is accepted as long as it holds plain tensors: it is unpickled with
    torch.load(weights_only=True) either way, and a file that needs more gets one message naming it.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if os.path.basename(path) == INCEPTION_FILENAME:
        digest = check_inception_sha256(data, path)
    else:
        digest = hashlib.sha256(data).hexdigest()
    try:
        state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        reason = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:200] if str(error) else ""
        raise BadInceptionWeights(
            f"the Inception weights file {path} does not load as plain tensors with torch.load(weights_only=True) "
            f"({type(error).__name__}: {reason}); it was not unpickled. The weights are a state_dict of tensors "
            f"only, so this file is damaged or not Inception weights: use torch-fidelity's {INCEPTION_FILENAME} "
            f"(download: {INCEPTION_URL}; put it at {hub_weights_path()} or pass --inception-weights PATH).") from None
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise BadInceptionWeights(f"the Inception weights file {path} holds a {type(state_dict).__name__}, not a "
                                  f"state_dict of tensors; use torch-fidelity's {INCEPTION_FILENAME} "
                                  f"({INCEPTION_URL})")
    return state_dict, digest


def _empty_state_dict():
    """What torch-fidelity's constructor gets to load (with its weights_only=False): an empty dict, written here in
    memory, so it unpickles nothing from any file; the real weights follow through load_inception_state_dict."""
    buffer = io.BytesIO()
    torch.save({}, buffer)
    buffer.seek(0)
    return buffer


class TorchFidelityInception(FeatureExtractorInceptionV3):
    """torch-fidelity's `inception-v3-compat` network (its own class: forward, resize, dtype), built from a state_dict
    that was loaded safely. state_dict=None keeps the random initialisation (write_random_inception_weights)."""

    def __init__(self, features_list, state_dict=None):
        super().__init__(EXTRACTOR_NAME, list(features_list), feature_extractor_weights_path=_empty_state_dict())
        self._built = True
        if state_dict is not None:
            self.load_state_dict(state_dict)   # strict: every key and shape of torch-fidelity's network

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if not getattr(self, "_built", False):   # the constructor's own load of the empty placeholder
            return None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def write_random_inception_weights(path, seed=0):
    """Write a randomly initialised `inception-v3-compat` state_dict to `path`, without network.

    For tests and benchmarks only: the file has the real keys and shapes, so everything downstream runs the
    real code path, but the numbers it gives mean nothing. Convolutions are re-drawn He-normal so the
    features stay O(1) through the ~100 layers instead of vanishing; the fc layer is scaled up likewise.
    Do not give it torch-fidelity's published file name: that name is checked against the published SHA-256.
    """
    torch.manual_seed(seed)
    net = TorchFidelityInception([FID_LAYER])
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.nn.init.normal_(net.fc.weight, std=16 / net.fc.in_features ** 0.5)  # logits O(1): a non-trivial IS
    torch.save(net.state_dict(), path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Extractor
# ---------------------------------------------------------------------------------------------------------

class InceptionFeatures(FeatureNetwork):
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
        state_dict, self.weights_sha256 = load_inception_state_dict(self.weights_path)   # weights_only=True
        self.net = TorchFidelityInception(self._own, state_dict).to(self.device)
        del state_dict
        self._spatial = None
        if SFID_LAYER in self.layers:
            self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output[:, :SFID_CHANNELS].permute(0, 2, 3, 1).flatten(1).to(torch.float32)

    def __call__(self, images):
        """uint8 (N, C, H, W) -> {layer: float32 (N, D) on self.device}, run in chunks of batch_size."""
        images = as_rgb_uint8(images)
        out = {name: [] for name in self.layers}
        with full_float32(self.device):
            for chunk in images.split(self.batch_size):
                features = dict(zip(self._own, self.net(chunk.to(self.device, non_blocking=True))))
                if SFID_LAYER in out:
                    features[SFID_LAYER], self._spatial = self._spatial, None
                for name in self.layers:
                    out[name].append(features[name])
        return {name: torch.cat(fs) for name, fs in out.items()}

    def provenance(self):
        """What produced the features, for result files."""
        return {
            "name": f"torch-fidelity {EXTRACTOR_NAME}",
            "torch_fidelity_version": torch_fidelity.__version__,
            "layers": list(self.layers),
            "weights": os.path.abspath(self.weights_path),
            "weights_sha256": self.weights_sha256,
        }
