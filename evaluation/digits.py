"""A feature network for the bundled 8x8 digits: FID, precision/recall, IS and class accuracy on any machine.

Inception needs a 100 MB weights file a fresh or offline machine does not have, and it sees an 8x8 digit as a
blurred 299x299 picture. This small convolutional classifier of scikit-learn's digits is trained in seconds on a
fixed split, deterministically, and its weights ship with the repository (evaluation/weights/digits_net.pt,
with their SHA-256), so every run on every machine measures with the same network:

    conv 3x3 1->32, ReLU                 8x8
    conv 3x3 32->64, ReLU, max-pool 2    4x4
    conv 3x3 64->128, ReLU               4x4    <- `spatial`: a 4x4 grid of 128-d features (DiT-Mini/2's tokens)
    global average pool                  128    <- `pool`: the features of Frechet distance and precision/recall
    linear 128->10                       10     <- `logits`: Inception Score and the class-accuracy score

`python -m evaluation train-digits` retrains it (same seed, same split: the same weights on this CPU type and torch
version) and rewrites the file. The split is the digits judge's (benchmarks/digits_quality.py): 70% train, 30%
held out, stratified, random_state 0; reference statistics are those of the train split, and the distance of the
held-out digits to them is the floor every score is reported beside.
"""

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from utils.errors import ConfigError, MissingFile

WEIGHTS = Path(__file__).resolve().parent / "weights" / "digits_net.pt"
SEED = 0
EPOCHS = 60
BATCH = 64
LR = 2e-3


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


def digits_split():
    """(x_train, y_train, x_test, y_test): the bundled digits as uint8 (N, 1, 8, 8) tensors (0..16 mapped to
    0..255 as data/digits.py does) and int64 labels, split as the digits judge splits them."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images / 16 * 255).astype(np.uint8)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(images, digits.target, test_size=0.3, random_state=0,
                                                        stratify=digits.target)
    return (torch.from_numpy(x_train), torch.from_numpy(y_train).long(), torch.from_numpy(x_test),
            torch.from_numpy(y_test).long())


def digits_source(split="train"):
    """The real digits of one split ("train", "heldout" or "all") as a labelled ImageSource of uint8 images."""
    from .inputs import ImageSource
    x_train, y_train, x_test, y_test = digits_split()
    x, y = {"train": (x_train, y_train), "heldout": (x_test, y_test),
            "all": (torch.cat([x_train, x_test]), torch.cat([y_train, y_test]))}[split]
    return ImageSource.from_array(x, name=f"digits:{split}", labels=y.numpy())


def to_input(images):
    """uint8 (N, 1, 8, 8) -> float in [-1, 1], the network's input (and the generators' data range)."""
    return images.float() / 127.5 - 1


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
        from tqdm.auto import tqdm
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


def state_sha256(state_dict):
    """SHA-256 of a state dict's tensors (names, shapes, dtypes and bytes, in key order): the network's identity."""
    h = hashlib.sha256()
    for name, tensor in state_dict.items():
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return payload


def load_digits_net(path=None):
    """(network, info) from the shipped weights (or `path`); the stored hash is checked."""
    path = Path(path) if path is not None else WEIGHTS
    if not path.is_file():
        raise MissingFile(f"the digits feature network's weights {path} are missing; regenerate them with "
                                f"`python -m evaluation train-digits` (seconds on a CPU)")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if state_sha256(payload["state_dict"]) != payload["sha256"]:
        raise ConfigError(f"{path} does not match its recorded SHA-256 (a damaged file); regenerate it with "
                         f"`python -m evaluation train-digits`")
    net = DigitsNet()
    net.load_state_dict(payload["state_dict"])
    return net.eval().requires_grad_(False), {k: v for k, v in payload.items() if k != "state_dict"}


class DigitsFeatures:
    """The digits network as a feature extractor with InceptionFeatures' interface: call it on uint8
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

    def iterate(self, batches, total=None, progress=True, desc="digits features"):
        from tqdm.auto import tqdm
        with tqdm(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
            for images in batches:
                yield self(images)
                bar.update(images.shape[0])

    def provenance(self):
        return {"name": "digits", "layers": list(self.layers), "weights": str(self.weights_path.resolve()),
                "weights_sha256": self.info["sha256"], "held_out_accuracy": self.info["held_out_accuracy"]}


def cache_dir():
    """Where built reference statistics are cached: $DIT_CACHE, else ~/.cache/dit-research."""
    return Path(os.environ.get("DIT_CACHE") or Path.home() / ".cache" / "dit-research")


def digits_reference(folder=None):
    """Path of the train-split reference statistics in the shipped digits network's features, built on first use
    (a second) and cached under a name carrying the weights' hash, so a retrained network never meets stale ones."""
    from .evaluator import build_reference

    _, info = load_digits_net()
    path = Path(folder or cache_dir()) / f"digits-train-{info['sha256'][:12]}.npz"
    if not path.is_file():
        build_reference(digits_source("train"), path, features="digits", progress=False)
    return path


def digits_floor(reference=None):
    """What real digits score: FD and class accuracy of the held-out split against the train-split reference, the
    floor to read every generator's number against."""
    from .evaluator import evaluate

    result = evaluate(digits_source("heldout"), reference or digits_reference(), features="digits", progress=False)
    return {"fid": result["fid"], "class_accuracy": result["class_accuracy"], "num_samples": result["num_samples"]}
