"""Export: ONNX and TorchScript files with a parity check on real inputs (:mod:`.core`), and ``kdkit export`` of
a run directory (:mod:`.run`)."""

from .core import (
    FORMATS,
    compare,
    export_model,
    export_onnx,
    export_sklearn,
    export_torchscript,
    onnx_latency,
    onnx_session,
    quantize_onnx,
    run_onnx,
)
from .run import export_run

__all__ = ["FORMATS", "compare", "export_model", "export_onnx", "export_run", "export_sklearn", "export_torchscript",
           "onnx_latency", "onnx_session", "quantize_onnx", "run_onnx"]
