"""Compression after distillation: pruning, quantisation, low-rank factorisation, parameter transfer.

Each technique is a plain function on an ``nn.Module``; :func:`run_compress` (``kdkit compress CONFIG``)
chains them with recovery distillation from the teacher and writes the compression ladder report; each step
type's handler (:data:`HANDLERS`, in :mod:`kdkit.compress.steps`) says how it applies and is checked.
"""

from .ladder import (
    Ladder,
    check_steps,
    evaluate_compressed,
    is_compress_run,
    load_compressed,
    measure,
    run_compress,
    validate_compress,
)
from .lowrank import factorize, factorize_layer, rank_for_energy
from .prune import count_nonzero, count_parameters, make_permanent, prune_structured, prune_unstructured
from .quantize import (
    convert_qat,
    is_quantized,
    prepare_qat,
    quantize_dynamic,
    quantize_static,
    quantized_tensors,
    save_quantized,
)
from .steps import HANDLERS, Outcome, StepContext, StepHandler
from .transfer import transfer_weights

__all__ = ["HANDLERS", "Ladder", "Outcome", "StepContext", "StepHandler", "check_steps", "convert_qat",
           "count_nonzero", "count_parameters", "evaluate_compressed", "factorize", "factorize_layer",
           "is_compress_run", "is_quantized", "load_compressed", "make_permanent", "measure", "prepare_qat",
           "prune_structured", "prune_unstructured", "quantize_dynamic", "quantize_static", "quantized_tensors",
           "rank_for_energy", "run_compress", "save_quantized", "transfer_weights", "validate_compress"]
