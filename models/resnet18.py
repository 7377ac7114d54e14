"""ResNet-18 in the layout torchvision uses (module names conv1/bn1/layer1..4/fc, BasicBlock
with conv1/bn1/conv2/bn2/downsample), written here because torchvision has no CPU build in
this environment. No pretrained weights: a random initialisation only.

stem: conv7x7/2 -> BN -> ReLU -> maxpool3x3/2; four stages of two BasicBlocks at widths
W, 2W, 4W, 8W (stride 2 from the second stage on, 1x1 conv + BN projection shortcuts);
adaptive average pool -> Linear. W = 64 gives the 11.7M-parameter ImageNet model.

Data (offline): sklearn digits, each 8x8 image upsampled to 32x32 and repeated over 3 channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

try:  # as part of the pbp_fx.models package
    from ._data import digits_splits
except ImportError:  # loaded by file path (e.g. a copied template)
    from pbp_fx.models._data import digits_splits

TASK = "classification"
loss_fn = F.cross_entropy


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + shortcut)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000, width: int = 64, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths = [width, 2 * width, 4 * width, 8 * width]
        stages, in_ch = [], width
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(in_ch, w, stride), BasicBlock(w, w)))
            in_ch = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(num_classes: int = 10, width: int = 64, **kw) -> nn.Module:
    return ResNet18(num_classes=num_classes, width=width, **kw)


def example_inputs() -> tuple:
    return (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)


def _rgb32(ds: TensorDataset) -> TensorDataset:
    x, y = ds.tensors
    return TensorDataset(F.interpolate(x, size=(32, 32), mode="nearest").repeat(1, 3, 1, 1), y)


def datasets(seed: int = 0, num_samples: int | None = None):
    """(train, val, test): 1078 / 359 / 360 digit images [3, 32, 32] in [0, 1] by default."""
    return tuple(_rgb32(ds) for ds in digits_splits(seed, num_samples, image=True))
