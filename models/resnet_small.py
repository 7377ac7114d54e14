"""A small ResNet for sklearn digits seen as 1x8x8 images.

stem (conv3x3 -> BN -> ReLU) -> 3 BasicBlocks (W, 2W stride 2, 2W)
-> adaptive avg pool -> flatten -> Linear to 10.  Spatial size 8 -> 4.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # as part of the pbp_fx.models package
    from ._data import digits_splits
except ImportError:  # loaded by file path (e.g. a copied template)
    from pbp_fx.models._data import digits_splits

TASK = "classification"
loss_fn = F.cross_entropy


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    # No bias: the BatchNorm right after it has its own shift.
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut, ReLU after the add (He et al., 2016)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            # Projection shortcut when the shape changes; identity otherwise.
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x):
        identity = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Decided when tracing (module structure), not by the data: fx-safe.
        if self.downsample is not None:
            identity = self.downsample(x)
        return F.relu(out + identity)


class ResNetSmall(nn.Module):
    def __init__(self, width: int = 16, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 2 * width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def build_model(width: int = 16, **kw) -> nn.Module:
    return ResNetSmall(width=width, **kw)


def example_inputs() -> tuple:
    return (torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)),)


def datasets(seed: int = 0, num_samples: int | None = None):
    """(train, val, test): 1078 / 359 / 360 images [1, 8, 8] in [0, 1] by default."""
    return digits_splits(seed, num_samples, image=True)
