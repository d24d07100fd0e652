"""The digits feature network (models/digits_net.py) as a feature network for FID, precision/recall, IS and class
accuracy on any machine, and the code that trains it.

Inception needs a 100 MB weights file a fresh or offline machine does not have, and it sees an 8x8 digit as a
blurred 299x299 picture. The digits network, a small convolutional classifier of scikit-learn's digits, is trained
in seconds on a fixed split, deterministically, and its weights ship with the repository
(evaluation/weights/digits_net.pt, with their SHA-256), so every run on every machine measures with the same network.

`python -m evaluation train-digits` retrains it (same seed, same split: the same weights on this CPU type and torch
version) and rewrites the file. The split is the digits judge's (benchmarks/digits_quality.py): 70% train, 30%
held out, stratified, random_state 0; reference statistics are those of the train split, and the distance of the
held-out digits to them is the floor every score is reported beside (real_digits.py).
"""

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from models.digits_net import WEIGHTS, DigitsNet, load_digits_net, state_sha256, to_input
from utils.errors import ConfigError
from utils.files import atomic_write_bytes

from .inputs import ImageSource
from .network import FeatureNetwork

SEED = 0
EPOCHS = 60
BATCH = 64
LR = 2e-3


def digits_split():
    """(x_train, y_train, x_test, y_test): the bundled digits as uint8 (N, 1, 8, 8) tensors (0..16 mapped to
    0..255 as data/digits.py does) and int64 labels, split as the digits judge splits them."""
    digits = load_digits()
    images = np.round(digits.images / 16 * 255).astype(np.uint8)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(images, digits.target, test_size=0.3, random_state=0,
                                                        stratify=digits.target)
    return (torch.from_numpy(x_train), torch.from_numpy(y_train).long(), torch.from_numpy(x_test),
            torch.from_numpy(y_test).long())


def digits_source(split="train"):
    """The real digits of one split ("train", "heldout" or "all") as a labelled ImageSource of uint8 images."""
    x_train, y_train, x_test, y_test = digits_split()
    x, y = {"train": (x_train, y_train), "heldout": (x_test, y_test),
            "all": (torch.cat([x_train, x_test]), torch.cat([y_train, y_test]))}[split]
    return ImageSource.from_array(x, name=f"digits:{split}", labels=y.numpy())


def _shift(x, generator):
    """Random translations by up to one pixel (background fill): a generator's samples are rarely centred exactly."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)                                   # (N, 1, 10, 10)
    shifted = torch.stack([padded[..., dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)])  # (9, N, 1, 8, 8)
    return shifted[torch.randint(0, 9, (n,), generator=generator), torch.arange(n)]


def train_digits_net(epochs=EPOCHS, seed=SEED, progress=False):
    """Train the network on the train split with one CPU thread and a fixed seed: deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the same reduction order whatever the machine's core count
    try:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        net = DigitsNet()
        x_train, y_train, _, _ = digits_split()
        x = to_input(x_train)
        opt = torch.optim.Adam(net.parameters(), lr=LR, weight_decay=1e-4)
        steps = epochs * ((len(x) + BATCH - 1) // BATCH)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
        for _ in tqdm(range(epochs), desc="digits network", disable=not progress):
            order = torch.randperm(len(x), generator=generator)
            for i in range(0, len(x), BATCH):
                index = order[i:i + BATCH]
                loss = F.cross_entropy(net(_shift(x[index], generator))["logits"], y_train[index])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
        return net.eval().requires_grad_(False)
    finally:
        torch.set_num_threads(threads)


def held_out_accuracy(net):
    _, _, x_test, y_test = digits_split()
    with torch.no_grad():
        return float((net(to_input(x_test))["logits"].argmax(1) == y_test).float().mean())


def save_digits_net(net, path=WEIGHTS):
    """Write the weights with their hash and held-out accuracy (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    payload = {"state_dict": state, "sha256": state_sha256(state), "held_out_accuracy": held_out_accuracy(net),
               "seed": SEED, "epochs": EPOCHS, "torch": str(torch.__version__)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return payload


class DigitsFeatures(FeatureNetwork):
    """The digits network with the FeatureNetwork interface: call it on uint8
    (N, 1, 8, 8) batches (3-channel grey is accepted) -> {layer: float32 (N, D)}.

    layers: "pool" (128-d, FID and precision/recall), "logits" (10, IS and class accuracy), "spatial" (16 x 128).
    """

    name = "digits"
    fid_layer, is_layer, spatial_layer = "pool", "logits", None
    LAYERS = ("pool", "logits", "spatial")

    def __init__(self, weights_path=None, device=None, batch_size=1024, layers=("pool",)):
        self.net, self.info = load_digits_net(weights_path)
        self.weights_path = Path(weights_path) if weights_path is not None else WEIGHTS
        self.device = torch.device(device if device is not None else "cpu")
        self.net.to(self.device)
        self.batch_size = batch_size
        unknown = [name for name in layers if name not in self.LAYERS]
        if unknown:
            raise ConfigError(f"unknown digits-network layers {unknown}; choose from {', '.join(self.LAYERS)}")
        self.layers = tuple(layers)

    def __call__(self, images):
        if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected a uint8 tensor (N, C, H, W), got {getattr(images, 'dtype', type(images))}")
        if images.shape[1] == 3 and bool((images[:, :1] == images).all()):
            images = images[:, :1]  # grey stored as RGB
        if tuple(images.shape[1:]) != (1, 8, 8):
            raise ConfigError(f"the digits feature network takes 8x8 grey images, got {tuple(images.shape[1:])}; "
                             f"use --features inception (or dinov2) for other data")
        out = {name: [] for name in self.layers}
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            for chunk in images.split(self.batch_size):
                features = self.net(to_input(chunk.to(self.device)))
                for name in self.layers:
                    out[name].append(features[name].float())
        return {name: torch.cat(fs) for name, fs in out.items()}

    def provenance(self):
        return {"name": "digits", "layers": list(self.layers), "weights": str(self.weights_path.resolve()),
                "weights_sha256": self.info["sha256"], "held_out_accuracy": self.info["held_out_accuracy"]}
