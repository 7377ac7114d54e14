"""pbp-fx: Perforated Backpropagation for any PyTorch model, as a torch.fx compiler.

The public names are imported when first used (PEP 562): `import pbp_fx` does not import
torch, so `pbp-fx --help` and the CLI's argument checks answer at once.
"""
import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "load": "checkpoint", "save": "checkpoint",
    "compare": "compare",  # pbp_fx.compare(...): did PB pay? (module: `from pbp_fx.compare import ...`)
    "ConfigError": "config", "PBConfig": "config", "TrainConfig": "config",
    "Decision": "controller", "PhaseController": "controller", "rebind_optimizer": "controller",
    "default_optimizer": "controller",
    "explain_sites": "explain",  # every Linear/Conv-like op: a site, or why not
    "CheckpointError": "errors", "ModelFileError": "errors", "NoSitesError": "errors", "PBError": "errors",
    "TraceError": "errors", "ExampleInputsError": "errors", "TrainingError": "errors", "PBWarning": "errors",
    "TargetError": "errors", "PhaseError": "errors",
    "PerforatedModel": "perforated", "perforate": "perforated",
    "PhaseSchedule": "schedule",
    "CallError": "signature",  # a call of a perforated model outside what was traced
    "FusedSite": "site", "Site": "site",
    "trace": "tracing",
    "History": "training", "evaluate": "training", "fit": "training",
    "export_onnx": "exporters", "ort_session": "exporters",  # the exporters import onnx
}

__all__ = [
    "trace", "perforate", "PerforatedModel", "Site", "FusedSite", "explain_sites",
    "PBConfig", "TrainConfig", "PhaseSchedule", "PhaseController", "Decision", "rebind_optimizer", "default_optimizer",
    "fit", "evaluate",
    "History", "save", "load", "export_onnx", "ort_session", "compare",
    "PBError", "ConfigError", "TraceError", "ExampleInputsError", "NoSitesError", "ModelFileError", "CheckpointError",
    "TrainingError", "TargetError", "PhaseError", "CallError", "PBWarning", "__version__",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is not None:
        return getattr(importlib.import_module(f".{module}", __name__), name)
    if not name.startswith("_"):  # a submodule (pbp_fx.checkpoint.read_extra), imported at first use
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'pbp_fx' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Importing the submodule `pbp_fx.compare` leaves `pbp_fx.compare` the function of that name."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:  # the names as static tools see them
    from .checkpoint import load, save
    from .compare import compare
    from .config import ConfigError, PBConfig, TrainConfig
    from .controller import Decision, PhaseController, default_optimizer, rebind_optimizer
    from .errors import (CheckpointError, ExampleInputsError, ModelFileError, NoSitesError, PBError, PhaseError,
                         TargetError, TraceError, TrainingError)
    from .explain import explain_sites
    from .exporters import export_onnx, ort_session
    from .perforated import PerforatedModel, perforate
    from .schedule import PhaseSchedule
    from .signature import CallError
    from .site import FusedSite, Site
    from .tracing import trace
    from .training import History, evaluate, fit
