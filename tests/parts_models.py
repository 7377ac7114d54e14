"""A model that only the "parts" frontend captures (shared by the find_sites and checkpoint tests)."""
import torch
import torch.nn.functional as F
from torch import nn


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Linear(4, 4)
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return F.relu(F.linear(self.b(x), self.weight))


class BranchingRoot(nn.Module):
    """Data-dependent Python at the root: only its submodules trace; part `a` is itself a layer."""

    def __init__(self):
        super().__init__()
        self.a, self.gate, self.head = nn.Linear(4, 4), Gate(), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.sum() > 0:
            h = self.gate(h)
        return self.head(h)
