"""Every reference model in models/ honours the model.py contract and traces with torch.fx."""

import importlib
from pathlib import Path

import pytest
import torch
import torch.fx
from torch.utils.data import Dataset

from pbp_fx.models import _data

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
MODEL_NAMES = sorted(p.stem for p in MODELS_DIR.glob("*.py") if not p.stem.startswith("_"))

# Documented default (train, val, test) sizes; models added later without an
# entry here still get every other check.
DEFAULT_SIZES = {
    "mnist1d_mlp": (3200, 800, 1000),
    "mnist1d_cnn": (3200, 800, 1000),
    "tiny_transformer": (3200, 800, 1000),
    "digits_mlp": (1078, 359, 360),
    "resnet_small": (1078, 359, 360),
}
SMALL = 200  # num_samples for the cheap checks


def load(name):
    return importlib.import_module(f"pbp_fx.models.{name}")


def stacked(ds):
    """(x, y) of a whole Dataset, without assuming it is a TensorDataset."""
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.stack(ys)


def test_models_found():
    assert set(DEFAULT_SIZES) <= set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_contract(name):
    mod = load(name)
    for fn in ("build_model", "example_inputs", "datasets"):
        assert callable(getattr(mod, fn, None)), f"{name} lacks {fn}()"
    assert callable(getattr(mod, "loss_fn", torch.nn.functional.cross_entropy))
    assert getattr(mod, "TASK", "classification") == "classification"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_and_trace(name):
    mod = load(name)
    torch.manual_seed(0)
    model = mod.build_model().eval()
    inputs = mod.example_inputs()
    assert isinstance(inputs, tuple) and all(isinstance(t, torch.Tensor) for t in inputs)
    with torch.no_grad():
        out = model(*inputs)
        traced = torch.fx.symbolic_trace(model)
        out_traced = traced(*inputs)
    assert out.shape == (inputs[0].shape[0], 10)
    assert (out - out_traced).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_narrow_width_trains(name):
    mod = load(name)
    torch.manual_seed(0)
    model = mod.build_model(width=4)
    (x,) = mod.example_inputs()
    loss_fn = getattr(mod, "loss_fn", torch.nn.functional.cross_entropy)
    loss = loss_fn(model(x), torch.arange(x.shape[0]) % 10)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_datasets_small_and_deterministic(name):
    mod = load(name)
    splits = mod.datasets(seed=0, num_samples=SMALL)
    assert len(splits) == 3
    assert all(isinstance(ds, Dataset) and len(ds) > 0 for ds in splits)
    assert sum(len(ds) for ds in splits) == SMALL

    (example,) = mod.example_inputs()
    for ds in splits:
        x, y = ds[0]
        assert x.dtype == torch.float32 and x.shape == example.shape[1:]
        assert y.dtype == torch.int64 and 0 <= int(y) < 10

    # The dataset feeds the model directly.
    x = torch.stack([splits[0][i][0] for i in range(4)])
    assert mod.build_model().eval()(x).shape == (4, 10)

    # Same seed, same data even when regenerated from scratch; other seed, other data.
    _data.clear_cache()
    again = mod.datasets(seed=0, num_samples=SMALL)
    other = mod.datasets(seed=1, num_samples=SMALL)
    for ds, ds_again, ds_other in zip(splits, again, other):
        a, b, c = stacked(ds), stacked(ds_again), stacked(ds_other)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("name", sorted(DEFAULT_SIZES))
def test_default_split_sizes(name):
    # Full size generation is cached in-process, so the three MNIST-1D models share one build.
    splits = load(name).datasets()
    assert tuple(len(ds) for ds in splits) == DEFAULT_SIZES[name]
    x_train = stacked(splits[0])[0]
    if x_train.shape[-1] == 40:  # MNIST-1D: standardized with train statistics
        assert abs(x_train.mean().item()) < 1e-4 and abs(x_train.std().item() - 1) < 1e-3
    else:  # digits: pixels scaled to [0, 1]
        assert x_train.min().item() >= 0 and x_train.max().item() <= 1


def test_mnist1d_data_takes_every_seed_train_accepts():
    """TrainConfig takes seeds up to 2**63 - 1; mnist1d's generator only below 2**32 (a ValueError midway)."""
    big = _data.mnist1d_splits(seed=2**32 + 5, num_samples=200)
    same = _data.mnist1d_splits(seed=5, num_samples=200)
    assert torch.equal(big[0][0][0], same[0][0][0])
    assert len(_data.mnist1d_splits(seed=2**63 - 1, num_samples=200)[0]) > 0
