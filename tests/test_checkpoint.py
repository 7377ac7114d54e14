"""save / load: exact round trips, no pickle, atomic writes, clear refusals."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pbp_fx
from pbp_fx.checkpoint import read_structure
from pbp_fx.controller import PhaseController


def _build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


X, Y = torch.randn(32, 6), torch.randint(0, 3, (32,))


def _steps(pm, n):
    """n Adam steps on what the current phase trains; returns the optimizer."""
    opt = torch.optim.Adam(list(pm.trainable_parameters()), 1e-2)
    for _ in range(n):
        loss = F.cross_entropy(pm(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def _trained_pm(phase="neuron"):
    pm = pbp_fx.perforate(_build(), (X,))
    pm.grow()
    with torch.no_grad():
        for s in pm.sites.values():
            s.out_weight.normal_()
    opt = _steps(pm, 5)
    if phase == "dendrite":
        pm.start_dendrite_phase(pool=3)
        opt = _steps(pm, 8)
    return pm, opt


@pytest.mark.parametrize("phase", ["neuron", "dendrite"])
def test_round_trip_is_exact(tmp_path, phase):
    pm, opt = _trained_pm(phase)
    ctl = PhaseController(pm)
    ctl.step(0.5)
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path, controller=ctl, optimizer=opt)
    ctl2 = PhaseController(pbp_fx.perforate(_build(), (X,)))
    pm2 = pbp_fx.load(path, _build, (X,), controller=ctl2)
    assert pm2.phase == phase and pm2.num_dendrites == pm.num_dendrites
    for mode in ("train", "eval"):
        getattr(pm, mode)(), getattr(pm2, mode)()
        assert torch.equal(pm(X), pm2(X))
    assert ctl2.best_score == ctl.best_score and ctl2.history == ctl.history
    if phase == "neuron":  # a dendrite-phase epoch records no best weights
        assert all(torch.equal(ctl.best_state[k], ctl2.best_state[k]) for k in ctl.best_state)
    else:
        assert ctl.best_state is None and ctl2.best_state is None
    if phase == "dendrite":
        pm.install_candidates()
        pm2.install_candidates()
        pm.eval(), pm2.eval()
        assert torch.equal(pm(X), pm2(X))


def test_optimizer_state_round_trip(tmp_path):
    pm, opt = _trained_pm()
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path, optimizer=opt)
    pm2 = pbp_fx.load(path, _build(), (X,))
    opt2 = torch.optim.Adam(list(pm2.trainable_parameters()), 1e-2)
    pbp_fx.load(path, pm2, optimizer=opt2)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])


def test_file_holds_no_pickle(tmp_path):
    pm, _ = _trained_pm()
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    data = open(path, "rb").read()
    assert b"\x80\x04" not in data[:64] and not data.startswith(b"PK")  # neither pickle nor torch zip
    assert read_structure(path)["sites"][0]["name"] == "0"


def test_other_model_is_refused_naming_the_site(tmp_path):
    pm, _ = _trained_pm()
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    other = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3))
    with pytest.raises(pbp_fx.CheckpointError, match="another model: site '0'"):
        pbp_fx.load(path, other, (X,))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_files_are_refused(tmp_path, damage):
    pm, _ = _trained_pm()
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[:-17]
    else:
        data[-5] ^= 0xFF  # a tensor byte: only the checksum notices
    open(path, "wb").write(bytes(data))
    with pytest.raises(pbp_fx.CheckpointError, match="truncated or corrupted|checksum"):
        pbp_fx.load(path, _build, (X,))


def test_a_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    pm, _ = _trained_pm()
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    before = open(path, "rb").read()
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        pbp_fx.save(pm, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["c.safetensors"]


def test_missing_directory_and_missing_file(tmp_path):
    pm, _ = _trained_pm()
    with pytest.raises(pbp_fx.CheckpointError, match="does not exist"):
        pbp_fx.save(pm, str(tmp_path / "no" / "c.safetensors"))
    with pytest.raises(pbp_fx.CheckpointError, match="does not exist"):
        pbp_fx.load(str(tmp_path / "none.safetensors"), _build, (X,))


def test_keyword_input_models_rebuild_from_a_checkpoint(tmp_path):
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 2)

        def forward(self, input_ids, mask=None):
            return {"logits": self.b(torch.relu(self.a(input_ids))) * mask}

    kw = {"input_ids": torch.randn(3, 4), "mask": torch.ones(3, 1)}
    pm = pbp_fx.perforate(KW(), (), example_kwargs=kw)
    pm.grow()
    with torch.no_grad():
        for s in pm.sites.values():
            s.out_weight.normal_()
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    pm2 = pbp_fx.load(path, KW, example_kwargs=kw)
    assert pm2.num_dendrites == {"a": 1, "b": 1}
    assert torch.equal(pm(**kw)["logits"], pm2(**kw)["logits"])
