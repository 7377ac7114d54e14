"""Error types. Each message is one line naming the problem and what to do about it."""

__all__ = ["PBError", "TraceError", "NoSitesError", "ModelFileError", "CheckpointError", "TrainingError"]


class PBError(Exception):
    """Base class of the errors pbp-fx reports to users (the CLI prints them on one line)."""


class TraceError(PBError):
    """The model (or a part of it that cannot be isolated) does not trace."""


class NoSitesError(PBError):
    """No Linear/Conv neuron sites were found (or all were excluded)."""


class ModelFileError(PBError):
    """A model file is missing, does not import, or breaks the model.py contract."""


class CheckpointError(PBError):
    """A checkpoint is missing, corrupted, or belongs to another model."""


class TrainingError(PBError):
    """Training cannot go on (empty dataset, non-finite loss, bad settings)."""
