"""Offline datasets shared by the reference models: MNIST-1D and sklearn digits.

Nothing here downloads anything: MNIST-1D is generated locally with
``mnist1d.data.make_dataset`` and sklearn's digits ship with scikit-learn.
Generated arrays are cached in-process because ``make_dataset`` takes about a
second for 5000 samples; every call still returns fresh tensors, so callers
may modify what they get without corrupting the cache.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import torch
from torch.utils.data import TensorDataset

MNIST1D_SAMPLES = 5000  # mnist1d's default: 4000 train + 1000 test
VAL_FRACTION = 0.2  # the last 20% of mnist1d's train part becomes validation


@functools.lru_cache(maxsize=8)
def _mnist1d_arrays(seed: int, num_samples: int):
    # Imported lazily so digits-only users do not need mnist1d installed.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed % 2**32  # (numpy's seed range; TrainConfig takes seeds up to 2**63 - 1)
    # make_dataset reseeds the global `random` and NumPy RNGs; restore them so
    # building data never changes the caller's random streams.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)  # generated locally (mnist1d's other loader downloads)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return data["x"], data["y"], data["x_test"], data["y_test"]


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(
        torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)
    )


def mnist1d_splits(seed: int = 0, num_samples: int = MNIST1D_SAMPLES):
    """MNIST-1D as (train, val, test) TensorDatasets of x [N, 40] float32, y [N] int64.

    mnist1d generates ``num_samples // 10`` samples per class and splits them
    80/20 into train/test; the last 20% of train becomes val.  The default
    5000 samples give 3200 / 800 / 1000.  Inputs are standardized with the
    train split's scalar mean and std (one scalar, not per position, so the
    signal's shape, which the CNN relies on, is left intact).
    """
    if num_samples < 10:
        raise ValueError(f"num_samples must be >= 10 (one per class), got {num_samples}")
    x, y, x_test, y_test = _mnist1d_arrays(int(seed), int(num_samples))
    n_val = int(len(x) * VAL_FRACTION)
    n_train = len(x) - n_val
    mean, std = x[:n_train].mean(), x[:n_train].std()
    scale = lambda a: (a - mean) / std  # noqa: E731
    return (
        _tensors(scale(x[:n_train]), y[:n_train]),
        _tensors(scale(x[n_train:]), y[n_train:]),
        _tensors(scale(x_test), y_test),
    )


@functools.lru_cache(maxsize=1)
def _digits_arrays():
    from sklearn.datasets import load_digits

    digits = load_digits()  # bundled with scikit-learn, no network
    return digits.data / 16.0, digits.target  # pixel values are 0..16


def digits_splits(seed: int = 0, num_samples: int | None = None, image: bool = False):
    """sklearn digits as (train, val, test) TensorDatasets, split 60/20/20.

    x is float32 in [0, 1], shaped [N, 64] or, with ``image=True``,
    [N, 1, 8, 8]; y is int64.  The 1797 samples are shuffled with ``seed``
    (1078 / 359 / 360 at the default size); ``num_samples`` keeps only the
    first samples of that shuffle.
    """
    x, y = _digits_arrays()
    order = np.random.default_rng(seed).permutation(len(y))
    if num_samples is not None:
        if num_samples < 5:
            raise ValueError(f"num_samples must be >= 5, got {num_samples}")
        order = order[:num_samples]
    x, y = x[order], y[order]
    if image:
        x = x.reshape(-1, 1, 8, 8)
    n_train, n_val = int(len(y) * 0.6), int(len(y) * 0.2)
    return (
        _tensors(x[:n_train], y[:n_train]),
        _tensors(x[n_train : n_train + n_val], y[n_train : n_train + n_val]),
        _tensors(x[n_train + n_val :], y[n_train + n_val :]),
    )


def clear_cache() -> None:
    """Drop cached arrays (tests use it to check that generation is deterministic)."""
    _mnist1d_arrays.cache_clear()
    _digits_arrays.cache_clear()
