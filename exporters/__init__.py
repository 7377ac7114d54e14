"""Deployment exporters: ONNX files with fused dendrite ops, and ONNX Runtime sessions."""
from .functions import DOMAIN, FusedOpSpec, make_function
from .onnx import ExportError, ExportPathError, export_onnx, fused_op_spec
from .ort import (BatchSizeError, OnnxLoadError, RunInputError, RuntimeUnavailableError, available_providers,
                  ort_session, run)

__all__ = [
    "export_onnx", "ort_session", "run", "available_providers",
    "ExportError", "ExportPathError", "RuntimeUnavailableError", "BatchSizeError", "RunInputError", "OnnxLoadError",
    "DOMAIN", "FusedOpSpec", "make_function", "fused_op_spec",
]
