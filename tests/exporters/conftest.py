"""Tiny models and cached exports shared by the exporter tests.

Exports are the slow part (about a second each), so every (case, K, fused) file is
exported once per test process and reused by the tests that read it.
"""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pbp_fx
from pbp_fx.exporters import export_onnx, ort_session, run

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
REFERENCE_MODELS = ["mnist1d_mlp", "mnist1d_cnn", "digits_mlp", "resnet_small", "tiny_transformer"]
ATOL = 1e-4


# -- tiny models: each covers one kind of site ---------------------------------------------

class LinearMLP(nn.Module):  # Linear on [B, C]
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TokenMLP(nn.Module):  # Linear on [B, T, C]
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(6, 12), nn.Linear(12, 5)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Conv1dBN(nn.Module):  # Conv1d + BN, 'same' padding with an odd total (asymmetric pads)
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(2, 6, 3, stride=2, padding=1), nn.BatchNorm1d(6)
        self.conv2, self.bn2 = nn.Conv1d(6, 6, 4, padding="same", bias=False), nn.BatchNorm1d(6)
        self.fc = nn.Linear(6 * 8, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


class Conv2dResidual(nn.Module):  # Conv2d + BN (bias-free) with a residual add
    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = torch.relu(x + y)
        return self.fc(x.mean((2, 3)))


class GroupedConv(nn.Module):  # grouped, depthwise (strided, reflect-padded) and a 3-D conv
    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, padding_mode="reflect")
        self.vol = nn.Conv3d(8, 4, (1, 2, 2), dilation=(1, 2, 1))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.depthwise(torch.relu(self.grouped(x))))
        x = self.vol(x.unsqueeze(2))
        return self.fc(x.mean((2, 3, 4)))


class BiasFree(nn.Module):  # bias-free Linears: the fused op has no B_cat input
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 10, bias=False), nn.Linear(10, 3, bias=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class FunctionalLinear(nn.Module):  # F.linear with parameter weights
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(10, 8) * 0.3)
        self.b1 = nn.Parameter(torch.randn(10) * 0.1)
        self.w2 = nn.Parameter(torch.randn(3, 10) * 0.3)

    def forward(self, x):
        return F.linear(torch.relu(F.linear(x, self.w1, self.b1)), self.w2)


class _ShapeBranch(nn.Module):  # not fx-traceable (branches on a shape): a leaf site
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[-1] == 8:
            return torch.relu(self.fc(x))
        return x


class WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.head = _ShapeBranch(), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.block(x))


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape) * 100 + shape[-1]))


CASES = {
    "linear_2d": (LinearMLP, lambda b: _randn(b, 8)),
    "linear_3d": (TokenMLP, lambda b: _randn(b, 3, 6)),
    "conv1d_bn": (Conv1dBN, lambda b: _randn(b, 2, 16)),
    "conv2d_residual": (Conv2dResidual, lambda b: _randn(b, 3, 6, 6)),
    "grouped_depthwise": (GroupedConv, lambda b: _randn(b, 4, 10, 10)),
    "bias_free_linear": (BiasFree, lambda b: _randn(b, 8)),
    "functional_linear": (FunctionalLinear, lambda b: _randn(b, 8)),
    "leaf_site": (WithLeaf, lambda b: _randn(b, 8)),
}


def perforated(model: nn.Module, inputs: tuple, ks, seed: int = 0, activation: str = "sigmoid"):
    """perforate(model), K dendrites per site (an int, or a list in site order), random U
    and V so the dendrites matter, two training forwards for non-trivial BN statistics."""
    torch.manual_seed(seed)
    pm = pbp_fx.perforate(model, inputs, activation=activation)
    sites = list(pm.sites.values())
    ks = [ks] * len(sites) if isinstance(ks, int) else list(ks)
    assert len(ks) == len(sites), f"{len(sites)} sites, K given for {len(ks)}"
    for site, k in zip(sites, ks):
        for _ in range(k):
            site.grow()
    with torch.no_grad():
        for site in sites:
            if site.num_dendrites:
                site.out_weight.normal_(0.0, 0.5)
                site.cascade.normal_(0.0, 0.5)
        pm.train()
        for _ in range(2):
            pm(*(t.repeat(2, *([1] * (t.dim() - 1))) + 0.1 * torch.randn_like(t.repeat(2, *([1] * (t.dim() - 1))))
                 for t in inputs))
    return pm.eval()


def plain_twin(plain: nn.Module, pm) -> nn.Module:
    """A copy of the unperforated model holding pm's neuron state (e.g. its BN statistics)."""
    state = {k.replace(".neuron.", "."): v for k, v in pm.graph_module.state_dict().items()
             if not k.startswith("pbp_sites.") and ".site." not in k}
    twin = copy.deepcopy(plain)
    twin.load_state_dict(state, strict=True)
    return twin.eval()


def torch_out(model: nn.Module, inputs: tuple) -> np.ndarray:
    with torch.no_grad():
        return model(*inputs).numpy()


class Exports:
    """Builds (and caches) perforated models and their exported files for one process."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._models: dict = {}
        self._files: dict = {}
        self._sessions: dict = {}

    def model(self, case: str, ks=2):
        key = (case, ks if isinstance(ks, int) else tuple(ks))
        if key not in self._models:
            build, make_input = CASES[case]
            torch.manual_seed(0)
            plain = build().eval()
            example = (make_input(4),)
            pm = perforated(plain, example, ks)
            self._models[key] = (plain_twin(plain, pm), pm, example, make_input)
        return self._models[key]

    def file(self, case: str, ks=2, fused: bool = True) -> Path:
        key = (case, ks if isinstance(ks, int) else tuple(ks), fused)
        if key not in self._files:
            _, pm, example, _ = self.model(case, ks)
            name = f"{case}_k{'-'.join(map(str, key[1])) if isinstance(key[1], tuple) else key[1]}_{'fused' if fused else 'plain'}.onnx"
            self._files[key] = Path(export_onnx(pm, example, self.folder / name, fused=fused))
        return self._files[key]

    def session(self, path: Path):
        if path not in self._sessions:
            self._sessions[path] = ort_session(path, device="cpu", threads=1)
        return self._sessions[path]

    def ort(self, path: Path, inputs: tuple) -> np.ndarray:
        return run(self.session(path), tuple(t.numpy() for t in inputs))[0]


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="session")
def helpers():
    return SimpleNamespace(perforated=perforated, torch_out=torch_out, cases=CASES, atol=ATOL,
                           models_dir=MODELS_DIR, reference_models=REFERENCE_MODELS,
                           load_reference=load_reference)


def load_reference(name: str):
    """The module models/<name>.py, or None when that file does not exist (yet)."""
    path = MODELS_DIR / f"{name}.py"
    if not path.exists():
        return None
    try:
        return importlib.import_module(f"pbp_fx.models.{name}")
    except ImportError:
        spec = importlib.util.spec_from_file_location(f"_pbp_ref_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
