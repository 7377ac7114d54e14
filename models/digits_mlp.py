"""sklearn digits MLP: 64 -> W -> W -> 10 with ReLU (default W=8, deliberately narrow)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # as part of the pbp_fx.models package
    from ._data import digits_splits
except ImportError:  # loaded by file path (e.g. a copied template)
    from pbp_fx.models._data import digits_splits

TASK = "classification"
loss_fn = F.cross_entropy


class MLP(nn.Module):
    def __init__(self, width: int = 8, in_features: int = 64, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, num_classes)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def build_model(width: int = 8, **kw) -> nn.Module:
    """Default width 8 leaves room for dendrites to help; pass e.g. width=64 for a wide baseline."""
    return MLP(width=width, **kw)


def example_inputs() -> tuple:
    return (torch.rand(4, 64, generator=torch.Generator().manual_seed(0)),)


def datasets(seed: int = 0, num_samples: int | None = None):
    """(train, val, test): 1078 / 359 / 360 samples of x [64] in [0, 1] by default."""
    return digits_splits(seed, num_samples)
