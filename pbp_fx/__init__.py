"""pbp-fx: Perforated Backpropagation for any PyTorch model, as a torch.fx compiler."""
from .errors import CheckpointError, ModelFileError, NoSitesError, PBError, TraceError, TrainingError
from .perforated import PerforatedModel, perforate
from .site import FusedSite, Site
from .tracing import trace

__version__ = "0.1.0"

__all__ = [
    "trace", "perforate", "PerforatedModel", "Site", "FusedSite",
    "PBError", "TraceError", "NoSitesError", "ModelFileError", "CheckpointError", "TrainingError",
    "__version__",
]
