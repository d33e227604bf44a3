"""Datasets and batching. See :mod:`kdkit.data.core` for the batch contract."""

from . import text as _text  # noqa: F401  (registers the text datasets)
from .builtin import DATASETS, read_idx
from .core import (
    UNLABELLED,
    ArrayData,
    DataSplits,
    TensorLoader,
    as_dataset,
    check_targets,
    first_sample,
    hide_labels,
    make_loader,
    num_samples,
)

__all__ = ["DATASETS", "UNLABELLED", "ArrayData", "DataSplits", "TensorLoader", "as_dataset", "check_targets",
           "first_sample", "hide_labels", "make_loader", "num_samples", "read_idx"]
