"""Built-in datasets: digits (embedded), Fashion-MNIST / MNIST (IDX files), image folders, CSV tables.

Each builder is registered by name in :data:`DATASETS` and returns a
:class:`~kdkit.data.core.DataSplits` of in-memory :class:`ArrayData`, so all of
them take the fast batching path.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..errors import KdkitError
from ..registry import Registry
from .core import ArrayData, DataSplits, fixed_split

DATASETS = Registry("dataset")

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
MNIST_ROOT = "/usr/share/datasets/mnist"


def _standardise(train_x: torch.Tensor, *others: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Scale every split with the training split's mean and std (one scalar each, as images usually are)."""
    mean, std = train_x.mean(), train_x.std().clamp_min(1e-8)
    return tuple((t - mean) / std for t in (train_x, *others))


@DATASETS.register("digits")
def digits(seed: int = 0, train_subset: Optional[int] = None) -> DataSplits:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), embedded in the package.

    Fixed split: 360 test, 180 validation, 1,257 training images (the first ``train_subset`` of them if given).
    Inputs are (1, 8, 8) floats, standardised.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.long)
    tr, va, te = fixed_split(len(x), 180, 360, seed=seed)
    if train_subset is not None:
        tr = tr[:train_subset]
    xtr, xva, xte = _standardise(x[tr], x[va], x[te])
    return DataSplits(ArrayData(xtr, y[tr]), ArrayData(xva, y[va]), ArrayData(xte, y[te]),
                      num_classes=10, input_shape=(1, 8, 8), info={"source": "sklearn.datasets.load_digits"})


# ----------------------------------------------------------------------------- IDX (MNIST-style) files

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a numpy array.

    Format (LeCun et al.): two zero bytes, a dtype code, the number of
    dimensions, one big-endian uint32 per dimension, then the data.

    Raises:
        KdkitError: when the file cannot be read, is not IDX, or is truncated.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise KdkitError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise KdkitError(f"{path} is not an IDX file (expected magic bytes 00 00 <dtype> <ndim>)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise KdkitError(f"IDX file {path} is truncated: header needs {header} bytes, file has {len(raw)}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    need = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != need:
        raise KdkitError(f"IDX file {path} is truncated or corrupt: shape {shape} needs {need} bytes, "
                         f"file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(stem)


def _idx_dataset(name: str, root: Optional[str], default_root: str, install_hint: str, seed: int,
                 train_subset: Optional[int], val_size: int) -> DataSplits:
    base = Path(root or default_root)
    try:
        files = [_find(base, s) for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    except FileNotFoundError as e:
        raise KdkitError(f"{name} not found: looked for {e.args[0]}[.gz] in {base}; {install_hint}, "
                         "or set data.root to the folder holding the four IDX files") from None
    xtr, ytr, xte, yte = (read_idx(f) for f in files)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise KdkitError(f"{name} in {base}: images and labels disagree in count "
                         f"({len(xtr)} vs {len(ytr)}, {len(xte)} vs {len(yte)})")
    x = torch.from_numpy(xtr.astype(np.float32) / 255.0).unsqueeze(1)  # (60000, 1, 28, 28)
    y = torch.from_numpy(ytr.astype(np.int64))
    x_test = torch.from_numpy(xte.astype(np.float32) / 255.0).unsqueeze(1)
    y_test = torch.from_numpy(yte.astype(np.int64))
    tr, va, _ = fixed_split(len(x), val_size, 0, seed=seed)
    if train_subset is not None:
        tr = tr[:train_subset]
    xtr_, xva_, xte_ = _standardise(x[tr], x[va], x_test)
    return DataSplits(ArrayData(xtr_, y[tr]), ArrayData(xva_, y[va]), ArrayData(xte_, y_test),
                      num_classes=int(y.max()) + 1, input_shape=tuple(x.shape[1:]),
                      info={"source": str(base), "train": len(tr), "val": len(va), "test": len(y_test)})


@DATASETS.register("fashion_mnist")
def fashion_mnist(root: Optional[str] = None, seed: int = 0, train_subset: Optional[int] = None,
                  val_size: int = 5000) -> DataSplits:
    """Fashion-MNIST (Xiao et al. 2017) from IDX files: 60,000 training (less ``val_size`` for validation) and 10,000 test images."""
    return _idx_dataset("fashion_mnist", root, FASHION_MNIST_ROOT,
                        "install it with `apt-get install dataset-fashion-mnist`", seed, train_subset, val_size)


@DATASETS.register("mnist")
def mnist(root: Optional[str] = None, seed: int = 0, train_subset: Optional[int] = None,
          val_size: int = 5000) -> DataSplits:
    """MNIST from IDX files (same layout as Fashion-MNIST)."""
    return _idx_dataset("mnist", root, MNIST_ROOT, "put the four MNIST IDX files there", seed,
                        train_subset, val_size)


# ----------------------------------------------------------------------------- image folders

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@DATASETS.register("image_folder")
def image_folder(root: Optional[str] = None, image_size: int = 32, grayscale: bool = False,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0) -> DataSplits:
    """Images laid out as ``root/<class name>/<image>``; classes are the sorted folder names.

    All images are loaded once, resized to ``image_size`` squared and standardised.
    """
    from PIL import Image

    if root is None or not Path(root).is_dir():
        raise KdkitError(f"image_folder: data.root must be a folder of class sub-folders; got {root!r}")
    classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    if not classes:
        raise KdkitError(f"image_folder: no class sub-folders in {root}")
    xs: List[np.ndarray] = []
    ys: List[int] = []
    for label, cls in enumerate(classes):
        for f in sorted((Path(root) / cls).iterdir()):
            if f.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                img = Image.open(f).convert("L" if grayscale else "RGB").resize((image_size, image_size))
            except OSError as e:
                raise KdkitError(f"image_folder: cannot read image {f}: {e}") from None
            arr = np.asarray(img, dtype=np.float32) / 255.0
            xs.append(arr[None] if grayscale else arr.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise KdkitError(f"image_folder: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {root}")
    x = torch.from_numpy(np.stack(xs))
    y = torch.tensor(ys)
    n_val, n_test = int(len(x) * val_fraction), int(len(x) * test_fraction)
    tr, va, te = fixed_split(len(x), n_val, n_test, seed=seed)
    xtr, xva, xte = _standardise(x[tr], x[va], x[te])
    return DataSplits(ArrayData(xtr, y[tr]), ArrayData(xva, y[va]), ArrayData(xte, y[te]),
                      num_classes=len(classes), input_shape=tuple(x.shape[1:]),
                      info={"source": str(root), "classes": classes})


# ----------------------------------------------------------------------------- CSV tables

@DATASETS.register("csv")
def csv(path: Optional[str] = None, target: str = "target", task: str = "classification",
        val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """A numeric CSV table with a header row: every column but ``target`` is a feature.

    For classification, the target's distinct values (sorted) become classes
    0..C-1; for regression it is a float. Features are standardised per column
    with the training split's statistics.
    """
    import csv as _csv

    if path is None or not Path(path).is_file():
        raise KdkitError(f"csv: data.path must be an existing CSV file; got {path!r}")
    if task not in ("classification", "regression"):
        raise KdkitError(f"csv: data.task must be 'classification' or 'regression'; got {task!r}")
    with open(path, newline="") as fh:
        rows = list(_csv.reader(fh))
    if len(rows) < 2:
        raise KdkitError(f"csv: {path} has no data rows")
    header, body = rows[0], rows[1:]
    if target not in header:
        raise KdkitError(f"csv: target column {target!r} not in {path}; columns: {', '.join(header)}")
    t = header.index(target)
    features = [h for i, h in enumerate(header) if i != t]
    try:
        feats = np.array([[float(v) for i, v in enumerate(r) if i != t] for r in body], dtype=np.float32)
    except ValueError as e:
        raise KdkitError(f"csv: non-numeric feature value in {path}: {e}") from None
    if task == "classification":
        values = sorted({r[t] for r in body})
        y = torch.tensor([values.index(r[t]) for r in body])
        num_classes: Optional[int] = len(values)
    else:
        y = torch.tensor([float(r[t]) for r in body]).unsqueeze(1)
        num_classes, values = None, []
    x = torch.from_numpy(feats)
    n_val, n_test = int(len(x) * val_fraction), int(len(x) * test_fraction)
    tr, va, te = fixed_split(len(x), n_val, n_test, seed=seed)
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-8)
    norm = lambda a: (a - mean) / std  # noqa: E731
    return DataSplits(ArrayData(norm(x[tr]), y[tr]), ArrayData(norm(x[va]), y[va]), ArrayData(norm(x[te]), y[te]),
                      num_classes=num_classes, input_shape=(x.shape[1],), task=task,
                      info={"source": str(path), "features": features, "classes": values})
