"""Deployment exporters: ONNX files with fused dendrite ops, and ONNX Runtime sessions."""
from .functions import DOMAIN, FusedOpSpec, make_function
from .onnx import ExportError, ExportPathError, export_onnx, fused_op_spec
from .ort import BatchSizeError, RuntimeUnavailableError, available_providers, ort_session, run

__all__ = [
    "export_onnx", "ort_session", "run", "available_providers",
    "ExportError", "ExportPathError", "RuntimeUnavailableError", "BatchSizeError",
    "DOMAIN", "FusedOpSpec", "make_function", "fused_op_spec",
]
