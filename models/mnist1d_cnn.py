"""MNIST-1D 1-D CNN (Greydanus, 2020), with a BatchNorm after every conv.

[B, 40] -> [B, 1, 40] -> 3 x (Conv1d k=5 s=2 p=1 -> BatchNorm1d -> ReLU)
-> flatten -> Linear to 10.  Lengths go 40 -> 19 -> 9 -> 4.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # as part of the pbp_fx.models package
    from ._data import mnist1d_splits
except ImportError:  # loaded by file path (e.g. a copied template)
    from pbp_fx.models._data import mnist1d_splits

TASK = "classification"
loss_fn = F.cross_entropy


def _conv_out_len(length: int, kernel: int = 5, stride: int = 2, padding: int = 1) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class ConvNet(nn.Module):
    def __init__(self, width: int = 32, length: int = 40, num_classes: int = 10):
        super().__init__()
        # Convs keep their bias (as in the original) even though BN follows:
        # the ResNet covers the bias-free conv+BN case.
        self.conv1 = nn.Conv1d(1, width, 5, stride=2, padding=1)
        self.bn1 = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, width, 5, stride=2, padding=1)
        self.bn2 = nn.BatchNorm1d(width)
        self.conv3 = nn.Conv1d(width, width, 5, stride=2, padding=1)
        self.bn3 = nn.BatchNorm1d(width)
        self.relu = nn.ReLU()
        out_len = _conv_out_len(_conv_out_len(_conv_out_len(length)))
        self.fc = nn.Linear(width * out_len, num_classes)

    def forward(self, x):
        x = x.unsqueeze(1)  # [B, L] -> [B, 1, L]: one input channel
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(x, 1))


def build_model(width: int = 32, **kw) -> nn.Module:
    return ConvNet(width=width, **kw)


def example_inputs() -> tuple:
    return (torch.randn(4, 40, generator=torch.Generator().manual_seed(0)),)


def datasets(seed: int = 0, num_samples: int | None = None):
    """(train, val, test): 3200 / 800 / 1000 samples of x [40] by default."""
    return mnist1d_splits(seed, num_samples or 5000)
