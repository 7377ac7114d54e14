"""A model whose forward freezes its feature layer under torch.no_grad (shared by the width and explain tests)."""
import torch
from torch import nn


class FrozenByNoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.feat, self.head = nn.Linear(8, 4), nn.Linear(4, 3)

    def forward(self, x):
        with torch.no_grad():
            h = torch.relu(self.feat(x))
        return self.head(h)
