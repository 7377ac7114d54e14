"""save / load: exact round trips, no pickle, atomic writes, clear refusals."""
import copy
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pbp_fx
from parts_models import BranchingRoot, CountsSteps
from pbp_fx.checkpoint import read_structure
from pbp_fx.errors import CheckpointError
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


def test_a_controller_or_optimizer_of_another_model_is_refused(tmp_path):
    """save/load took another model's controller: its decisions then acted on that model, and
    `load` of the file onto its own model failed epochs later in torch's multi-line error."""
    pm, opt = _trained_pm("neuron")
    ctl = PhaseController(pm, optimizer=opt)
    other = pbp_fx.perforate(_build(), (X,))
    other_ctl = PhaseController(other)
    path = str(tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match="save\\(controller=\\) got the controller of another model"):
        pbp_fx.save(pm, path, controller=other_ctl)
    with pytest.raises(CheckpointError, match="save\\(optimizer=\\) got an optimizer that holds none of this model"):
        pbp_fx.save(pm, path, optimizer=other_ctl.optimizer)
    assert not os.path.exists(path)
    pbp_fx.save(pm, path, controller=ctl, optimizer=opt)
    with pytest.raises(CheckpointError, match="needs the controller of the model it loads into"):
        pbp_fx.load(path, other, controller=ctl)
    with pytest.raises(CheckpointError, match="load makes a new model from a base model or build function"):
        pbp_fx.load(path, _build, (X,), controller=other_ctl)
    with pytest.raises(CheckpointError, match="load\\(optimizer=\\) got an optimizer that holds none"):
        pbp_fx.load(path, other, optimizer=opt)
    assert set(other.num_dendrites.values()) == {0} and other_ctl.history == []  # nothing loaded


@pytest.mark.parametrize("phase", ["neuron", "dendrite"])
def test_round_trip_is_exact(tmp_path, phase):
    pm, opt = _trained_pm(phase)
    ctl = PhaseController(pm)
    ctl.step(0.5)
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path, controller=ctl, optimizer=opt)
    pm2 = pbp_fx.load(path, _build, (X,))
    ctl2 = PhaseController(pm2)
    assert pbp_fx.load(path, pm2, controller=ctl2) is pm2
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


def test_another_site_selection_of_the_same_model_is_named_as_such(tmp_path):
    """A model perforated with exclude=[...] read "belongs to another model: site '3' ... missing here" (a reviewer)."""
    pm, _ = _trained_pm()
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    fewer = pbp_fx.perforate(_build(), (X,), exclude=["3"])
    with pytest.raises(CheckpointError, match=r"has a site '3', a layer of this model \(of the same shape\) that is "
                                              r"no site here: this model's site selection differs \(perforate's "
                                              r"include/exclude\)"):
        pbp_fx.load(path, fewer)
    # (a layer of that name of another kind or shape: another model, as before; the diff review)
    other = pbp_fx.perforate(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)), (X,),
                             exclude=["3"])
    with pytest.raises(CheckpointError, match=r"belongs to another model: site '3' is linear \[3, 8\]"):
        pbp_fx.load(path, other)
    pbp_fx.save(fewer, path)
    with pytest.raises(CheckpointError, match=r"belongs to another model, or to this one perforated with other "
                                              r"include/exclude: site '3' is not in the checkpoint"):
        pbp_fx.load(path, pbp_fx.perforate(_build(), (X,)))
    assert sorted(pbp_fx.load(path, _build).sites) == ["0"]  # (rebuilt with the checkpoint's own selection)


def test_other_model_is_refused_naming_the_site(tmp_path):
    pm, _ = _trained_pm()
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    other = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3))
    with pytest.raises(pbp_fx.CheckpointError, match="another model: site '0'"):
        pbp_fx.load(path, other, (X,))
    # A site the model does not have: named as missing, without a list of every setting against None.
    renamed = nn.Sequential(nn.Identity(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(pbp_fx.CheckpointError) as err:
        pbp_fx.load(path, renamed, (X,))
    assert "site '0' is linear [8, 6] in the checkpoint but missing here; load it onto" in str(err.value)


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


@pytest.mark.parametrize("content", [b'{"epochs": []}\n', b"x" * 40, b"\x93NUMPY\x01\x00" + b"\x00" * 40])
def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path, content):
    """history.json passed as a checkpoint read as 'truncated or corrupted (JSONDecodeError)'."""
    path = tmp_path / "history.json"
    path.write_bytes(content)
    with pytest.raises(pbp_fx.CheckpointError, match=r"is not a checkpoint \(not a safetensors file\): pass the "
                                                     r"checkpoint.safetensors"):
        pbp_fx.load(str(path), _build, (X,))


def test_a_model_saved_in_float64_comes_back_in_float64(tmp_path):
    pm, _ = _trained_pm()
    pm.to(torch.float64)
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    pm.eval()
    x = X.double()
    for target, inputs in ((_build, None), (lambda: _build().double(), None), (pbp_fx.perforate(_build(), (X,)), None),
                           (_build, (X,))):  # stand-ins, or the caller's float32 inputs: in the model's dtype
        again = pbp_fx.load(path, target, inputs).eval()
        assert {p.dtype for p in again.parameters()} == {torch.float64}
        with torch.no_grad():
            assert torch.equal(again(x), pm(x))


def test_a_model_put_in_another_dtype_keeps_it_when_a_checkpoint_loads(tmp_path):
    """pm.double() then load of a float32 checkpoint came back float32, silently (plain
    load_state_dict keeps the model's dtype): the next float64 input failed."""
    pm, _ = _trained_pm()
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    again = pbp_fx.load(path, pbp_fx.perforate(_build(), (X,)).double()).eval()
    assert {p.dtype for p in again.parameters()} == {torch.float64}
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(X.double()), pm(X).double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_model_saved_in_a_dendrite_phase_comes_back_in_its_dtype(tmp_path, dtype):
    """The pools' float32 statistics made the saved dtypes {bf16, f32}: load() kept the build's
    float32, the half weights were cast into it, and the forward failed on mixed dtypes."""
    pm = pbp_fx.perforate(_build().to(dtype), (X.to(dtype),))
    pm.start_dendrite_phase(pool=2)
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    again = pbp_fx.load(path, _build)
    assert {p.dtype for p in again.parameters()} == {dtype}
    assert all(again.state_dict()[k].dtype == v.dtype and torch.equal(again.state_dict()[k], v)
               for k, v in pm.state_dict().items() if isinstance(v, torch.Tensor))
    with torch.no_grad():
        assert torch.equal(again.eval()(X.to(dtype)), pm.eval()(X.to(dtype)))


def test_a_truncated_checkpoint_whose_header_size_starts_like_a_pickle_is_called_truncated(tmp_path):
    """A header size whose low byte is 0x80 (1 checkpoint in 256) read as 'a torch.save / pickle file',
    with the advice to load it with torch.load."""
    pm, _ = _trained_pm()
    path = str(tmp_path / "c.safetensors")
    for pad in range(512):
        pbp_fx.save(pm, path, extra={"pad": "x" * pad})
        data = open(path, "rb").read()
        if data[0] == 0x80:
            break
    assert data[0] == 0x80
    open(path, "wb").write(data[:len(data) // 2])
    with pytest.raises(pbp_fx.CheckpointError, match="is truncated or corrupted"):
        pbp_fx.load(path, _build, (X,))


def test_a_torch_save_file_is_named_as_such(tmp_path):
    path = str(tmp_path / "model.pt")
    torch.save(_build().state_dict(), path)
    with pytest.raises(pbp_fx.CheckpointError, match=r"is a torch.save / pickle file, not a pbp-fx checkpoint"):
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
    # A folder (a Trainer's checkpoint-N) was said not to exist: the file in it is named.
    pbp_fx.save(pm, str(tmp_path / "pbp_fx.safetensors"))
    with pytest.raises(pbp_fx.CheckpointError, match=f"checkpoint {tmp_path} is a folder: pass the checkpoint file "
                                                     f"in it, {tmp_path / 'pbp_fx.safetensors'}$"):
        pbp_fx.load(str(tmp_path), _build, (X,))


def _grown_and_saved(pm, tmp_path) -> str:
    """pm with one dendrite per site (random V), saved; returns the checkpoint's path."""
    pm.grow()
    with torch.no_grad():
        for s in pm.sites.values():
            s.out_weight.normal_()
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    return path


def test_keyword_input_models_rebuild_from_a_checkpoint(tmp_path):
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 2)

        def forward(self, input_ids, mask=None):
            return {"logits": self.b(torch.relu(self.a(input_ids))) * mask}

    kw = {"input_ids": torch.randn(3, 4), "mask": torch.ones(3, 1)}
    pm = pbp_fx.perforate(KW(), (), example_kwargs=kw)
    path = _grown_and_saved(pm, tmp_path)
    pm2 = pbp_fx.load(path, KW, example_kwargs=kw)
    assert pm2.num_dendrites == {"a": 1, "b": 1}
    assert torch.equal(pm(**kw)["logits"], pm2(**kw)["logits"])


class BatchDict(nn.Module):
    """forward(batch): a dict holding a tensor and a list of tensors, as a collate function makes it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, batch):
        return self.head(torch.relu(self.a(batch["img"]) + self.b(batch["parts"][0] * batch["parts"][1])))


def test_a_model_taking_a_dict_of_tensors_rebuilds_from_its_checkpoint_alone(tmp_path):
    """load(path, build) refused it: 'the recorded input 'batch' is a dict, which cannot be rebuilt'."""
    batch = {"img": torch.randn(5, 4), "parts": [torch.randn(5, 3), torch.randn(5, 3)]}
    pm = pbp_fx.perforate(BatchDict(), (batch,))
    path = _grown_and_saved(pm, tmp_path)
    back = pbp_fx.load(path, BatchDict)
    assert back.num_dendrites == pm.num_dendrites and torch.equal(back(batch), pm(batch))
    pbp_fx.save(back, str(tmp_path / "again.safetensors"))  # the same record: the same bytes
    assert (tmp_path / "again.safetensors").read_bytes() == open(path, "rb").read()


class RootWithControlFlow(nn.Module):
    """Data-dependent Python in the root's forward: perforated in parts (its Linears in place)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.a(x)
        h = torch.relu(h) if x.sum() > 0 else torch.tanh(h)
        return self.b(h)


def test_a_model_perforated_in_parts_loads_from_its_checkpoint(tmp_path):
    x = torch.randn(3, 4)
    pm = pbp_fx.perforate(RootWithControlFlow(), (x,))
    assert pm.capture["captured_with"] == "parts"
    path = _grown_and_saved(pm, tmp_path)
    pm2 = pbp_fx.load(path, RootWithControlFlow)  # the recorded inputs: no example needed
    assert pm2.num_dendrites == pm.num_dendrites and pm2.capture == pm.capture
    for sign in (1.0, -1.0):  # both branches of the root's Python
        assert torch.equal(pm(sign * x.abs()), pm2(sign * x.abs()))


class RootWithoutControlFlow(RootWithControlFlow):
    """The same layers, a root that traces whole."""

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_parts_checkpoint_is_rebuilt_in_parts_on_a_model_whose_root_now_traces(tmp_path):
    """A parts capture was rebuilt with "auto", which captured such a model whole under other parameter
    names: 'does not fit this model' (a Hugging Face model built again with use_cache=False; a reviewer)."""
    x = torch.randn(3, 4).abs()
    pm = pbp_fx.perforate(RootWithControlFlow(), (x,))
    path = _grown_and_saved(pm, tmp_path)
    pm2 = pbp_fx.load(path, RootWithoutControlFlow)
    assert pm2.capture["captured_with"] == "parts" and pm2.num_dendrites == pm.num_dendrites
    assert torch.equal(pm2(x), pm(x))


class OptionalLabels(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, labels=None):
        logits = self.fc(x)
        return logits if labels is None else (F.cross_entropy(logits, labels), logits)


def test_a_model_loaded_on_inputs_of_another_pattern_saves_that_pattern(tmp_path):
    """Trained with labels, loaded for serving without them, saved again: the second file kept the first's
    record of the inputs, so a plain load rebuilt the labelled graph, which refused calls without labels
    (docs/integrations.md's re-capture for inference; a reviewer)."""
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    pm = pbp_fx.perforate(OptionalLabels(), (x,), example_kwargs={"labels": y})
    pbp_fx.save(pm, tmp_path / "trained.safetensors")
    serving = pbp_fx.load(tmp_path / "trained.safetensors", OptionalLabels, example_inputs=(x,))
    pbp_fx.save(serving, tmp_path / "serving.safetensors")
    again = pbp_fx.load(tmp_path / "serving.safetensors", OptionalLabels)
    torch.testing.assert_close(again(x), pm(x, labels=y)[1], rtol=0, atol=0)


# -- format 2: the transformation is recorded; load needs no example inputs ----------------------
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from pbp_fx.checkpoint import FORMAT, read_meta  # noqa: E402


class _RandomNet(nn.Module):
    """conv layers (optionally with BatchNorm) then linear layers; widths from `spec`."""

    def __init__(self, spec):
        super().__init__()
        convs, c = [], 2
        for width, bn in spec["convs"]:
            convs += [nn.Conv1d(c, width, 3, padding=1)] + ([nn.BatchNorm1d(width)] if bn else []) + [nn.ReLU()]
            c = width
        self.features = nn.Sequential(*convs)
        dims = [c * 8] + spec["linears"] + [3]
        self.head = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.Tanh())][:-1])

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


_SPECS = st.fixed_dictionaries({
    "convs": st.lists(st.tuples(st.integers(1, 5), st.booleans()), min_size=0, max_size=2),
    "linears": st.lists(st.integers(1, 6), min_size=0, max_size=2),
    "dendrites": st.integers(0, 2),
    "dendrite_phase": st.booleans(),
    "seed": st.integers(0, 2**16),
})


def _random_pm(spec, frontend):
    torch.manual_seed(spec["seed"])
    x = torch.randn(4, 2, 8)
    pm = pbp_fx.perforate(_RandomNet(spec), (x,), frontend=frontend)
    for _ in range(spec["dendrites"]):
        pm.grow()
    randomize_all(pm, spec["seed"])
    if spec["dendrite_phase"]:
        pm.start_dendrite_phase(pool=2)
        pm.train()
        pm(x).square().sum().backward()  # candidate statistics move
    return pm, x


def randomize_all(pm, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in pm.state_dict().items():
            if t.is_floating_point():
                r = torch.randn(t.shape, generator=g).to(t.dtype)
                t.copy_(r.abs() + 0.1 if name.endswith("running_var") else r)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=_SPECS)
def test_save_load_save_is_byte_identical_without_example_inputs(tmp_path, frontend, spec):
    pm, x = _random_pm(spec, frontend)
    first, second = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    pbp_fx.save(pm, first)
    pm2 = pbp_fx.load(first, lambda: _RandomNet(spec))  # no example inputs
    pbp_fx.save(pm2, second)
    assert open(first, "rb").read() == open(second, "rb").read()
    # inputs of the same pattern (another batch size) leave the record as it was: the same bytes again
    pbp_fx.save(pbp_fx.load(first, lambda: _RandomNet(spec), example_inputs=(torch.randn(7, 2, 8),)), second)
    assert open(first, "rb").read() == open(second, "rb").read()
    meta = read_meta(first)
    assert meta["format"] == FORMAT and meta["capture"]["captured_with"] == frontend
    assert meta["capture"]["inputs"]["args"] == [{"kind": "tensor", "shape": [4, 2, 8], "batch_axis": 0,
                                                  "dtype": "float32"}]
    pm.eval(), pm2.eval()
    assert torch.equal(pm(x), pm2(x))


def test_transformer_encoder_with_export_loads_without_inputs(tmp_path):
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=12, batch_first=True, dropout=0.0)
            self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.encoder(x).mean(1))

    x = torch.randn(3, 5, 8)
    pm = pbp_fx.perforate(Encoder(), (x,), frontend="export")
    pm.grow()
    randomize_all(pm, 1)
    path = str(tmp_path / "t.safetensors")
    pbp_fx.save(pm, path)
    pm2 = pbp_fx.load(path, Encoder)
    assert pm2.num_dendrites == pm.num_dendrites and len(pm2.sites) >= 3
    pm.eval(), pm2.eval()
    assert torch.equal(pm(x), pm2(x))
    assert pm2.capture == pm.capture and pm2.capture["captured_with"] == "export"


def _as_format_1(path, out):
    """Rewrite a checkpoint as pbp-fx 0.1 wrote it (format 1: no capture record)."""
    import json

    from safetensors.torch import load_file, save_file

    from pbp_fx.checkpoint import _digest

    meta = read_meta(path)
    for key in ("capture", "config", "model"):
        meta.pop(key, None)
    meta["format"] = "pbp-fx-checkpoint/1"
    tensors = load_file(path)
    meta["sha256"] = _digest(tensors, meta)
    save_file(tensors, out, metadata={"pbp_fx": json.dumps(meta)})


def test_format_1_loads_with_inputs_or_is_refused_saying_how_to_convert(tmp_path):
    pm, _ = _trained_pm()
    v2, v1 = str(tmp_path / "v2.safetensors"), str(tmp_path / "v1.safetensors")
    pbp_fx.save(pm, v2)
    _as_format_1(v2, v1)
    with pytest.raises(pbp_fx.CheckpointError, match="format 1.*example_inputs.*save\\(\\) it to convert") as e:
        pbp_fx.load(v1, _build)
    assert "\n" not in str(e.value)
    pm1 = pbp_fx.load(v1, _build, (X,))  # with inputs it loads; saving converts it
    pm.eval(), pm1.eval()
    assert torch.equal(pm(X), pm1(X))
    converted = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm1, converted)
    assert read_meta(converted)["format"] == FORMAT
    pm2 = pbp_fx.load(converted, _build)
    pm2.eval()
    assert torch.equal(pm(X), pm2(X))


def test_controller_config_and_model_reference_are_recorded(tmp_path):
    pm, _ = _trained_pm()
    ctl = PhaseController(pm, pbp_fx.PBConfig(pool=3, patience=4))
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path, controller=ctl, model_ref="pbp_fx.models.digits_mlp")
    meta = read_meta(path)
    assert pbp_fx.PBConfig.from_dict(meta["config"]) == ctl.config
    assert meta["model"] == "pbp_fx.models.digits_mlp"
    sites = meta["structure"]["sites"]
    assert sites[0]["layer"]["kind"] == "linear" and sites[0]["norm_spec"]["eps"] == 1e-5


def test_a_model_that_does_not_run_on_the_recorded_inputs_is_another_models(tmp_path):
    """Loading an MLP's checkpoint onto a CNN raised a TraceError about conv2d's input."""
    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    pm, _ = _trained_pm()
    path = str(tmp_path / "mlp.safetensors")
    pbp_fx.save(pm, path)
    with pytest.raises(CheckpointError, match=r"CNN does not run on stand-ins of the inputs recorded with it \(.*"
                                              r"conv2d.*pass example_inputs= .*the checkpoint belongs to another model$"):
        pbp_fx.load(path, CNN)


class _Pooled(nn.Module):
    """A forward that checks its inputs' values: the stand-ins' integer lengths are 0."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x, lengths):
        torch._assert((lengths > 0).all(), "lengths must be positive")
        mask = (torch.arange(x.shape[1]) < lengths[:, None]).unsqueeze(-1)
        return self.fc2((torch.relu(self.fc1(x)) * mask).sum(1) / lengths[:, None])


def test_a_model_that_refuses_the_stand_in_values_is_told_to_pass_its_inputs(tmp_path):
    """The load said the checkpoint 'belongs to another model' where the model only refused the
    stand-ins' zero lengths: the fix, passing example inputs, came last."""
    x, lengths = torch.randn(3, 5, 4), torch.tensor([5, 3, 2])
    pm = pbp_fx.perforate(_Pooled(), (x, lengths))
    path = str(tmp_path / "m.safetensors")
    pbp_fx.save(pm, path)
    with pytest.raises(CheckpointError, match=r"_Pooled does not run on stand-ins of the inputs recorded with it "
                                              r"\(.*integers 0.*lengths must be positive.*\): pass example_inputs="):
        pbp_fx.load(path, _Pooled)
    again = pbp_fx.load(path, _Pooled, (x, lengths))  # the advice, followed
    assert torch.equal(again(x, lengths), pm(x, lengths))


def test_a_torch_compiled_model_loads_as_the_model_it_wraps(tmp_path):
    pm, _ = _trained_pm()
    path = str(tmp_path / "m.safetensors")
    pbp_fx.save(pm, path)
    with pytest.warns(pbp_fx.PBWarning, match=r"captures the model torch.compile wraps \(model._orig_mod\)"):
        loaded = pbp_fx.load(path, torch.compile(_build()))
    assert list(loaded.sites) == list(pm.sites)
    pm.eval()
    loaded.eval()
    assert torch.equal(loaded(X), pm(X))


def test_the_controllers_candidate_generator_comes_back(tmp_path):
    """Both loaders: the next candidates are those the saved controller would draw."""
    pm, _ = _trained_pm()
    ctl = PhaseController(pm, pbp_fx.PBConfig(pool=3))
    ctl.generator.manual_seed(77)
    torch.rand(3, generator=ctl.generator)  # a state no seed gives
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path, controller=ctl)
    want = ctl.generator.get_state()
    fresh = PhaseController(pbp_fx.load(path, _build, (X,)), pbp_fx.PBConfig(pool=3))
    pbp_fx.load(path, fresh.pm, controller=fresh)
    assert torch.equal(fresh.generator.get_state(), want)
    other = PhaseController(pbp_fx.load(path, _build, (X,)), pbp_fx.PBConfig(pool=3))
    pbp_fx.checkpoint.load_controller(path, other)
    assert torch.equal(other.generator.get_state(), want)


def test_a_strided_pool_comes_back_strided_and_trains_alike(tmp_path):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8, 3))

    x = torch.randn(32, 2, 8)
    pm = pbp_fx.perforate(build(), (x,))
    pm.start_dendrite_phase(pool=2, stride=2)
    opt = torch.optim.Adam(list(pm.trainable_parameters()), 1e-2)
    for _ in range(3):
        F.cross_entropy(pm(x), Y).backward()
        opt.step()
        opt.zero_grad()
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    assert [r.get("pool_stride") for r in read_structure(path)["sites"]] == [2, 2]
    pm2 = pbp_fx.load(path, build, (x,))
    assert [s.candidates.stride for s in pm2.sites.values()] == [2, 2]
    for m in (pm, pm2):  # one more step each: the same statistics
        F.cross_entropy(m(x), Y).backward()
    for s, s2 in zip(pm.sites.values(), pm2.sites.values()):
        torch.testing.assert_close(s.candidates.ema, s2.candidates.ema)
    # A pool of stride 1 records no stride: files keep the structure records they always had.
    pm3 = pbp_fx.perforate(build(), (x,))
    pm3.start_dendrite_phase(pool=2)
    pbp_fx.save(pm3, path)
    assert all("pool_stride" not in r for r in read_structure(path)["sites"])


SETTINGS = {"ema": 0.9, "warmup": 2, "threshold": 0.5, "bias_correction": False, "split": False}


def _pool_settings(pm) -> list[dict]:
    return [{"ema": c.ema_decay, "warmup": c.warmup, "threshold": c.threshold, "bias_correction": c.bias_correction,
             "split": c.split} for c in (s.candidates for s in pm.sites.values())]


def test_a_pool_saved_without_a_controller_comes_back_with_its_own_settings(tmp_path):
    """The pool's statistics settings are no tensors: a checkpoint without a controller (no PBConfig)
    rebuilt the pool with start_dendrite_phase's defaults, and its statistics went on otherwise."""
    pm = pbp_fx.perforate(_build(), (X,))
    pm.start_dendrite_phase(pool=2, **SETTINGS)
    _steps(pm, 3)
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    pm2 = pbp_fx.load(path, _build, (X,))
    assert _pool_settings(pm2) == [SETTINGS] * len(pm.sites)
    for m in (pm, pm2):  # one more batch each: the same statistics
        F.cross_entropy(m(X), Y).backward()
    for s, s2 in zip(pm.sites.values(), pm2.sites.values()):
        torch.testing.assert_close(s.candidates.ema, s2.candidates.ema)
        torch.testing.assert_close(s.candidates.best, s2.candidates.best)


def test_a_framework_resume_rebuilds_the_pool_with_its_own_settings_not_the_runs_new_ones():
    """A framework's own resume loads a state dict (StructureOnLoad): the pool it rebuilds is the
    saved one even when the run's config now says otherwise (the resume warning says so)."""
    from pbp_fx.integrations.common import StructureOnLoad

    pm = pbp_fx.perforate(_build(), (X,))
    pm.start_dendrite_phase(pool=2, **SETTINGS)
    _steps(pm, 2)
    state = pm.state_dict()
    fresh = pbp_fx.perforate(_build(), (X,))
    hook = StructureOnLoad(fresh, lambda _: pbp_fx.PBConfig(pool=2))  # the defaults: ema 0.99, split, ...
    fresh.load_state_dict(state)
    hook.remove()
    assert fresh.phase == "dendrite" and _pool_settings(fresh) == [SETTINGS] * len(pm.sites)


def test_a_framework_load_into_a_dendrite_phase_over_other_dendrites_restores_the_structure():
    """Lightning's validate(ckpt_path=) twice, over dendrite-phase checkpoints of K=1 and then K=0: the hook did
    nothing where both had a pool, and the load failed (Site refuses to resize under a pool; the diff review)."""
    from pbp_fx.integrations.common import StructureOnLoad

    grown = pbp_fx.perforate(_build(), (X,))
    grown.grow()
    grown.start_dendrite_phase(pool=2, **SETTINGS)
    _steps(grown, 2)
    bare = pbp_fx.perforate(_build(), (X,))
    bare.start_dendrite_phase(pool=2, **SETTINGS)
    _steps(bare, 2)
    fresh = pbp_fx.perforate(_build(), (X,))
    hook = StructureOnLoad(fresh, lambda _: pbp_fx.PBConfig(pool=2))
    wider = pbp_fx.perforate(_build(), (X,))  # (and a pool of another size over the same dendrites)
    wider.start_dendrite_phase(pool=3, **SETTINGS)
    _steps(wider, 2)
    for source in (bare, grown, bare, wider):
        fresh.load_state_dict(source.state_dict())
        assert fresh.phase == "dendrite" and fresh.dendrites == source.dendrites
        for k, v in source.state_dict().items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(fresh.state_dict()[k], v), k
    hook.remove()


def test_a_plain_load_state_dict_gives_a_pool_its_recorded_settings_and_warns_of_another_stride():
    pm = pbp_fx.perforate(_build(), (X,))
    pm.start_dendrite_phase(pool=2, **SETTINGS)
    _steps(pm, 2)
    state = pm.state_dict()
    other = pbp_fx.perforate(_build(), (X,))
    other.start_dendrite_phase(pool=2)  # start_dendrite_phase's defaults
    other.load_state_dict(state)
    assert _pool_settings(other) == [SETTINGS] * len(pm.sites)
    strided = pbp_fx.perforate(nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU()), (torch.randn(4, 2, 8),))
    strided.start_dendrite_phase(pool=2, stride=2)
    plain = pbp_fx.perforate(nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU()), (torch.randn(4, 2, 8),))
    plain.start_dendrite_phase(pool=2)
    with pytest.warns(UserWarning, match="candidate pool has position stride 2, this one 1, which it keeps: to go on "
                                         "as the state's, start the dendrite phase with stride=2"):
        plain.load_state_dict(strided.state_dict())
    assert [s.candidates.stride for s in plain.sites.values()] == [1]


def test_a_site_that_differs_only_in_its_settings_is_named_with_them(tmp_path):
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pbp_fx.perforate(_build(), (X,)), path)
    no_bias = _build()
    no_bias[3] = nn.Linear(8, 3, bias=False)
    with pytest.raises(pbp_fx.CheckpointError, match=r"site '3' is linear \[3, 8\] in the checkpoint but linear "
                                                     r"\[3, 8\] here \(bias True there, False here\)"):
        pbp_fx.load(path, no_bias, (X,))


def _with_old_part_names(path, out, old=None):
    """Rewrite a checkpoint's site names as earlier pbp-fx named them (`old`: new -> old name; by
    default a "parts" checkpoint's part weights as `a.weight`, module key `a_weight`, not `a`)."""
    import json

    from safetensors.torch import load_file, save_file

    from pbp_fx.checkpoint import _digest

    meta = read_meta(path)
    old = old or {"a": "a.weight", "head": "head.weight", "gate": "gate.weight"}
    for rec in meta["structure"]["sites"]:
        rec["name"] = old.get(rec["name"], rec["name"])

    def key(k):
        for new, name in old.items():
            k = k.replace(f"pbp_sites.{new}.", f"pbp_sites.{name.replace('.', '_')}.")
        return k
    tensors = {key(k): v for k, v in load_file(path).items()}
    meta["plain"] = {key(k): v for k, v in meta["plain"].items()}
    meta["sha256"] = _digest(tensors, meta)
    save_file(tensors, out, metadata={"pbp_fx": json.dumps(meta)})


def test_a_bare_layer_checkpoint_with_the_old_site_name_weight_loads_as_root(tmp_path):
    """A bare nn.Linear's site was named 'weight' before it was 'root': its checkpoints still load."""
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    pm = pbp_fx.perforate(nn.Linear(4, 3), (x,))
    pm.grow()
    with torch.no_grad():
        pm.sites["root"].out_weight.normal_()
    new, old = str(tmp_path / "new.safetensors"), str(tmp_path / "old.safetensors")
    pbp_fx.save(pm, new)
    _with_old_part_names(new, old, {"root": "weight"})
    assert [r["name"] for r in read_meta(old)["structure"]["sites"]] == ["weight"]
    pm2 = pbp_fx.load(old, lambda: nn.Linear(4, 3))
    assert list(pm2.sites) == ["root"] and pm2.num_dendrites == {"root": 1}
    assert torch.equal(pm2(x), pm(x))


def test_a_parts_checkpoint_with_the_old_site_names_loads_renamed(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    with pytest.warns(UserWarning, match="neither fx nor torch.export"):
        pm = pbp_fx.perforate(BranchingRoot(), (x,))
    assert list(pm.sites) == ["a", "gate.b", "gate", "head"]
    pm.grow()
    with torch.no_grad():
        for s in pm.sites.values():
            s.out_weight.normal_()
    ctl = PhaseController(pm, patience=1, pool=2)
    ctl.step(0.5)
    ctl.step(0.5)  # (the controller starts the dendrite phase)
    pm.train()
    pm(x).sum().backward()
    new, old = str(tmp_path / "new.safetensors"), str(tmp_path / "old.safetensors")
    pbp_fx.save(pm, new, controller=ctl)
    _with_old_part_names(new, old)
    assert [r["name"] for r in read_meta(old)["structure"]["sites"]] == ["a.weight", "gate.b", "gate.weight",
                                                                          "head.weight"]
    torch.manual_seed(1)
    pm2 = pbp_fx.load(old, BranchingRoot)  # (rebuilt in parts, as saved: no capture is tried first, none warned of)
    assert list(pm2.sites) == list(pm.sites) and pm2.phase == "dendrite"
    want, got = pm.state_dict(), pm2.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    ctl2 = PhaseController(pm2)
    pbp_fx.checkpoint.load_controller(old, ctl2)  # its best weights renamed too
    assert ctl2.state_dict()["history"] == ctl.state_dict()["history"]


@pytest.mark.parametrize("phase", ["neuron", "dendrite"])
def test_load_leaves_torchs_random_state_alone(tmp_path, phase):
    """Rebuilding draws (the base model, a dendrite phase's candidates): a resume that restored the
    random state before loading diverged from the uninterrupted run."""
    pm, _ = _trained_pm(phase)
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    for target in (_build, pbp_fx.perforate(_build(), (X,))):
        torch.manual_seed(123)
        before = torch.get_rng_state()
        assert pbp_fx.load(path, target).phase == phase
        assert torch.equal(torch.get_rng_state(), before)


def test_a_controller_with_a_checkpoint_saved_without_one_is_refused(tmp_path):
    """The controller was left in the neuron phase over a dendrite-phase model, its optimizer without
    the candidates, until a raw RuntimeError at its next step."""
    pm, _ = _trained_pm("dendrite")
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    target = pbp_fx.perforate(_build(), (X,))
    with pytest.raises(pbp_fx.CheckpointError, match="no controller state.*without controller=") as err:
        pbp_fx.load(path, target, controller=PhaseController(target))
    assert "\n" not in str(err.value) and target.phase == "neuron"


def test_a_model_with_another_parameter_is_refused_naming_the_key(tmp_path):
    """The refusal kept only torch's header line ("Error(s) in loading state_dict for ...:")."""
    class Scaled(nn.Sequential):
        def __init__(self):
            super().__init__(*_build())
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return super().forward(x) * self.scale

    pm, _ = _trained_pm()
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    with pytest.raises(pbp_fx.CheckpointError, match=r'does not fit this model: the model has [\w.]*scale, which it '
                                                     r'lacks') as err:
        pbp_fx.load(path, pbp_fx.perforate(Scaled(), (X,)))
    assert "\n" not in str(err.value)


def test_a_relative_model_file_reference_is_stored_absolute(tmp_path, monkeypatch):
    """`pbp-fx export` of a checkpoint saved with model_ref="model.py" failed from another directory."""
    from pbp_fx.checkpoint import read_meta

    (tmp_path / "model.py").write_text("# a model file\n")
    monkeypatch.chdir(tmp_path)
    pm, _ = _trained_pm()
    pbp_fx.save(pm, "c.safetensors", model_ref="model.py")
    assert read_meta("c.safetensors")["model"] == str(tmp_path / "model.py")


def test_resuming_under_other_settings_is_warned_of(tmp_path):
    """The saved PBConfig was silently replaced by the new controller's (max_dendrites, pool, candidate_lr)."""
    import warnings

    pm, _ = _trained_pm()
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path, controller=PhaseController(pm, pbp_fx.PBConfig(max_dendrites=2, pool=3)))
    target = pbp_fx.perforate(_build(), (X,))
    with pytest.warns(UserWarning, match="max_dendrites 2 -> 5, pool 3 -> 4"):
        pbp_fx.load(path, target, controller=PhaseController(target, pbp_fx.PBConfig(max_dendrites=5, pool=4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        target = pbp_fx.perforate(_build(), (X,))
        pbp_fx.load(path, target, controller=PhaseController(target, pbp_fx.PBConfig(max_dendrites=2, pool=3)))


class _TrainsItsBufferInTheRootForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)
        self.register_buffer("ema", torch.zeros(4))

    def forward(self, x):
        h = self.fc(x)
        if self.training:  # a branch in the root forward: the graph follows the mode it was captured in
            with torch.no_grad():
                self.ema.mul_(0.9).add_(0.1 * h.mean(0))
        return self.out(torch.relu(h - self.ema))


def test_a_one_mode_graph_is_rebuilt_in_the_mode_it_was_captured_in(tmp_path):
    """Captured in eval mode and loaded through a build function (train mode): the loaded graph was the
    train-mode one, updating its buffer at every call, and drifted from the saved model (0.022, 0.044, ...)."""
    torch.manual_seed(0)
    x = torch.randn(4, 4)
    with pytest.warns(UserWarning, match="self.training"):
        pm = pbp_fx.perforate(_TrainsItsBufferInTheRootForward().eval(), (x,))
    assert pm.capture["one_mode"] == "eval"
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    with pytest.warns(UserWarning, match="self.training"):
        loaded = pbp_fx.load(path, _TrainsItsBufferInTheRootForward)
    assert loaded.capture["one_mode"] == "eval"
    for _ in range(3):
        assert torch.equal(loaded(x), pm(x))
    assert torch.equal(loaded.graph_module.ema, torch.zeros(4))
    model = _TrainsItsBufferInTheRootForward()
    with pytest.warns(UserWarning, match="self.training"):
        pbp_fx.load(path, model)
    assert model.training  # the caller's model keeps its mode


class _EncoderWithFunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.drop = nn.Linear(4, 4), nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(F.dropout(torch.relu(self.l(x)), 0.5, self.training))


class _FrozenEncoderUnderAHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.head = _EncoderWithFunctionalDropout(), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.enc(x))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_model_captured_in_mixed_modes_is_rebuilt_in_those_modes(tmp_path, frontend, recwarn):
    """A frozen encoder in eval mode (its own dropout layer back in train mode, MC dropout) under a training head
    holds its functional dropout as it was (off); loaded through a build function (all in train mode) the rebuilt
    graph held it on, and the loaded model differed from the saved. The nested mode was lost next."""
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    model = _FrozenEncoderUnderAHead()
    model.enc.eval()
    model.enc.drop.train()
    with pytest.warns(UserWarning, match="mode-dependent code inside it"):
        pm = pbp_fx.perforate(model, (x,), frontend=frontend)
    assert pm.capture["module_modes"] == {"": True, "enc": False, "enc.drop": True}
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    recwarn.clear()
    loaded = pbp_fx.load(path, _FrozenEncoderUnderAHead)
    assert not [w for w in recwarn if "mode-dependent code" in str(w.message)]  # (said at perforate, not again)
    for training in (True, False):
        loaded.train(training), pm.train(training)
        with torch.no_grad():
            torch.manual_seed(1)
            want = pm(x)
            torch.manual_seed(1)
            torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
    mixed = _FrozenEncoderUnderAHead()
    mixed.enc.eval()
    pbp_fx.load(path, mixed)
    assert [m.training for m in mixed.modules()] == [True, False, False, False, True]  # the caller's modules keep theirs


@pytest.mark.parametrize("other", [dict(activation="tanh"), dict(mode="gd"), dict(activation="relu", mode="gd")])
def test_a_checkpoint_loaded_onto_a_model_with_another_activation_or_mode_is_refused(tmp_path, other):
    """Loaded onto perforate(..., activation="tanh"), a sigmoid-dendrite checkpoint loaded without a
    word and computed other outputs (1.3 off the saved model)."""
    pm, _ = _trained_pm()
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    target = pbp_fx.perforate(_build(), (X,), **other)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    what = "activation" if "activation" in other else "mode"
    with pytest.raises(pbp_fx.CheckpointError, match=rf"was trained with {what} '(sigmoid|pb)', but this model is "
                                                     rf"perforated with {what} '{other[what]}': perforate with"):
        pbp_fx.load(path, target)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing loaded
    assert torch.equal(pbp_fx.load(path, _build).eval()(X), pm.eval()(X))  # a build function rebuilds it as saved


def test_loading_an_optimizer_from_a_checkpoint_without_its_state_is_refused(tmp_path):
    """load(path, pm, optimizer=opt) of a checkpoint saved without optimizer= left opt fresh, silently."""
    pm, opt = _trained_pm()
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    fresh = torch.optim.Adam(pm.parameters())
    with pytest.raises(pbp_fx.CheckpointError, match=r"has no optimizer state \(saved without optimizer=\): load it "
                                                     r"without optimizer="):
        pbp_fx.load(path, pm, optimizer=fresh)
    from pbp_fx.checkpoint import load_optimizer

    with pytest.raises(pbp_fx.CheckpointError, match=r"has no optimizer state"):
        load_optimizer(path, fresh)


def test_a_pool_changed_on_a_mid_phase_resume_says_it_applies_from_the_next_phase(tmp_path):
    """'the run continues with: pool 2 -> 3' while the pools of the phase under way stayed at 2."""
    pm = pbp_fx.perforate(_build(), (X,))
    ctl = PhaseController(pm, pbp_fx.PBConfig(pool=2, patience=1, improvement=10.0))
    ctl.step(0.5), ctl.step(0.5)
    assert pm.phase == "dendrite"
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path, controller=ctl, optimizer=ctl.optimizer)
    again = pbp_fx.load(path, _build)
    with pytest.warns(UserWarning, match=r"pool 2 -> 3 \(a dendrite phase under way keeps the candidates and "
                                         r"statistics it started with: the candidate settings apply from the next"):
        pbp_fx.load(path, again, controller=PhaseController(again, pbp_fx.PBConfig(pool=3, patience=1,
                                                                                  improvement=10.0)))
    assert all(s.candidates.pool_size == 2 for s in again.sites.values())
    with pytest.warns(UserWarning) as record:  # another setting: no note on candidates
        pbp_fx.load(path, again, controller=PhaseController(again, pbp_fx.PBConfig(pool=2, patience=3,
                                                                                  improvement=10.0)))
    assert "patience 1 -> 3" in str(record[0].message) and "under way" not in str(record[0].message)


def test_a_controller_loaded_without_the_optimizer_state_the_file_holds_is_warned_of(tmp_path):
    """load(controller=ctl) left the saved Adam state out in silence: the resumed run was not the uninterrupted
    one (a reviewer)."""
    pm = pbp_fx.perforate(_build(), (X,))
    ctl = PhaseController(pm, pbp_fx.PBConfig(pool=2))
    _steps(pm, 2)
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path, controller=ctl, optimizer=ctl.optimizer)
    again = pbp_fx.load(path, _build)
    ctl = PhaseController(again, pbp_fx.PBConfig(pool=2))
    with pytest.warns(pbp_fx.PBWarning, match=r"holds the optimizer's state, which load\(controller=\) alone leaves "
                                             r"out: pass optimizer=ctl.optimizer too"):
        pbp_fx.load(path, again, controller=ctl)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pbp_fx.PBWarning)
        pbp_fx.load(path, again, controller=ctl, optimizer=ctl.optimizer)
        pbp_fx.save(again, path, controller=ctl)  # (a file without it: nothing to leave out)
        pbp_fx.load(path, again, controller=ctl)


def test_another_optimizer_class_is_refused_before_anything_loads(tmp_path):
    """An Adam checkpoint loaded into an SGD without error; its next step failed on 'momentum'."""
    pm, opt = _trained_pm()
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path, optimizer=opt)
    target = pbp_fx.perforate(_build(), (X,))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    sgd = torch.optim.SGD(target.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(pbp_fx.CheckpointError, match=rf"holds {type(opt).__name__} optimizer state, which this SGD "
                                                     r"cannot take"):
        pbp_fx.load(path, target, optimizer=sgd)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())

    class MyAdam(torch.optim.Adam):
        """A subclass (or a wrapper) of the saved class keeps its state layout."""

    again = pbp_fx.load(path, _build)
    mine = MyAdam(list(again.trainable_parameters()), 1e-2)
    pbp_fx.load(path, again, optimizer=mine)
    assert len(mine.state) == len(opt.state)


def test_a_compiled_model_is_refused_naming_the_perforated_model_inside_and_load_into_a_new_model_takes_no_optimizer(
        tmp_path):
    """save(torch.compile(pm)) and PhaseController(torch.compile(pm)) said "perforate it first"; load(path,
    build, optimizer=opt) restored opt, which holds the parameters of no model that load returns."""
    pm, opt = _trained_pm()
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path, optimizer=opt)
    compiled = torch.compile(pm)
    with pytest.raises(pbp_fx.CheckpointError, match=r"got OptimizedModule: it wraps a PerforatedModel: pass that "
                                                     r"\(model._orig_mod\)"):
        pbp_fx.save(compiled, path)
    with pytest.raises(pbp_fx.ConfigError, match=r"got OptimizedModule: it wraps a PerforatedModel: pass that"):
        pbp_fx.PhaseController(compiled)
    with pytest.raises(pbp_fx.CheckpointError, match=r"load makes a new model from a base model or build function: "
                                                     r"pm = pbp_fx.load\(path, build\), then build the optimizer"):
        pbp_fx.load(path, _build, optimizer=opt)
    with pytest.raises(pbp_fx.CheckpointError, match=r"got OptimizedModule: it wraps a PerforatedModel: pass that"):
        pbp_fx.load(path, compiled)
    pbp_fx.load(path, pm, optimizer=opt)  # (into the model the optimizer trains: restored)


def test_a_checkpoint_loaded_into_a_model_with_another_forward_is_warned_of(tmp_path):
    """Sites of the same shapes, another activation between them: the weights loaded silently into
    another function (max output difference 0.73)."""
    def mlp(act):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), act(), torch.nn.Linear(8, 3))

    pm = pbp_fx.perforate(mlp(torch.nn.ReLU), (torch.randn(2, 6),))
    pm.grow()
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pbp_fx.load(path, lambda: mlp(torch.nn.ReLU))
    with pytest.warns(UserWarning, match=r"was saved from a model whose graph differs from this one's at op 2: ReLU "
                                         r"there, Tanh here \(another activation or forward\?\)"):
        pbp_fx.load(path, lambda: mlp(torch.nn.Tanh))
    with warnings.catch_warnings():  # the caller's inputs of the saved pattern (another batch size, float64)
        warnings.simplefilter("error")
        pbp_fx.load(path, lambda: mlp(torch.nn.ReLU), (torch.randn(3, 6),))
        pbp_fx.load(path, lambda: mlp(torch.nn.ReLU), (torch.randn(3, 6, dtype=torch.float64),))
    # ... capture the saved graph: compared too (`pbp-fx export` passes the model file's inputs)
    with pytest.warns(UserWarning, match=r"graph differs from this one's at op 2: ReLU there, Tanh here"):
        pbp_fx.load(path, lambda: mlp(torch.nn.Tanh), (torch.randn(3, 6),))


class _Masked(torch.nn.Module):
    def __init__(self, act):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.act, self.b = torch.nn.Linear(6, 8), act(), torch.nn.Linear(8, 3)

    def forward(self, x, mask=None):
        h = self.act(self.a(x))
        return self.b(h if mask is None else h * mask)


def test_inputs_of_another_pattern_capture_another_graph_on_purpose_and_are_not_compared(tmp_path):
    """A subset of a model's keyword inputs (a Hugging Face model without its labels) captures fewer ops:
    no warning, though the saved graph had more."""
    pm = pbp_fx.perforate(_Masked(torch.nn.ReLU), (torch.randn(2, 6),), example_kwargs={"mask": torch.ones(2, 8)})
    pm.grow()
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pbp_fx.load(path, lambda: _Masked(torch.nn.ReLU), (torch.randn(3, 6),))
    with pytest.warns(UserWarning, match=r"graph differs from this one's at op 2: ReLU there, Tanh here"):
        pbp_fx.load(path, lambda: _Masked(torch.nn.Tanh), (torch.randn(3, 6),), example_kwargs={"mask": torch.ones(3, 8)})


class _BranchingRoot(nn.Module):
    """An untraceable root whose branch depends on the input's values (inputs in [0, 1], say)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Sequential(nn.Linear(5, 8), nn.ReLU()), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) if x.mean() > 0.5 else self.c(h)


def test_a_root_that_branches_on_values_is_not_called_another_model_on_stand_ins(tmp_path):
    """load's stand-in inputs took the other branch, so other parts were captured: it said the checkpoint
    'belongs to another model'. It names the stand-ins and example_inputs=, with which it loads exactly."""
    torch.manual_seed(0)
    x = torch.rand(4, 5) + 0.3
    with pytest.warns(UserWarning):
        pm = pbp_fx.perforate(_BranchingRoot(), (x,))
    pm.grow()
    pm.eval()
    path = str(tmp_path / "root.safetensors")
    pbp_fx.save(pm, path)
    with pytest.warns(UserWarning), pytest.raises(pbp_fx.CheckpointError, match=(
            r"_BranchingRoot's root forward is Python that ran on load's stand-in inputs .*site 'b' .*missing here"
            r".*pass example_inputs=")) as err:
        pbp_fx.load(path, _BranchingRoot)
    assert "another model" not in str(err.value) and "\n" not in str(err.value)
    with pytest.warns(UserWarning):
        again = pbp_fx.load(path, _BranchingRoot, example_inputs=(x,))
    assert torch.equal(again.eval()(x), pm(x))


def test_extra_keeps_its_keys_as_given(tmp_path):
    """extra={"scheduler": MultiStepLR.state_dict()} (the README's recipe; milestones {50: 1, 100: 1}) or
    an idx_to_class map: the checksum sorted the int keys as numbers on save and as strings on load,
    so the file just written read as 'corrupted'; one that loaded gave the keys back as strings,
    and the resumed MultiStepLR never decayed."""
    from pbp_fx.checkpoint import read_extra, read_meta

    pm = pbp_fx.perforate(_build(), (X,))
    opt = torch.optim.SGD(pm.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 10], gamma=0.1)
    extra = {"scheduler": sched.state_dict(), "idx_to_class": {i: f"c{i}" for i in range(11)},
             "mixed": {1.5: [None, {True: "t"}], None: 0, "s": 1}, "items": {"__pbp_fx_items__": 3}}
    path = pbp_fx.save(pm, str(tmp_path / "m.safetensors"), extra=extra)
    back = read_extra(path)
    assert back["idx_to_class"] == extra["idx_to_class"] and back["mixed"] == extra["mixed"]
    assert back["items"] == extra["items"] and read_meta(path)["extra"]["idx_to_class"][10] == "c10"
    pbp_fx.load(path, pbp_fx.perforate(_build(), (X,)))  # (not "corrupted")
    resumed = torch.optim.lr_scheduler.MultiStepLR(torch.optim.SGD(pm.parameters(), lr=0.1), milestones=[99])
    resumed.load_state_dict(back["scheduler"])
    for _ in range(3):
        resumed.optimizer.step()
        resumed.step()
    assert resumed.get_last_lr() == pytest.approx([0.01])  # (decayed at epoch 2)
    with pytest.raises(CheckpointError, match=r"extra\['pairs'\] has a key of type tuple \(\(1, 2\)\): a checkpoint "
                                              r"keeps str, int, float, bool and None keys"):
        pbp_fx.save(pm, str(tmp_path / "n.safetensors"), extra={"pairs": {(1, 2): 3}})
    assert not (tmp_path / "n.safetensors").exists()


class _SetKeeper(torch.optim.SGD):
    """An optimizer whose state holds a value JSON cannot hold (a set)."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["seen"] = {1, 2}
        return super().step(closure)


def test_state_a_checkpoint_cannot_store_is_named_where_it_is(tmp_path):
    """The refusal had said 'pass plain values in extra=', which had not been given."""
    pm = pbp_fx.perforate(_build(), (X,))
    ctl = PhaseController(pm, optimizer=_SetKeeper(pm.parameters(), lr=0.1))
    F.cross_entropy(pm(X), Y).backward()
    ctl.optimizer.step()
    path = str(tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"^the _SetKeeper optimizer's state holds values a checkpoint cannot "
                                              r"store \(.*set.*\): save without optimizer= and keep its state with "
                                              r"torch.save"):
        pbp_fx.save(pm, path, controller=ctl, optimizer=ctl.optimizer)
    with pytest.raises(CheckpointError, match=r"^extra= holds a value a checkpoint cannot store \(Object of type "
                                              r"Tensor .*\): pass plain values"):
        pbp_fx.save(pm, path, controller=ctl, extra={"w": torch.ones(2)})
    assert not os.path.exists(path)
    pbp_fx.save(pm, path, controller=ctl)


def _lbfgs_run(pm, ctl, epochs, scores):
    """`epochs` LBFGS steps on fixed data, each followed by ctl.step with the next score."""
    data = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=data), torch.randint(0, 3, (32,), generator=data)

    def closure():
        ctl.optimizer.zero_grad()
        loss = F.cross_entropy(pm(x), y)
        loss.backward()
        return loss

    for _ in range(epochs):
        ctl.optimizer.step(closure)
        ctl.step(next(scores))


def test_lbfgs_state_lists_of_tensors_round_trip_and_resume_exactly(tmp_path):
    """LBFGS keeps its curvature history as lists of tensors: save refused them (JSON), so a run
    trained with LBFGS could not be resumed with its optimizer state."""
    def fresh():
        torch.manual_seed(3)
        pm = pbp_fx.perforate(_build(), (X,))
        ctl = PhaseController(pm, optimizer=torch.optim.LBFGS(pm.parameters(), lr=0.1, history_size=3),
                              patience=1, max_dendrites=1, warmup=1, max_dendrite_epochs=6)
        return pm, ctl

    scores = [0.5, 0.6, 0.4, 0.4] + [0.1] * 20
    pm, ctl = fresh()
    it = iter(scores)
    _lbfgs_run(pm, ctl, 2, it)
    assert pm.phase == "neuron"
    state = copy.deepcopy(ctl.optimizer.state_dict()["state"][0])  # (LBFGS appends to its lists in place)
    assert isinstance(state["old_dirs"], list) and state["old_dirs"]
    path = str(tmp_path / "lbfgs.safetensors")
    pbp_fx.save(pm, path, controller=ctl, optimizer=ctl.optimizer)
    _lbfgs_run(pm, ctl, 8, it)  # through a dendrite phase, its installation and the next round's start

    pm2, ctl2 = fresh()
    pbp_fx.load(path, pm2, controller=ctl2, optimizer=ctl2.optimizer)
    back = ctl2.optimizer.state_dict()["state"][0]
    assert len(back["old_dirs"]) == len(state["old_dirs"])
    assert all(torch.equal(a, b) for a, b in zip(back["old_dirs"], state["old_dirs"]))
    # A pbp-fx that reads format 2 only loaded placeholders for the nested tensors: this file
    # says it is another format, which that one refuses; one without nested state stays format 2.
    assert read_meta(path)["format"] == "pbp-fx-checkpoint/3"
    pbp_fx.save(pm, str(tmp_path / "model_only.safetensors"), controller=ctl)
    assert read_meta(str(tmp_path / "model_only.safetensors"))["format"] == FORMAT == "pbp-fx-checkpoint/2"
    _lbfgs_run(pm2, ctl2, 8, iter(scores[2:]))
    assert any(h["note"].startswith("installed dendrite") for h in ctl.history)
    assert ctl2.history == ctl.history
    for (name, a), b in zip(pm.state_dict().items(), pm2.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_a_format_this_pbp_fx_does_not_know_is_refused_in_one_line(tmp_path):
    import json
    from safetensors.torch import load_file, save_file

    pm = pbp_fx.perforate(_build(), (X,))
    path = str(tmp_path / "m.safetensors")
    pbp_fx.save(pm, path)
    meta = read_meta(path)
    meta["format"] = "pbp-fx-checkpoint/9"
    save_file(load_file(path), str(tmp_path / "newer.safetensors"), metadata={"pbp_fx": json.dumps(meta)})
    with pytest.raises(CheckpointError, match=r"newer.safetensors has format 'pbp-fx-checkpoint/9', expected one "
                                              r"of 'pbp-fx-checkpoint/1', 'pbp-fx-checkpoint/2', "
                                              r"'pbp-fx-checkpoint/3': not a checkpoint of this pbp-fx \(a newer "
                                              r"pbp-fx's\? upgrade pbp-fx\)$"):
        pbp_fx.load(str(tmp_path / "newer.safetensors"), _build)


def test_a_controller_whose_phase_is_not_the_models_is_not_saved(tmp_path):
    """The model put in a dendrite phase by hand under a neuron-phase controller was saved, and no
    controller could load that state back."""
    pm = pbp_fx.perforate(_build(), (X,))
    ctl = PhaseController(pm)
    pm.start_dendrite_phase(pool=2)
    path = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointError, match=r"^save\(controller=\): the model is in a dendrite phase but its "
                                              r"PhaseController is in a neuron phase"):
        pbp_fx.save(pm, str(path), controller=ctl)
    assert not path.exists()


def test_a_dendrite_phase_optimizer_state_without_its_controller_is_refused_before_the_model_changes(tmp_path):
    """load(optimizer=) without controller= gave an optimizer over the model's weights the candidates'
    state and candidate_lr (equal group sizes: silently), or failed after the model had changed."""
    pm, saved_opt = _trained_pm("dendrite")
    path = str(tmp_path / "d.safetensors")
    pbp_fx.save(pm, path, optimizer=saved_opt)
    target = pbp_fx.perforate(_build(), (X,))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    opt = torch.optim.Adam(target.parameters(), 1e-3)
    with pytest.raises(CheckpointError, match=r"saved inside a dendrite phase, where the optimizer trains the "
                                              r"candidates, which the model does not have before the load: load it "
                                              r"with its controller"):
        pbp_fx.load(path, target, optimizer=opt)
    assert target.phase == "neuron" and not opt.state and opt.param_groups[0]["lr"] == 1e-3
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())
    pbp_fx.load(path, target)  # the fix it names: the structure first, then an optimizer over it
    opt = torch.optim.Adam(target.trainable_parameters(), 1e-3)
    pbp_fx.checkpoint.load_optimizer(path, opt)
    assert all(torch.equal(opt.state[p]["exp_avg"], saved_opt.state[q]["exp_avg"])
               for p, q in zip(target.trainable_parameters(), pm.trainable_parameters()))


def test_an_own_optimizer_over_other_parameters_than_the_saved_one_is_refused_before_the_model_changes(tmp_path):
    """load(optimizer=) without controller=, of a checkpoint with dendrites, into an optimizer built over the fresh
    model: torch's "doesn't match the size of optimizer's group", after the model had taken the dendrites (a
    reviewer)."""
    pm, saved_opt = _trained_pm("neuron")  # (one dendrite per site: more trainable parameters than a fresh model)
    path = str(tmp_path / "n.safetensors")
    pbp_fx.save(pm, path, optimizer=saved_opt)
    target = pbp_fx.perforate(_build(), (X,))
    opt = torch.optim.Adam(target.trainable_parameters(), 1e-3)
    with pytest.raises(CheckpointError, match=r"holds the state of an optimizer over \d+ parameters, and this one "
                                              r"holds \d+ .*load it without optimizer=, then pbp_fx.rebind_optimizer"):
        pbp_fx.load(path, target, optimizer=opt)
    assert target.dendrites == 0 and not opt.state
    pbp_fx.load(path, target)  # (the steps it names)
    pbp_fx.rebind_optimizer(opt, target.trainable_parameters())
    pbp_fx.checkpoint.load_optimizer(path, opt)
    assert all(torch.equal(opt.state[p]["exp_avg"], saved_opt.state[q]["exp_avg"])
               for p, q in zip(target.trainable_parameters(), pm.trainable_parameters()))


def test_nested_state_tensors_never_share_a_name(tmp_path):
    """{"h": [[t1]], "h/0": [t2]} came back with h holding t2 (both named by their key path)."""
    pm = pbp_fx.perforate(_build(), (X,))
    opt = torch.optim.SGD(pm.parameters(), lr=0.1)
    p = next(iter(pm.parameters()))
    t1, t2 = torch.ones(2), torch.full((3,), 2.0)
    opt.state[p] = {"h": [[t1]], "h/0": [t2], "plain": {"__pbp_fx_tensor__": 5}}  # (no name: kept)
    path = str(tmp_path / "n.safetensors")
    pbp_fx.save(pm, path, optimizer=opt)
    back = torch.optim.SGD(pm.parameters(), lr=0.1)
    pbp_fx.checkpoint.load_optimizer(path, back)
    state = back.state[p]
    assert torch.equal(state["h"][0][0], t1) and torch.equal(state["h/0"][0], t2)
    assert state["plain"] == {"__pbp_fx_tensor__": 5}


class _Packed(nn.Module):
    """An untraceable root (pack_padded_sequence): its parts are captured in place, and its Python
    runs on load's stand-in lengths (zeros), which pack_padded_sequence refuses."""

    def __init__(self):
        super().__init__()
        self.emb, self.lstm, self.fc = nn.Embedding(30, 8), nn.LSTM(8, 6, batch_first=True), nn.Linear(6, 3)

    def forward(self, ids, lengths):
        from torch.nn.utils.rnn import pack_padded_sequence

        packed = pack_padded_sequence(self.emb(ids), lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return self.fc(h[-1])


def test_a_model_that_does_not_capture_on_stand_ins_is_told_to_pass_its_inputs(tmp_path):
    """load(path, build) raised 'cannot trace _Packed.forward ... move it into a submodule', which
    said nothing of the inputs; with example_inputs it loads."""
    inputs = (torch.randint(1, 30, (4, 10)), torch.tensor([10, 7, 5, 3]))
    pm = pbp_fx.perforate(_Packed(), inputs)
    path = str(tmp_path / "p.safetensors")
    pbp_fx.save(pm, path)
    with pytest.raises(CheckpointError, match=r"_Packed does not run on stand-ins of the inputs recorded with it "
                                              r"\(.*\): pass example_inputs= \(and example_kwargs=\) that it runs on"):
        pbp_fx.load(path, _Packed)
    assert torch.equal(pbp_fx.load(path, _Packed, inputs)(*inputs), pm(*inputs))


def test_load_does_not_say_again_what_perforate_said_of_a_dropped_buffer_write(tmp_path, recwarn):
    """pbp-fx export of such a run warned again, with advice (frontend='export') it could not take."""
    x = torch.randn(4, 5)
    with pytest.warns(UserWarning, match=r"writes buffer\(s\) steps"):
        pm = pbp_fx.perforate(CountsSteps(), (x,))
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    recwarn.clear()
    pbp_fx.load(path, CountsSteps)
    assert not [w for w in recwarn if "writes buffer" in str(w.message)]


def test_the_checkpoint_module_the_readme_names_is_reached_from_the_package_in_a_fresh_process():
    """`pbp_fx.checkpoint.read_extra` (the README's resume recipe) raised AttributeError until
    something had imported the submodule."""
    import subprocess
    import sys

    code = "import pbp_fx; print(pbp_fx.checkpoint.read_extra.__name__, pbp_fx.compare.__name__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["read_extra", "compare"], r.stderr[-500:]


def test_optimizer_state_comes_back_in_its_parameters_memory_layout(tmp_path):
    """Stored contiguous, Adam's moments came back so beside a channels_last weight, and the fused
    CPU Adam paired other elements: the resumed run drifted (0.0056 after 5 steps)."""
    x = torch.rand(16, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (16,))

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
        pm = pbp_fx.perforate(model, (x[:2],)).to(memory_format=torch.channels_last)
        return pm, pbp_fx.PhaseController(pm, optimizer_factory=lambda p: torch.optim.Adam(p, lr=1e-2, fused=True))

    def steps(pm, optimizer, n):
        for _ in range(n):
            loss = F.cross_entropy(pm(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    a, ctl_a = build()
    steps(a, ctl_a.optimizer, 3)
    path = str(tmp_path / "cl.safetensors")
    pbp_fx.save(a, path, controller=ctl_a, optimizer=ctl_a.optimizer)
    b, ctl_b = build()
    pbp_fx.load(path, b, controller=ctl_b, optimizer=ctl_b.optimizer)
    steps(a, ctl_a.optimizer, 5)
    steps(b, ctl_b.optimizer, 5)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_an_optimizer_with_other_param_groups_is_refused_before_anything_loads(tmp_path):
    """torch refused it after the model and the controller had loaded (the model in the saved
    dendrite phase, the controller at the saved epoch, the optimizer fresh)."""
    def build(two_groups):
        torch.manual_seed(0)
        pm = pbp_fx.perforate(_build(), (X,))
        factory = (lambda p: torch.optim.Adam([{"params": [q for q in p if q.ndim > 1]},
                                               {"params": [q for q in p if q.ndim <= 1]}])) if two_groups else None
        return pm, pbp_fx.PhaseController(pm, pbp_fx.PBConfig(patience=1), optimizer_factory=factory)

    pm, ctl = build(True)
    for score in (0.1, 0.2, 0.2, 0.2):
        ctl.step(score)
    assert pm.phase == "dendrite"
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path, controller=ctl, optimizer=ctl.optimizer)
    fresh, fresh_ctl = build(False)
    with pytest.raises(pbp_fx.CheckpointError, match="optimizer with 2 parameter group.*this one has 1"):
        pbp_fx.load(path, fresh, controller=fresh_ctl, optimizer=fresh_ctl.optimizer)
    assert fresh.phase == "neuron" and fresh_ctl.epoch == 0


class _IndexedTable(nn.Module):
    """A parameter indexed by a view of a buffer (MaxViT's relative-position bias: fx takes the index
    for a constant), and dropout that follows the mode inside the graph."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.table = nn.Parameter(torch.randn(7, 4))
        self.register_buffer("index", torch.arange(16).remainder(7).view(4, 4))

    def forward(self, x):
        return F.dropout(self.fc(x), 0.1, self.training) + self.table[self.index.view(-1)].view(4, 4, 4).sum(-1)


@pytest.mark.parametrize("saved_in", ["eval", "train"])
def test_a_checkpoint_loads_whatever_mode_the_model_was_perforated_in(tmp_path, saved_in):
    """fx's tensor constants were in the state dict under numbers that depend on how many captures
    ran before (the model's mode): perforated in eval mode, the checkpoint refused a fresh model in
    train mode ('Missing key(s) ... _tensor_constant0 ... the model differs from the one saved')."""
    x = torch.randn(2, 4, 4)
    torch.manual_seed(0)
    source = _IndexedTable().eval() if saved_in == "eval" else _IndexedTable()
    pm = pbp_fx.perforate(source, (x,))
    assert not any("_tensor_constant" in k for k in pm.state_dict())
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    for build in (_IndexedTable, lambda: _IndexedTable().eval()):
        again = pbp_fx.load(path, build).eval()
        torch.testing.assert_close(again(x), pm.eval()(x))
    # A state saved while the constants were in it (an earlier pbp-fx) still loads; a key of that
    # form the model holds no constant under is still refused.
    constants = [n for n in pm.graph_module._non_persistent_buffers_set if n.startswith("_tensor_constant")]
    assert constants
    pm.load_state_dict({**pm.state_dict(), **{f"graph_module.{n}": torch.zeros(16) for n in constants}})
    with pytest.raises(RuntimeError, match="Unexpected key.*_tensor_constant99"):
        pm.load_state_dict({**pm.state_dict(), "graph_module._tensor_constant99": torch.zeros(16)})


def test_a_buffer_of_the_users_named_like_an_fx_constant_stays_state():
    """Every buffer named `_tensor_constantN` was taken for fx's: the user's own left the state dict."""
    class Offset(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.register_buffer("_tensor_constant0", torch.ones(3))

        def forward(self, x):
            return self.fc(x) + self._tensor_constant0

    pm = pbp_fx.perforate(Offset(), (torch.randn(2, 4),), frontend="fx")
    assert "graph_module._tensor_constant0" in pm.state_dict()


def test_a_model_whose_other_tensors_differ_in_shape_is_refused_in_one_line_and_left_as_it_was(tmp_path):
    """Another vocabulary: torch's two-line size-mismatch error, raised after every tensor that fit had been
    copied into the model given."""
    class Tagger(nn.Module):
        def __init__(self, vocab):
            super().__init__()
            self.emb, self.fc = nn.Embedding(vocab, 8), nn.Linear(8, 4)

        def forward(self, ids):
            return self.fc(self.emb(ids))

    ids = torch.randint(0, 50, (2, 5))
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pbp_fx.perforate(Tagger(50), (ids,)), path)
    target = pbp_fx.perforate(Tagger(60), (ids,))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(pbp_fx.CheckpointError, match=r"does not fit this model: graph_module.emb.weight is \[50, 8\] "
                                                     r"there and \[60, 8\] here") as err:
        pbp_fx.load(path, target)
    assert "\n" not in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


class _WithHead(nn.Module):
    """A perforated backbone beside a head of the user's own (PhaseController(root=...))."""

    def __init__(self):
        super().__init__()
        self.backbone = pbp_fx.perforate(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)),
                                         (torch.randn(2, 6),))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.backbone(x)))


def test_a_controllers_root_keeps_its_layers_outside_the_perforated_model_through_save_and_load(tmp_path):
    """pbp_fx.save(net.backbone, controller=ctl) as the README's loop saves kept the head's Adam moments and its
    best weights, not its weights: a resumed run restarted the head from its initial weights and diverged,
    silently (a reviewer)."""
    torch.manual_seed(0)
    net = _WithHead()
    ctl = pbp_fx.PhaseController(net.backbone, pbp_fx.PBConfig(), root=net,
                                 optimizer=torch.optim.Adam(net.parameters(), lr=1e-2))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        ctl.optimizer.zero_grad()
        loss.backward()
        ctl.optimizer.step()
    ctl.step(0.5)
    path = str(tmp_path / "ck.safetensors")
    pbp_fx.save(net.backbone, path, controller=ctl, optimizer=ctl.optimizer)
    torch.manual_seed(1)
    again = _WithHead()
    ctl2 = pbp_fx.PhaseController(again.backbone, pbp_fx.PBConfig(), root=again,
                                  optimizer=torch.optim.Adam(again.parameters(), lr=1e-2))
    pbp_fx.load(path, again.backbone, controller=ctl2, optimizer=ctl2.optimizer)
    for a, b in zip(net.parameters(), again.parameters()):
        assert torch.equal(a, b)
    torch.testing.assert_close(again(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize("phase", ["neuron", "dendrite"])
def test_a_layer_frozen_by_the_loop_stays_frozen_in_a_resumed_run(tmp_path, phase):
    """The README's freeze-then-rebind: the checkpoint recorded no requires_grad, so the resumed
    optimizer held the frozen weight too and load(optimizer=) failed on torch's group size."""
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()

    def build():
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))

    config = pbp_fx.PBConfig(patience=2, improvement=0.05, max_dendrites=1, dendrite_patience=2, max_dendrite_epochs=3,
                             pool=2, retries=0, warmup=1)

    def run(epochs, resume=None, start=0, save_after=None):
        torch.manual_seed(0)
        pm = pbp_fx.perforate(build(), x[:4])
        ctl = PhaseController(pm, config, optimizer_factory=lambda p: torch.optim.Adam(p, lr=1e-2))
        if resume:
            pbp_fx.load(resume, pm, controller=ctl, optimizer=ctl.optimizer)
        for epoch in range(start, epochs):
            if epoch == 1:
                pm.graph_module.get_submodule("0").weight.requires_grad_(False)
                ctl.rebind(keep_state=True)
            for i in range(0, 256, 64):
                loss = F.cross_entropy(pm(x[i:i + 64]), y[i:i + 64])
                ctl.optimizer.zero_grad()
                loss.backward()
                ctl.optimizer.step()
            with torch.no_grad():
                score = (pm.eval()(x).argmax(1) == y).float().mean().item()
            pm.train()
            ctl.step(score)
            if epoch + 1 == save_after:
                pbp_fx.save(pm, str(tmp_path / "run.safetensors"), controller=ctl, optimizer=ctl.optimizer)
                return pm, ctl
        return pm, ctl

    whole, whole_ctl = run(14)
    started = next(i for i, h in enumerate(whole_ctl.history) if "dendrite phase started" in h["note"])
    at = 3 if phase == "neuron" else started + 2  # (epochs done: the layer was frozen after the first)
    saved, _ = run(14, save_after=at)
    assert saved.phase == phase
    assert saved.frozen_parameters() == ["graph_module.0.weight"]
    again, again_ctl = run(14, resume=str(tmp_path / "run.safetensors"), start=at)
    assert [h["note"] for h in again_ctl.history] == [h["note"] for h in whole_ctl.history]
    assert any(h["note"].startswith("installed dendrite") for h in whole_ctl.history)
    for (name, a), b in zip(whole.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert not again.graph_module.get_submodule("0").weight.requires_grad
    # Loaded for use, the model has the run's flags too; flags the caller set stay (a diff reviewer: load thawed a
    # model frozen for inference)
    loaded = pbp_fx.load(str(tmp_path / "run.safetensors"), build())
    assert loaded.frozen_parameters() == ["graph_module.0.weight"]
    frozen = build().requires_grad_(False)
    reloaded = pbp_fx.load(str(tmp_path / "run.safetensors"), frozen)
    assert not any(p.requires_grad for n, p in reloaded.named_parameters() if "pbp_sites" not in n)


class _MakesConstants(nn.Module):
    """Tensors made in forward (BART's decoder start id in shift_tokens_right): torch.export lifts them
    into buffers named by the capture, lifted_tensor_0 at one place with labels and another without."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, labels=None):
        out = self.fc(x) * torch.tensor(2.0)
        if labels is None:
            return out
        return out, (out - labels).pow(2).mean() + torch.tensor(1.0)


def test_a_model_trained_with_labels_reloads_without_them(tmp_path):
    """Both documented routes to a no-labels model (pbp_fx.load with example_kwargs, perforate + load_state_dict)
    were refused for T5, BART and Whisper: 'the model differs from the one saved', over a lifted constant."""
    torch.manual_seed(0)
    x, y = torch.randn(3, 4), torch.randn(3, 3)
    pm = pbp_fx.perforate(_MakesConstants(), (x,), example_kwargs={"labels": y}, frontend="export")
    pm.grow()
    with torch.no_grad():
        for site in pm.sites.values():
            site.out_weight.normal_()
    assert any("lifted_tensor" in n for n, _ in pm.named_buffers())
    assert not any("lifted_tensor" in k for k in pm.state_dict())  # (a constant of the capture, no state)
    pbp_fx.save(pm, str(tmp_path / "run.safetensors"))
    want = pm.eval()(x, labels=y)[0]
    loaded = pbp_fx.load(str(tmp_path / "run.safetensors"), _MakesConstants(), (x,)).eval()
    assert torch.equal(loaded(x), want)
    again = pbp_fx.perforate(_MakesConstants(), (x,), frontend="export")
    state = {**pm.state_dict(), "graph_module.lifted_tensor_1": torch.tensor(1.0)}  # (saved by pbp-fx before)
    assert not again.load_state_dict(state).unexpected_keys
    assert torch.equal(again.eval()(x), want)
    pm.graph_module._non_persistent_buffers_set.clear()  # (as pbp-fx before stop 49 saved it: constants kept)
    pbp_fx.save(pm, str(tmp_path / "older.safetensors"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "older.safetensors"), "pt") as f:
        assert any(k.endswith("lifted_tensor_0") for k in f.keys()), list(f.keys())
    older = pbp_fx.load(str(tmp_path / "older.safetensors"), _MakesConstants(), (x,)).eval()
    assert torch.equal(older(x), want)


class _CacheWithoutLabels(nn.Module):
    """Returns an object torch.export cannot flatten when no labels are given (as BART returns its cache)."""

    class Cache:
        def __init__(self, t):
            self.t = t

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x, labels=None):
        out = self.fc(x)
        if labels is None:
            return out, self.Cache(out)
        return F.cross_entropy(out, labels)


def test_a_load_whose_capture_fails_on_the_inputs_given_says_that_load_captures_as_saved(tmp_path):
    """pbp_fx.load(path, model, example_kwargs=<no labels>) of an export capture ended in torch.export's advice
    to 'use frontend auto', which load does not take (BART: the cache returned without labels)."""
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    pm = pbp_fx.perforate(_CacheWithoutLabels(), example_kwargs={"x": x, "labels": y}, frontend="export")
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    with pytest.raises(pbp_fx.TraceError, match=r"was captured with frontend 'export', which load takes again, and on "
                                                r"the inputs given it fails: .*give inputs on which it works \(none: "
                                                r"the recorded ones\)"):
        pbp_fx.load(path, _CacheWithoutLabels(), example_kwargs={"x": x})
    pbp_fx.load(path, _CacheWithoutLabels())  # the recorded inputs


class _Untraceable(nn.Module):
    def __init__(self, extra=False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        if extra:
            self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        if float(x.sum()) > 1e9:  # data-dependent: captured in parts
            return x
        out = self.body(x)
        return out * self.scale if hasattr(self, "scale") else out


def test_a_parts_checkpoint_that_does_not_fit_names_a_changed_setting_too(tmp_path):
    """A setting of the model (a Hugging Face config's use_cache) can change what traces in a parts capture,
    and with it the tensors' names: the message said only that the model differs."""
    pm = pbp_fx.perforate(_Untraceable(), (torch.randn(4, 6),), frontend="parts")
    path = str(tmp_path / "c.safetensors")
    pbp_fx.save(pm, path)
    with pytest.raises(pbp_fx.CheckpointError, match=r"the model differs from the one saved; or a setting changed what "
                                                     r"traces in this parts capture, such as a Hugging Face config's "
                                                     r"use_cache: load onto the model as it was built for training"):
        pbp_fx.load(path, _Untraceable(extra=True))


def test_saving_a_finalized_model_says_what_to_save_instead(tmp_path):
    """save(pm.finalize()) said "perforate it first", which perforate refuses for a finalized model."""
    pm, _ = _trained_pm()
    with pytest.raises(pbp_fx.CheckpointError, match=r"got a finalized model \(GraphModule, made for inference\), "
                                                     r"which no pbp_fx.load rebuilds: save the PerforatedModel"):
        pbp_fx.save(pm.finalize(), str(tmp_path / "c.safetensors"))
    assert not list(tmp_path.iterdir())


def test_a_model_built_from_the_passes_by_hand_loads_with_example_inputs(tmp_path):
    """Its capture record is empty: load asked for it as a key and raised KeyError 'captured_with'."""
    from pbp_fx.passes import find_sites, insert_dendrites

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    x = torch.randn(3, 4)
    gm = pbp_fx.trace(build(), (x,))
    pm = pbp_fx.PerforatedModel(insert_dendrites(gm, find_sites(gm)))
    pm.grow()
    path = str(tmp_path / "hand.safetensors")
    pbp_fx.save(pm, path)
    with pytest.raises(CheckpointError, match=r"records no capture \(its PerforatedModel was built from the passes.*"
                                              r"pbp_fx.load\(path, model, example_inputs\)"):
        pbp_fx.load(path, build())
    back = pbp_fx.load(path, build(), example_inputs=(x,))
    assert back.num_dendrites == pm.num_dendrites
    assert torch.equal(back(x), pm(x))
