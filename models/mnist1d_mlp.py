"""MNIST-1D MLP (Greydanus, 2020): 40 -> W -> W -> 10 with ReLU."""

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # as part of the pbp_fx.models package
    from ._data import mnist1d_splits
except ImportError:  # loaded by file path (e.g. a copied template)
    from pbp_fx.models._data import mnist1d_splits

TASK = "classification"
loss_fn = F.cross_entropy


class MLP(nn.Module):
    def __init__(self, width: int = 32, in_features: int = 40, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, num_classes)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def build_model(width: int = 32, **kw) -> nn.Module:
    return MLP(width=width, **kw)


def example_inputs() -> tuple:
    # A private generator keeps the global RNG untouched and the inputs repeatable.
    return (torch.randn(4, 40, generator=torch.Generator().manual_seed(0)),)


def datasets(seed: int = 0, num_samples: int | None = None):
    """(train, val, test): 3200 / 800 / 1000 samples of x [40] by default."""
    return mnist1d_splits(seed, num_samples or 5000)
