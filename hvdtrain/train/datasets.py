"""Datasets: scikit-learn's digits (ships inside scikit-learn, no download), synthetic, or a user's .npz.

Every loader returns (train, test) as TensorDatasets of float32 features and int64 labels, the same on
every rank (sharding happens in the sampler), plus the input shape and number of classes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from hvdtrain.npz import check as check_npz


@dataclasses.dataclass
class Dataset:
    train: TensorDataset
    test: TensorDataset
    input_shape: tuple[int, ...]
    num_classes: int


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))
    )


def digits() -> Dataset:
    """8x8 handwritten digits (1797 images, 10 classes), a fixed stratified split (80/20), pixels scaled to [0, 1].
    Read from the file scikit-learn ships (what its load_digits reads) without importing scikit-learn, which would
    cost every rank about a second of its start-up; the split is digits_split's (scikit-learn's train_test_split,
    stored)."""
    import base64
    import importlib.util

    from hvdtrain.train import digits_split

    found = importlib.util.find_spec("sklearn")  # finds the package without running it
    if found is None or not found.submodule_search_locations:
        raise ImportError("the digits dataset ships with scikit-learn: pip install scikit-learn")
    table = np.loadtxt(Path(found.submodule_search_locations[0], "datasets", "data", "digits.csv.gz"), delimiter=",")
    images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    x = (images / 16.0).astype(np.float32)[:, None, :, :]  # N x 1 x 8 x 8
    order = np.frombuffer(base64.b64decode("".join(digits_split.ORDER)), dtype="<u2").astype(np.int64)
    train, test = order[: digits_split.TRAIN], order[digits_split.TRAIN :]
    return Dataset(_tensors(x[train], target[train]), _tensors(x[test], target[test]), (1, 8, 8), 10)


def synthetic(samples: int, input_shape=(1, 8, 8), num_classes: int = 10, seed: int = 0) -> Dataset:
    """Random inputs with labels from a fixed random linear teacher, so there is something to learn."""
    g = np.random.default_rng(seed)
    n_test = max(1, samples // 8)
    x = g.standard_normal((samples + n_test, *input_shape)).astype(np.float32)
    teacher = g.standard_normal((int(np.prod(input_shape)), num_classes)).astype(np.float32)
    y = (x.reshape(len(x), -1) @ teacher).argmax(1)
    return Dataset(
        _tensors(x[:samples], y[:samples]), _tensors(x[samples:], y[samples:]), tuple(input_shape), num_classes
    )


def npz(path: str, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """A user's arrays: `x` (N x ...) and integer `y` (N); `x_test`/`y_test` if given, else a fixed split.
    Checked from the file's headers first (hvdtrain.npz.check, as the launching side does)."""
    info = check_npz(path, test_fraction)
    arrays = np.load(Path(path), allow_pickle=False)
    x, y = arrays["x"], arrays["y"]
    if info.has_test:
        x_tr, y_tr, x_te, y_te = x, y, arrays["x_test"], arrays["y_test"]
    else:
        order = np.random.default_rng(split_seed).permutation(len(x))
        n_test = info.test_samples
        x_tr, y_tr, x_te, y_te = x[order[n_test:]], y[order[n_test:]], x[order[:n_test]], y[order[:n_test]]
    return Dataset(_tensors(x_tr, y_tr), _tensors(x_te, y_te), info.input_shape, info.num_classes)


def load(name: str, synthetic_samples: int = 2048, seed: int = 0) -> Dataset:
    if name == "digits":
        return digits()
    if name == "synthetic":
        return synthetic(synthetic_samples, seed=seed)
    return npz(name)
