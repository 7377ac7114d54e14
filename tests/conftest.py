"""Shared test helpers: the session fixture `pb` with max_diff, randomize (V, U) and warm (BatchNorm stats)."""
from types import SimpleNamespace

import pytest
import torch

# xdist runs one process per core: torch's default intra-op threads then spin against each
# other and small convolutions get ~100x slower. One thread per test process is plenty here.
torch.set_num_threads(1)


def max_diff(a, b) -> float:
    """Max abs difference of two tensors (or nested tuples/lists of tensors)."""
    if isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b)
        return max((max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def randomize(pm, scale: float = 1.0, seed: int = 0) -> None:
    """Give every installed dendrite nonzero random V and cascade weights U."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in pm.sites.values():
            for t in (s.out_weight, s.cascade):
                if t is not None:
                    t.copy_(scale * torch.randn(t.shape, generator=g, dtype=torch.float64))


def warm(model, inputs, steps: int = 3) -> None:
    """A few train-mode forwards on perturbed inputs so that BatchNorm statistics are non-trivial."""
    was = model.training
    model.train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(steps):
            model(*[x + torch.randn(x.shape, generator=g, dtype=x.dtype) if x.is_floating_point() else x
                    for x in inputs])
    model.train(was)


@pytest.fixture(scope="session")
def pb():
    return SimpleNamespace(max_diff=max_diff, randomize=randomize, warm=warm)


@pytest.fixture
def seeded():
    """torch.manual_seed(0) before the test (opt in: `pytestmark = pytest.mark.usefixtures("seeded")`)."""
    torch.manual_seed(0)
