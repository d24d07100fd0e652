"""The digits network: a small convolutional classifier of scikit-learn's bundled 8x8 digits, frozen, shared by the
digits feature metric (evaluation/digits.py: FD-digits, precision/recall, IS, class accuracy) and REPA's `digits`
encoder (diffusion/repa.py).

    conv 3x3 1->32, ReLU                 8x8
    conv 3x3 32->64, ReLU, max-pool 2    4x4
    conv 3x3 64->128, ReLU               4x4    <- `spatial`: a 4x4 grid of 128-d features (DiT-Mini/2's tokens)
    global average pool                  128    <- `pool`: the features of Frechet distance and precision/recall
    linear 128->10                       10     <- `logits`: Inception Score and the class-accuracy score

Its weights ship with the repository with their SHA-256 (evaluation/weights/digits_net.pt, beside the code that
trains them: `python -m evaluation train-digits`), so every run on every machine measures with the same network.
"""

import hashlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import ConfigError, MissingFile

WEIGHTS = Path(__file__).resolve().parents[1] / "evaluation" / "weights" / "digits_net.pt"
RETRAIN = "`python -m evaluation train-digits` (seconds on a CPU)"


class DigitsNet(nn.Module):
    """The classifier; forward returns {"spatial": (N, 16, 128), "pool": (N, 128), "logits": (N, 10)}."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        """x: float (N, 1, 8, 8) in [-1, 1]."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)              # (N, 64, 4, 4)
        h = F.relu(self.conv3(h))                               # (N, 128, 4, 4)
        pool = h.mean((2, 3))                                   # (N, 128)
        return {"spatial": h.flatten(2).transpose(1, 2), "pool": pool, "logits": self.fc(pool)}


def to_input(images):
    """uint8 (N, 1, 8, 8) -> float in [-1, 1], the network's input (and the generators' data range)."""
    return images.float() / 127.5 - 1


def state_sha256(state_dict):
    """SHA-256 of a state dict's tensors (names, shapes, dtypes and bytes, in key order): the network's identity."""
    h = hashlib.sha256()
    for name, tensor in state_dict.items():
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_digits_net(path=None):
    """(network, info) from the shipped weights (or `path`), frozen; the stored hash is checked."""
    path = Path(path) if path is not None else WEIGHTS
    if not path.is_file():
        raise MissingFile(f"the digits network's weights {path} are missing; regenerate them with {RETRAIN}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if state_sha256(payload["state_dict"]) != payload["sha256"]:
        raise ConfigError(f"{path} does not match its recorded SHA-256 (a damaged file); regenerate it with "
                          f"{RETRAIN}")
    net = DigitsNet()
    net.load_state_dict(payload["state_dict"])
    return net.eval().requires_grad_(False), {k: v for k, v in payload.items() if k != "state_dict"}
