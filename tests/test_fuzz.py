"""Property-based fuzzing of the whole pipeline (hypothesis).

Valid random architectures perforate, grow, finalize, save/load and export with exact
numerics; invalid inputs fail with the documented error types, never an internal exception.
"""
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pbp_fx
from pbp_fx.exporters import ExportPathError, export_onnx, ort_session, run

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The full pipeline (export + ONNX Runtime included) is the slow one: fewer, richer examples.
PIPELINE = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Net(nn.Module):
    """A random conv/MLP stack with optional BN, bias, groups, residuals and a functional head."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.layers, self.norms, self.residual = nn.ModuleList(), nn.ModuleList(), []
        c = cfg["in"]
        for w, bn, bias, groups in cfg["blocks"]:
            if cfg["conv"]:
                g = groups if c % groups == 0 and w % groups == 0 else 1
                self.layers.append(nn.Conv1d(c, w, 3, padding=1, groups=g, bias=bias))
                self.norms.append(nn.BatchNorm1d(w) if bn else nn.Identity())
            else:
                self.layers.append(nn.Linear(c, w, bias=bias))
                self.norms.append(nn.BatchNorm1d(w) if bn else nn.Identity())
            self.residual.append(c == w)
            c = w
        self.head_weight = nn.Parameter(torch.randn(3, c) * 0.3)

    def forward(self, x):
        for layer, norm, res in zip(self.layers, self.norms, self.residual):
            h = torch.tanh(norm(layer(x)))
            x = x + h if res else h
        if self.cfg["conv"]:
            x = x.mean(-1)
        return F.linear(x, self.head_weight)


block = st.tuples(st.integers(2, 8), st.booleans(), st.booleans(), st.sampled_from([1, 2]))
arch = st.fixed_dictionaries({"conv": st.booleans(), "in": st.integers(2, 6),
                              "blocks": st.lists(block, min_size=1, max_size=3)})


def _inputs(cfg, batch=5):
    return (torch.randn(batch, cfg["in"], 7) if cfg["conv"] else torch.randn(batch, cfg["in"]),)


@PIPELINE
@given(cfg=arch, k=st.integers(1, 2), seed=st.integers(0, 2 ** 16))
def test_valid_architectures_survive_the_whole_pipeline(cfg, k, seed):
    torch.manual_seed(seed)
    model = Net(cfg)
    x = _inputs(cfg)
    pm = pbp_fx.perforate(model, x)
    model.eval(), pm.eval()
    assert (pm(*x) - model(*x)).abs().max().item() <= 1e-6
    for _ in range(k):
        pm.grow()
    with torch.no_grad():
        for s in pm.sites.values():
            s.out_weight.normal_()
            s.cascade.normal_()
    pm.train()
    pm(*_inputs(cfg, 8))  # non-trivial BN statistics
    pm.eval()
    ref = pm(*x).detach()
    assert (pm.finalize()(*x) - ref).abs().max().item() <= 1e-5
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.safetensors")
        pbp_fx.save(pm, path)
        pm2 = pbp_fx.load(path, lambda: Net(cfg), x)
        pm2.eval()
        assert torch.equal(pm2(*x), ref)
        onnx_path = export_onnx(pm, x, os.path.join(d, "m.onnx"))
        got = run(ort_session(onnx_path), tuple(t.numpy() for t in x))[0]
        assert np.abs(got - ref.numpy()).max() <= 1e-4


INVALID = {
    "wrong input width": (lambda cfg: pbp_fx.perforate(Net(cfg), (torch.randn(2, cfg["in"] + 3, 7)
                                                                   if cfg["conv"] else torch.randn(2, cfg["in"] + 3),)),
                          pbp_fx.TraceError),
    "integer inputs": (lambda cfg: pbp_fx.perforate(Net(cfg), (torch.ones(2, cfg["in"], 7, dtype=torch.long)
                                                               if cfg["conv"] else torch.ones(2, cfg["in"], dtype=torch.long),)),
                       pbp_fx.TraceError),
    "include matches nothing": (lambda cfg: pbp_fx.perforate(Net(cfg), _inputs(cfg), include=["nothing.*"]),
                                pbp_fx.NoSitesError),
    "unknown activation": (lambda cfg: pbp_fx.perforate(Net(cfg), _inputs(cfg), activation="swish"), ValueError),
    "unknown mode": (lambda cfg: pbp_fx.perforate(Net(cfg), _inputs(cfg), mode="sgd"), ValueError),
    "max_dendrites=0": (lambda cfg: pbp_fx.PhaseController(pbp_fx.perforate(Net(cfg), _inputs(cfg)), max_dendrites=0),
                        ValueError),
    "onnx into a missing directory": (lambda cfg: export_onnx(pbp_fx.perforate(Net(cfg), _inputs(cfg)), _inputs(cfg),
                                                              "/nonexistent-dir/m.onnx"), ExportPathError),
}


@SETTINGS
@given(cfg=arch, case=st.sampled_from(sorted(INVALID)))
def test_invalid_inputs_raise_documented_errors(cfg, case):
    make, expected = INVALID[case]
    with pytest.raises(expected) as info:
        make(cfg)
    assert "\n" not in str(info.value).strip(), "errors are one line"


@SETTINGS
@given(cfg=arch, cut=st.floats(0.0, 0.999), flip=st.booleans())
def test_damaged_checkpoints_are_refused(cfg, cut, flip):
    pm = pbp_fx.perforate(Net(cfg), _inputs(cfg))
    pm.grow()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.safetensors")
        pbp_fx.save(pm, path)
        data = bytearray(open(path, "rb").read())
        if flip:
            i = int(cut * len(data))
            data[i] ^= 0x5A
        else:
            data = data[: int(cut * len(data))]
        open(path, "wb").write(bytes(data))
        try:
            pm2 = pbp_fx.load(path, lambda: Net(cfg), _inputs(cfg))
        except pbp_fx.CheckpointError:
            return
        # A flip that survived the checks can only be in bytes that change nothing.
        assert flip
        x = _inputs(cfg)
        pm.eval(), pm2.eval()
        assert torch.equal(pm(*x), pm2(*x))
