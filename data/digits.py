"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes): the offline default dataset."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import Dataset


class DigitsDataset(Dataset):
    """Grey 1x8x8 digits scaled from the 17 grey levels 0..16 to [-1, 1]; labels 0..9.

    The whole set is 460 KB, so it lives in memory as two tensors (`images`, `labels`) that the training
    loop indexes directly, without a DataLoader.
    """

    num_classes = 10
    channels = 1
    image_size = 8

    def __init__(self):
        digits = load_digits()
        self.images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16 * 2 - 1  # (1797, 1, 8, 8)
        self.labels = torch.tensor(digits.target, dtype=torch.long)                               # (1797,)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def heldout_indices(self):
        """The indices of the digits judge's held-out split (evaluation/digits.py: sklearn's train_test_split with
        test_size=0.3, random_state=0, stratified; 540 images, in that split's order). Training still uses all 1797
        images: these are a fixed evaluation set, not disjoint from the training data."""
        from sklearn.model_selection import train_test_split
        _, test = train_test_split(np.arange(len(self.labels)), test_size=0.3, random_state=0,
                                   stratify=self.labels.numpy())
        return test
