"""Input signatures: described as JSON, rebuilt as stand-ins, compared by pattern."""
import collections
import dataclasses
import json
import sys

import pytest
import torch
import torch.nn as nn

from pbp_fx.errors import CheckpointError
from pbp_fx.inputs import describe_inputs, inputs_from_signature, same_pattern


class Takes(nn.Module):
    def forward(self, batch, scale=1.0, mask=None):
        return batch


def _shapes(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_shapes(v) for v in value)
    return value


def test_nested_inputs_are_described_and_rebuilt_with_their_structure_shapes_and_dtypes():
    batch = {"img": torch.randn(2, 3), "ids": torch.zeros(2, 5, dtype=torch.long),
             "parts": [torch.randn(2, 4), (torch.ones(2, dtype=torch.bool), 7)]}
    sig = json.loads(json.dumps(describe_inputs(Takes(), (batch, 0.5), {"mask": None})))  # (as a checkpoint keeps it)
    args, kwargs = inputs_from_signature(sig)
    assert sig["names"] == ["batch", "scale"] and kwargs == {"mask": None}
    assert _shapes(args) == _shapes((batch, 0.5))
    assert list(args[0]) == ["img", "ids", "parts"]  # (in order)


def test_patterns_compare_nested_inputs_apart_from_the_batch_size():
    def sig(batch):
        return describe_inputs(Takes(), (batch,), {})

    one = sig({"img": torch.randn(2, 3), "parts": [torch.randn(2, 4)]})
    assert same_pattern(one, sig({"img": torch.randn(9, 3), "parts": [torch.randn(9, 4)]}))
    assert not same_pattern(one, sig({"img": torch.randn(2, 3), "parts": [torch.randn(2, 5)]}))
    assert not same_pattern(one, sig({"img": torch.randn(2, 3), "parts": [torch.randn(2, 4)] * 2}))
    assert not same_pattern(one, sig({"pic": torch.randn(2, 3), "parts": [torch.randn(2, 4)]}))


def test_an_input_that_cannot_be_recorded_asks_for_example_inputs():
    sig = describe_inputs(Takes(), ({1: torch.randn(2, 3)},), {})  # (a key JSON cannot hold as it is)
    with pytest.raises(CheckpointError, match=r"the recorded input 'batch' is a dict, which cannot be rebuilt: "
                                              r"pass example_inputs / example_kwargs to load\(\)"):
        inputs_from_signature(sig)


Pair = collections.namedtuple("Pair", "u v")


@dataclasses.dataclass
class Record:
    ids: torch.Tensor
    scale: float = 0.5


def test_namedtuple_and_dataclass_inputs_are_recorded_and_rebuilt_from_their_class():
    """A namedtuple (and a dataclass) input was recorded as 'unsupported': load without example inputs refused
    it, though the README says tuple inputs re-capture (a reviewer)."""
    sig = json.loads(json.dumps(describe_inputs(Takes(), (Pair(torch.randn(2, 3), torch.ones(2, dtype=torch.bool)),),
                                                {"mask": Record(torch.zeros(2, 4, dtype=torch.long))}),
                                sort_keys=True))
    (pair,), kwargs = inputs_from_signature(sig)
    assert type(pair) is Pair and pair.u.shape == (2, 3) and pair.v.dtype == torch.bool
    assert type(kwargs["mask"]) is Record and kwargs["mask"].ids.shape == (2, 4) and kwargs["mask"].scale == 0.5
    assert same_pattern(sig, sig)
    gone = json.loads(json.dumps(sig).replace('"qualname": "Pair"', '"qualname": "Gone"'))
    with pytest.raises(CheckpointError, match=r"the recorded input 'batch' is a Pair \(test_inputs.Gone\), which is no "
                                              r"namedtuple or dataclass this process has imported: import its module"):
        inputs_from_signature(gone)


def test_a_crafted_record_neither_imports_nor_builds_what_is_no_namedtuple_or_dataclass(tmp_path):
    """A checkpoint's record named subprocess.Popen with shell=True, and load ran the command (the file's
    digest has no key: anyone editing it can recompute it; a reviewer)."""
    flag = tmp_path / "ran"
    popen = {"kind": "record", "type": "Popen", "module": "subprocess", "qualname": "Popen",
             "fields": [["args", {"kind": "value", "value": f"touch {flag}"}], ["shell", {"kind": "value", "value": True}]]}
    unimported = dict(popen, module="pbp_fx_never_imported_module", qualname="Anything")
    # (a module's lazy __getattr__ imports what it is asked for: the walk reads __dict__ only)
    lazy = dict(popen, module="torch", qualname="_inductor.config.Nope")
    had_inductor = "torch._inductor" in sys.modules
    for entry in (popen, unimported, lazy):
        with pytest.raises(CheckpointError, match="which is no namedtuple or dataclass this process has imported"):
            inputs_from_signature({"names": ["x"], "args": [entry], "kwargs": {}})
    assert not flag.exists()
    assert "pbp_fx_never_imported_module" not in sys.modules
    assert ("torch._inductor" in sys.modules) == had_inductor


@dataclasses.dataclass
class WithDerived:
    ids: torch.Tensor
    count: int = dataclasses.field(init=False, default=0)


def test_a_dataclass_record_keeps_only_the_fields_its_constructor_takes_and_patterns_tell_classes_apart():
    sig = json.loads(json.dumps(describe_inputs(Takes(), (WithDerived(torch.zeros(2, 3, dtype=torch.long)),), {})))
    (rebuilt,), _ = inputs_from_signature(sig)
    assert type(rebuilt) is WithDerived and rebuilt.ids.shape == (2, 3) and rebuilt.count == 0
    other = json.loads(json.dumps(sig).replace('"qualname": "WithDerived"', '"qualname": "Record"'))
    assert not same_pattern(sig, other)
