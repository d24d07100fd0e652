"""Where images come from: an ADM samples.npz, a folder of images, a Dataset, or an array in memory.

Each is an ImageSource: a length and a way to iterate uint8 (N, C, H, W) batches, C = 1 (grey) or 3.
The npz is streamed from its zip member in batches, so 50K 256x256 samples (9.8 GB) never sit in memory
at once. Sidecar JSON files beside samples (written by sample.py) carry the sampling provenance.
"""

import json
import os
import zipfile
from math import prod

import numpy as np
import torch
from utils.errors import ConfigError, MissingFile
from utils.images import to_uint8

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageSource:
    """A sized, re-iterable source of uint8 (N, C, H, W) batches; `name` says where it came from. `labels`: the
    (N,) int64 class labels when the source has them (a samples npz's arr_1, a labelled dataset), else None."""

    def __init__(self, name, length, make_batches, labels=None):
        self.name = name
        self.length = length
        self._make_batches = make_batches  # (batch_size, limit) -> iterator of batches
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)

    def __len__(self):
        return self.length

    def batches(self, batch_size=256, limit=None):
        """Iterate batches covering the first `limit` images (all when None)."""
        if limit is not None and limit > self.length:
            raise ConfigError(f"{self.name}: asked for {limit} images, it has {self.length}")
        return self._make_batches(batch_size, self.length if limit is None else limit)

    # -----------------------------------------------------------------------------------------------------

    @classmethod
    def from_npz(cls, path, key="arr_0"):
        """ADM samples: `arr_0` uint8 (N, H, W, 3) or (N, H, W, 1); streamed, never loaded whole."""
        path = os.fspath(path)
        with _open_npy_member(path, key) as (shape, dtype, _):
            pass
        if len(shape) != 4 or shape[-1] not in (1, 3) or dtype != np.uint8:
            raise ConfigError(f"{path}:{key} must be uint8 (N, H, W, 1 or 3), got {dtype} {shape}")

        def make_batches(batch_size, limit):
            with _open_npy_member(path, key) as (shape, dtype, f):
                per_image = prod(shape[1:])
                for start in range(0, limit, batch_size):
                    n = min(batch_size, limit - start)
                    buf = f.read(n * per_image)
                    x = np.frombuffer(buf, dtype=np.uint8).reshape(n, *shape[1:])
                    yield torch.from_numpy(x.copy()).permute(0, 3, 1, 2)  # NHWC -> NCHW

        with np.load(path) as f:  # the labels are small: (N,) int64
            labels = f["arr_1"] if key == "arr_0" and "arr_1" in f.files else None
        return cls(path, shape[0], make_batches, labels)

    @classmethod
    def from_folder(cls, path):
        """Every image file under `path` (recursively, sorted by relative path), read as RGB by PIL."""
        path = os.fspath(path)
        files = sorted(
            os.path.relpath(os.path.join(root, name), path)
            for root, _, names in os.walk(path) for name in names if name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise MissingFile(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {path}")

        def make_batches(batch_size, limit):
            from PIL import Image

            for start in range(0, limit, batch_size):
                arrays = []
                for name in files[start:start + batch_size][: limit - start]:
                    with Image.open(os.path.join(path, name)) as im:
                        arrays.append(np.asarray(im.convert("RGB")))
                if len({a.shape for a in arrays}) > 1:
                    raise ConfigError(f"{path}: images differ in size; resize/crop them first "
                                     f"(or build reference statistics from a dataset with a transform)")
                yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

        return cls(path, len(files), make_batches)

    @classmethod
    def from_dataset(cls, dataset, num_workers=0, name=None):
        """A torch Dataset of (x, y) or x, with x float (C, H, W) in [-1, 1] (data.build_dataset) or uint8."""

        def make_batches(batch_size, limit):
            subset = dataset if limit == len(dataset) else torch.utils.data.Subset(dataset, range(limit))
            loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers)
            for batch in loader:
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                yield x if x.dtype == torch.uint8 else to_uint8(x)

        labels = getattr(dataset, "labels", None)
        return cls(name or type(dataset).__name__, len(dataset), make_batches,
                   None if labels is None else np.asarray(labels))

    @classmethod
    def from_array(cls, images, name="array", labels=None):
        """uint8 images already in memory, (N, C, H, W) tensor or (N, H, W, C) numpy array (ADM's layout)."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images).permute(0, 3, 1, 2)

        def make_batches(batch_size, limit):
            yield from images[:limit].split(batch_size)

        return cls(name, images.shape[0], make_batches, labels)


def open_source(spec):
    """An ImageSource from a path: an .npz of samples or a folder of images."""
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        return ImageSource.from_folder(spec)
    if spec.endswith(".npz") and os.path.isfile(spec):
        return ImageSource.from_npz(spec)
    raise MissingFile(f"{spec}: expected a samples .npz (ADM format) or a folder of images")


def dataset_source(name, path=None, image_size=None, num_workers=0):
    """An ImageSource over data.build_dataset(name, path=..., image_size=...) (imported only when used)."""
    from data import build_dataset

    dataset = build_dataset(name, path=path, image_size=image_size)
    label = f"data:{name}" + (f":{path}" if path else "")
    return ImageSource.from_dataset(dataset, num_workers=num_workers, name=label)


def read_sidecar(spec):
    """Sampling provenance beside samples: `<name>.json` next to `<name>.npz` (or next to a folder), else
    `provenance.json` in the same folder (or inside the folder). {} when there is none."""
    spec = os.path.abspath(os.fspath(spec))
    stem = spec[:-4] if spec.endswith(".npz") else spec.rstrip(os.sep)
    folder = spec if os.path.isdir(spec) else os.path.dirname(spec)
    for candidate in (stem + ".json", os.path.join(folder, "provenance.json")):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                return json.load(f)
    return {}


# ---------------------------------------------------------------------------------------------------------

class _open_npy_member:
    """Open `key`.npy inside an npz as a stream: yields (shape, dtype, file positioned at the data)."""

    def __init__(self, path, key):
        self.path, self.key = path, key

    def __enter__(self):
        self.zip = zipfile.ZipFile(self.path)
        try:
            self.file = self.zip.open(self.key + ".npy")
        except KeyError:
            self.zip.close()
            raise KeyError(f"{self.path}: no array {self.key!r} in this npz") from None
        version = np.lib.format.read_magic(self.file)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(self.file)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(self.file)
        if fortran_order:
            raise ConfigError(f"{self.path}:{self.key} is stored in Fortran order; resave with np.savez")
        return shape, dtype, self.file

    def __exit__(self, *exc):
        self.file.close()
        self.zip.close()
