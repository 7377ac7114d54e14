"""Small models shared by several test modules: one that only the "parts" frontend captures (the
find_sites and checkpoint tests), and a layer with a functional dropout (tracing, perforated)."""
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


class FunctionalDropout(nn.Module):
    """A Linear followed by F.dropout on self.training: mode-dependent code in the graph."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.l = nn.Linear(width, width)

    def forward(self, x):
        return F.dropout(self.l(x), 0.5, self.training)
