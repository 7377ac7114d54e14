"""passes.submodules: unused submodules dropped without getattr."""
import pytest
import torch
from torch import fx, nn

from pbp_fx.passes.submodules import delete_unused_submodules


class KeyErrorOnMissing(nn.Module):
    """Raises KeyError, not AttributeError, for a name it lacks (as PEFT's ModulesToSaveWrapper does)."""

    def __init__(self):
        super().__init__()
        self.used, self.spare = nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3))

    def __getattr__(self, name):
        if name in self.__dict__["_modules"] or name in self.__dict__["_parameters"]:
            return super().__getattr__(name)
        raise KeyError(name)

    def forward(self, x):
        return self.used(x)


def _graph():
    wrapper = KeyErrorOnMissing()
    gm = fx.symbolic_trace(nn.Sequential(wrapper, nn.ReLU()))
    gm.add_submodule("0", wrapper)  # (symbolic tracing copied the part it calls; torch.export's graphs keep the module)
    gm.add_submodule("extra", nn.Sequential(nn.Linear(2, 2)))
    return gm


def test_unused_submodules_go_without_asking_a_module_for_a_child_it_no_longer_has():
    """torch's delete_all_unused_submodules deleted 0.spare, then asked hasattr for it (for 0.spare.0) and got the
    module's KeyError: finalize of a PEFT SEQ_CLS model with a dendrite on its classifier failed so."""
    with pytest.raises(KeyError):
        _graph().delete_all_unused_submodules()
    gm, x = _graph(), torch.randn(4, 3)
    before = gm(x)
    delete_unused_submodules(gm)
    assert {n for n, _ in gm.named_modules()} == {"", "0", "0.used", "1"}
    gm.recompile()
    assert torch.equal(gm(x), before)


def test_a_get_attr_keeps_the_modules_on_its_path_and_everything_under_its_target():
    gm = fx.symbolic_trace(nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3)))))
    graph = fx.Graph()
    x = graph.placeholder("x")
    # (0.1 is read by nothing: it goes; 0 and 0.0 hold the weight read)
    graph.output(graph.call_function(torch.nn.functional.linear, (x, graph.get_attr("0.0.weight"))))
    gm.graph = graph
    gm.add_submodule("kept", nn.Sequential(nn.Linear(3, 3)))
    kept = gm.graph.get_attr("kept")  # (a get_attr of a module keeps all under it)
    delete_unused_submodules(gm)
    assert {n for n, _ in gm.named_modules()} == {"", "0", "0.0", "kept", "kept.0"}
    assert kept.target == "kept"
