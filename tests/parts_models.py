"""Small models shared by several test modules: one that only the "parts" frontend captures (the
find_sites and checkpoint tests), a layer with a functional dropout (tracing, perforated), a root
that writes a buffer fx drops (tracing, checkpoint) and a leaf that reads its layer's attributes
(finalize, ONNX); a layer reshaped to a size given as an input (tracing, signature); a model that returns
an OrderedDict, which fx writes as a plain dict (perforated, finalize)."""
import collections

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


class RunningMean(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.register_buffer("mean", torch.zeros(d))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return x - self.mean


class CountsSteps(nn.Module):
    """A root that counts its calls in a buffer, over a part whose Python branches on the mode: torch.export's
    graph follows one mode, so auto keeps fx's, which drops the count."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc = RunningMean(5), nn.Linear(5, 2)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.steps += 1
        return self.fc(self.norm(x))


class ReadsItsLayer(nn.Module):
    """Kept whole by symbolic tracing (a check on a shape); reads its layer's attributes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        if h.shape[-1] != self.fc.out_features:
            raise ValueError("unexpected width")
        return h + self.fc.weight.shape[0] * torch.ones(3, dtype=self.fc.weight.dtype, device=self.fc.weight.device)


def grown_leaf_reader():
    """(a perforated model holding a ReadsItsLayer leaf, one dendrite per site with V = 0.3, in eval
    mode; its example input)."""
    import pbp_fx

    model, x = nn.Sequential(ReadsItsLayer(), nn.Linear(3, 2)).eval(), torch.randn(5, 4)
    pm = pbp_fx.perforate(model, (x,))
    pm.grow()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if name.endswith("out_weight"):
                p.fill_(0.3)
    return pm.eval(), x


class Reshapes(nn.Module):
    """A Linear whose output is reshaped to a size the caller passes (a tuple constant input)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x, size):
        return self.fc(x).reshape(size)


class OrderedOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return collections.OrderedDict(hidden=h, logits=self.b(h))
