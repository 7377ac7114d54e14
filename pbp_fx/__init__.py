"""pbp-fx: Perforated Backpropagation for any PyTorch model, as a torch.fx compiler."""
from .checkpoint import load, save
from .compare import compare  # pbp_fx.compare(...): did PB pay? (module: `from pbp_fx.compare import ...`)
from .config import ConfigError, PBConfig, TrainConfig
from .controller import Decision, PhaseController, rebind_optimizer
from .explain import explain_sites  # every Linear/Conv-like op: a site, or why not
from .errors import CheckpointError, ModelFileError, NoSitesError, PBError, TraceError, TrainingError
from .perforated import PerforatedModel, perforate
from .schedule import PhaseSchedule
from .site import FusedSite, Site
from .tracing import trace
from .training import History, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "trace", "perforate", "PerforatedModel", "Site", "FusedSite", "explain_sites",
    "PBConfig", "TrainConfig", "PhaseSchedule", "PhaseController", "Decision", "rebind_optimizer", "fit", "evaluate",
    "History", "save", "load", "export_onnx", "ort_session", "compare",
    "PBError", "ConfigError", "TraceError", "NoSitesError", "ModelFileError", "CheckpointError", "TrainingError",
    "__version__",
]


def __getattr__(name):
    # The exporters import onnx: load them only when asked for.
    if name in ("export_onnx", "ort_session"):
        from . import exporters

        return getattr(exporters, name)
    raise AttributeError(f"module 'pbp_fx' has no attribute {name!r}")
