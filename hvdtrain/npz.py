"""A user's `--data FILE.npz`, checked from its headers before anything starts (numpy only, no torch).

The arrays' shapes and dtypes come from each member's .npy header, so a large `x` is not read; only the labels
are (to check their range). hvdtrain.train.datasets.npz checks the same way before it loads the file.
"""

from __future__ import annotations

import dataclasses
import zipfile
from typing import Optional

from hvdtrain.errors import ConfigError

SAVE_HINT = "save them with np.savez(path, x=..., y=...)"


@dataclasses.dataclass(frozen=True)
class NpzInfo:
    samples: int  # rows of x
    input_shape: tuple[int, ...]  # one sample's shape
    num_classes: int  # largest label + 1
    has_test: bool  # x_test and y_test given (else a fixed split of x, y)
    test_samples: int  # rows of x_test, or of the split's test part

    @property
    def train_samples(self) -> int:
        return self.samples if self.has_test else self.samples - self.test_samples


def split_test_size(samples: int, test_fraction: float = 0.2) -> int:
    """How many of `samples` rows the fixed split holds out for testing (datasets.npz uses the same)."""
    return max(1, int(samples * test_fraction))


def _header(archive: zipfile.ZipFile, name: str, path: str):
    import numpy as np

    try:
        with archive.open(f"{name}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _fortran, dtype = read(f)
    except KeyError:
        raise ConfigError(f"--data {path}: no array '{name}' in the file; {SAVE_HINT}") from None
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise ConfigError(f"--data {path}: array '{name}' is unreadable ({e}); {SAVE_HINT}") from None
    if dtype.hasobject:
        raise ConfigError(
            f"--data {path}: array '{name}' holds Python objects, which hvdtrain does not unpickle; save numbers"
        )
    return tuple(shape), dtype


def _labels(archive: zipfile.ZipFile, name: str, path: str, rows: int, shape, dtype):
    import numpy as np

    if len(shape) != 1 or shape[0] != rows or not np.issubdtype(dtype, np.integer):
        raise ConfigError(
            f"--data {path}: '{name}' must be one integer label per row of its inputs ({rows} rows; '{name}' has "
            f"shape {shape}, dtype {dtype})"
        )
    with archive.open(f"{name}.npy") as f:
        y = np.lib.format.read_array(f, allow_pickle=False)
    if len(y) and y.min() < 0:
        raise ConfigError(f"--data {path}: '{name}' has a negative label ({y.min()}); labels are 0 .. classes-1")
    return int(y.max()) + 1 if len(y) else 0


def check(path: str, test_fraction: float = 0.2) -> NpzInfo:
    """Read and check the file's arrays (x, y; optional x_test, y_test) from their headers; ConfigError naming
    the problem otherwise."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ConfigError(f"--data {path}: not an .npz archive ({e}); {SAVE_HINT}") from None
    with archive:
        names = {n.removesuffix(".npy") for n in archive.namelist()}
        for name in ("x", "y"):
            if name not in names:
                raise ConfigError(f"--data {path}: no array '{name}' in the file (it has {sorted(names)}); {SAVE_HINT}")
        if ("x_test" in names) != ("y_test" in names):
            raise ConfigError(f"--data {path}: give both x_test and y_test, or neither (a split of x, y is used)")
        x_shape, _ = _header(archive, "x", path)
        if len(x_shape) < 2 or x_shape[0] < 2:
            raise ConfigError(
                f"--data {path}: 'x' must hold at least 2 samples of at least one feature, has shape {x_shape}"
            )
        classes = _labels(archive, "y", path, x_shape[0], *_header(archive, "y", path))
        has_test = "x_test" in names
        test_samples: Optional[int] = None
        if has_test:
            t_shape, _ = _header(archive, "x_test", path)
            if t_shape[1:] != x_shape[1:] or t_shape[0] < 1:
                raise ConfigError(
                    f"--data {path}: 'x_test' must hold samples shaped like those of 'x' ({x_shape[1:]}), has {t_shape}"
                )
            test_samples = t_shape[0]
            classes = max(classes, _labels(archive, "y_test", path, t_shape[0], *_header(archive, "y_test", path)))
    if classes < 2:
        raise ConfigError(f"--data {path}: the labels hold a single class; a classifier needs at least 2")
    return NpzInfo(
        samples=x_shape[0],
        input_shape=x_shape[1:],
        num_classes=classes,
        has_test=has_test,
        test_samples=test_samples if test_samples is not None else split_test_size(x_shape[0], test_fraction),
    )
