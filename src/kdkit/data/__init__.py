"""Datasets and batching. See :mod:`kdkit.data.core` for the batch contract."""

from .builtin import DATASETS, read_idx
from .core import UNLABELLED, ArrayData, DataSplits, TensorLoader, as_dataset, hide_labels, make_loader

__all__ = ["DATASETS", "UNLABELLED", "ArrayData", "DataSplits", "TensorLoader", "as_dataset", "hide_labels",
           "make_loader", "read_idx"]
