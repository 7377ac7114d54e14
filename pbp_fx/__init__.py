"""pbp-fx: Perforated Backpropagation for any PyTorch model, as a torch.fx compiler."""
from .checkpoint import load, save
from .controller import Decision, PhaseController
from .errors import CheckpointError, ModelFileError, NoSitesError, PBError, TraceError, TrainingError
from .perforated import PerforatedModel, perforate
from .site import FusedSite, Site
from .tracing import trace
from .explain import explain_sites  # i12: every Linear/Conv-like op, site or why not
from .training import History, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "trace", "perforate", "PerforatedModel", "Site", "FusedSite", "explain_sites",
    "PhaseController", "Decision", "fit", "evaluate", "History", "save", "load",
    "export_onnx", "ort_session",
    "PBError", "TraceError", "NoSitesError", "ModelFileError", "CheckpointError", "TrainingError",
    "__version__",
]


def __getattr__(name):
    # The exporters import onnx: load them only when asked for.
    if name in ("export_onnx", "ort_session"):
        from . import exporters

        return getattr(exporters, name)
    raise AttributeError(f"module 'pbp_fx' has no attribute {name!r}")
