"""Built-in datasets: digits (embedded), Fashion-MNIST / MNIST (IDX files), image folders, CSV tables.

Each builder is registered by name in :data:`DATASETS` and returns a
:class:`~kdkit.data.core.DataSplits` of in-memory :class:`ArrayData`, so all of
them take the fast batching path.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import KdkitError
from ..registry import Registry
from .core import ArrayData, DataSplits, fixed_split

DATASETS = Registry("dataset")

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
MNIST_ROOT = "/usr/share/datasets/mnist"


def _image_stats(train_x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (one scalar each) of the training inputs; 0 and 1 when there are too few values to measure.

    An empty training split (``train_subset: 0``) must reach the loop's "training data is empty" error, not
    NaN statistics and a torch warning here.
    """
    if train_x.numel() < 2:
        return torch.tensor(0.0), torch.tensor(1.0)
    return train_x.mean(), train_x.std().clamp_min(1e-8)


def _standardise(train_x: torch.Tensor, *others: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Scale every split with the training split's mean and std (one scalar each, as images usually are)."""
    mean, std = _image_stats(train_x)
    return tuple((t - mean) / std for t in (train_x, *others))


def _normalisation(train_x: torch.Tensor) -> Dict[str, float]:
    """The scalars :func:`_standardise` used, for the report (images: model input = (pixel/255 - mean) / std)."""
    mean, std = _image_stats(train_x)
    return {"mean": float(mean), "std": float(std)}


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
                      num_classes=10, input_shape=(1, 8, 8),
                      info={"source": "sklearn.datasets.load_digits", "normalisation": _normalisation(x[tr])})


# ----------------------------------------------------------------------------- IDX (MNIST-style) files

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a numpy array.

    Format (LeCun et al.): two zero bytes, a dtype code, the number of
    dimensions, one big-endian uint32 per dimension, then the data.

    Raises:
        KdkitError: when the file cannot be read or decompressed, is not IDX, or its header disagrees with its size.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a corrupt deflate stream inside the gzip
        raise KdkitError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise KdkitError(f"{path} is not an IDX file (expected magic bytes 00 00 <dtype> <ndim>)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise KdkitError(f"IDX file {path} is truncated: header needs {header} bytes, file has {len(raw)}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    # Python integers: np.prod of uint32 dimensions can overflow int64 and match a small file by accident.
    need = header + math.prod(shape) * dtype.itemsize
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
    for f, arr, ndim in zip(files, (xtr, ytr, xte, yte), (3, 1, 3, 1)):
        if arr.ndim != ndim:
            raise KdkitError(f"{name}: {f} has {arr.ndim} dimensions {arr.shape}; expected "
                             f"{'(N, height, width) images' if ndim == 3 else '(N,) labels'}")
    for f, arr in ((files[1], ytr), (files[3], yte)):
        if arr.dtype.kind == "f":
            raise KdkitError(f"{name}: {f} holds floating-point labels; expected integer class labels")
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
    # Classes come from the training labels; a test label beyond them fails here (check_targets), not after training.
    return DataSplits(ArrayData(xtr_, y[tr]), ArrayData(xva_, y[va]), ArrayData(xte_, y_test),
                      num_classes=int(y.max()) + 1 if len(y) else 0, input_shape=tuple(x.shape[1:]),
                      info={"source": str(base), "train": len(tr), "val": len(va), "test": len(y_test),
                            "normalisation": _normalisation(x[tr])})


@DATASETS.register("fashion_mnist")
def fashion_mnist(root: Optional[str] = None, seed: int = 0, train_subset: Optional[int] = None,
                  val_size: int = 5000) -> DataSplits:
    """Fashion-MNIST (Xiao et al. 2017) from IDX files: 60,000 training (less ``val_size`` for validation) and
    10,000 test images."""
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
# Refuse images declaring more pixels than this before decoding them: a few-byte file can declare
# 30000x30000 pixels (a decompression bomb) and ask for gigabytes. 40 megapixels covers real photos.
MAX_IMAGE_PIXELS = 40_000_000


def _read_image_folder(root: str, image_size: int, grayscale: bool, classes: Optional[List[str]] = None,
                       what: str = "data.root") -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """Images of ``root/<class>/<image>`` resized to ``image_size`` squared, in [0, 1]: (x, y, classes)."""
    from PIL import Image

    if root is None or not Path(root).is_dir():
        raise KdkitError(f"image_folder: {what} must be a folder of class sub-folders; got {root!r}")
    found = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    if not found:
        raise KdkitError(f"image_folder: no class sub-folders in {root}")
    if classes is not None and set(found) - set(classes):
        raise KdkitError(f"image_folder: {root} has the class folder {sorted(set(found) - set(classes))[0]!r}, "
                         f"which the training folder lacks; expected the training folder's classes")
    classes = classes or found
    xs: List[np.ndarray] = []
    ys: List[int] = []
    for cls in found:
        label = classes.index(cls)
        for f in sorted((Path(root) / cls).iterdir()):
            if f.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as raw:  # reads the header only; pixels are decoded by convert()
                    w, h = raw.size
                    if w * h > MAX_IMAGE_PIXELS:
                        raise KdkitError(f"image_folder: image {f} declares {w}x{h} pixels, more than the "
                                         f"{MAX_IMAGE_PIXELS:,} kdkit decodes; shrink it or remove it")
                    img = raw.convert("L" if grayscale else "RGB").resize((image_size, image_size))
            except KdkitError:
                raise
            except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
                raise KdkitError(f"image_folder: cannot read image {f}: {type(e).__name__}: {e}") from None
            arr = np.asarray(img, dtype=np.float32) / 255.0
            xs.append(arr[None] if grayscale else arr.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise KdkitError(f"image_folder: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {root}")
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys), classes


@DATASETS.register("image_folder")
def image_folder(root: Optional[str] = None, image_size: int = 32, grayscale: bool = False,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                 train_path: Optional[str] = None, val_path: Optional[str] = None,
                 test_path: Optional[str] = None) -> DataSplits:
    """Images laid out as ``root/<class name>/<image>``; classes are the sorted folder names, cut into a fixed
    seeded split by ``val_fraction`` and ``test_fraction``. Or your own splits, one such folder each:
    ``train_path``, ``val_path`` and ``test_path`` (the last two optional).

    All images are loaded once, resized to ``image_size`` squared and standardised with the training split's
    mean and std.
    """
    files = _split_files(root, train_path, val_path, test_path, "image_folder")
    if files is None:
        x, y, classes = _read_image_folder(root, image_size, grayscale)
        n_val, n_test = int(len(x) * val_fraction), int(len(x) * test_fraction)
        tr, va, te = fixed_split(len(x), n_val, n_test, seed=seed)
        parts = [(x[i], y[i]) for i in (tr, va, te)]
        source = str(root)
    else:
        x, y, classes = _read_image_folder(train_path, image_size, grayscale, what="data.train_path")
        parts = [(x, y)] + [_read_image_folder(f, image_size, grayscale, classes, what)[:2] if f else None
                            for f, what in ((val_path, "data.val_path"), (test_path, "data.test_path"))]
        source = ", ".join(f for f in files if f)
    xtr = parts[0][0]
    stats = _normalisation(xtr)
    scaled = _standardise(xtr, *[p[0] for p in parts[1:] if p is not None])
    it = iter(scaled[1:])
    data = [ArrayData(scaled[0], parts[0][1])] + [ArrayData(next(it), p[1]) if p is not None else None
                                                  for p in parts[1:]]
    return DataSplits(*data, num_classes=len(classes), input_shape=tuple(xtr.shape[1:]),
                      info={"source": source, "classes": classes, "normalisation": stats})


# ----------------------------------------------------------------------------- CSV tables

def _read_csv(path: str) -> Tuple[List[str], List[Tuple[int, List[str]]]]:
    """Header and ``(line number, fields)`` of every non-blank row; any unreadable file is a KdkitError."""
    import csv as _csv

    rows: List[Tuple[int, List[str]]] = []
    # Long documents are real: no field limit but memory (Python's default refuses fields over 131,072 characters).
    limit = _csv.field_size_limit(2**31 - 1)
    try:
        # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first column's name.
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = _csv.reader(fh)
            for fields in reader:
                if fields and any(f.strip() for f in fields):
                    rows.append((reader.line_num, fields))
    except UnicodeDecodeError as e:
        raise KdkitError(f"csv: {path} is not UTF-8 text (byte {e.start}: {e.reason}); expected a UTF-8 CSV "
                         "file with a header row") from None
    except (_csv.Error, OSError) as e:  # _csv.Error: NUL bytes, unterminated quotes, oversized fields
        raise KdkitError(f"csv: cannot parse {path}: {e}; expected a UTF-8 CSV file with a header row") from None
    finally:
        _csv.field_size_limit(limit)
    if len(rows) < 2:
        raise KdkitError(f"csv: {path} has no data rows (a header row, then one row per sample)")
    header = [h.strip() for h in rows[0][1]]
    for line, fields in rows[1:]:
        if len(fields) != len(header):
            raise KdkitError(f"csv: {path} line {line} has {len(fields)} fields; the header has {len(header)}")
    return header, rows[1:]


def _number(v: str) -> Optional[float]:
    try:
        return float(v)
    except ValueError:
        return None


def _class_values(values: List[str]) -> Tuple[List[int], list]:
    """Class index per row and the class list, in order.

    Numeric labels are compared as numbers ("1" and "1.0" are one class) and sorted numerically (with
    11 classes, class 2 is label 2, not "10"); other labels are sorted as strings.
    """
    numbers = [_number(v) for v in values]
    if all(n is not None and math.isfinite(n) for n in numbers):
        distinct = sorted(set(numbers))  # type: ignore[arg-type]
        pos = {n: i for i, n in enumerate(distinct)}
        return [pos[n] for n in numbers], [int(n) if n.is_integer() else n for n in distinct]
    distinct_s = sorted(set(values))
    pos_s = {v: i for i, v in enumerate(distinct_s)}
    return [pos_s[v] for v in values], distinct_s


def _scale(train: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and std of the training rows, ignoring NaN (unlabelled targets).

    A column with no spread (or fewer than two values) gets std 1, so it is shifted but never blown up.
    """
    mean = torch.nanmean(train, dim=0)
    mean = torch.where(torch.isnan(mean), torch.zeros_like(mean), mean)
    count = (~torch.isnan(train)).sum(0)
    var = torch.nansum((train - mean) ** 2, dim=0) / (count - 1).clamp_min(1)
    std = var.sqrt()
    std = torch.where((count > 1) & (std > 1e-8), std, torch.ones_like(std))
    return mean, std


def _csv_table(path: str, target: str) -> Tuple[List[str], np.ndarray, List[str], List[int]]:
    """A numeric CSV file: (feature names, features (N, F), raw target strings, line numbers)."""
    if path is None or not Path(path).is_file():
        raise KdkitError(f"csv: data.path must be an existing CSV file; got {path!r}")
    header, body = _read_csv(path)
    if target not in header:
        raise KdkitError(f"csv: target column {target!r} not in {path}; columns: {', '.join(header)}")
    t = header.index(target)
    features = [h for i, h in enumerate(header) if i != t]
    if not features:
        raise KdkitError(f"csv: {path} has only the target column {target!r}; expected feature columns too")
    feats = np.empty((len(body), len(features)), dtype=np.float32)
    for r, (line, fields) in enumerate(body):
        for c, v in enumerate(f for i, f in enumerate(fields) if i != t):
            n = _number(v)
            if n is None or not math.isfinite(n):
                what = "is not a number" if n is None else "is not finite"
                raise KdkitError(f"csv: {path} line {line}, column {features[c]!r}: value {v!r} {what}; expected "
                                 "numeric features (clean or impute missing values first)")
            feats[r, c] = n
    return features, feats, [fields[t].strip() for _, fields in body], [line for line, _ in body]


def _csv_targets(path: str, target: str, raw: List[str], lines: List[int], task: str):
    if task == "classification":
        index, values = _class_values(raw)
        return torch.tensor(index, dtype=torch.long), values
    numbers = []
    for line, v in zip(lines, raw):
        n = float("nan") if v == "" else _number(v)
        if n is None or math.isinf(n):
            raise KdkitError(f"csv: {path} line {line}: target {v!r} in column {target!r} is not a finite number; "
                             "task: regression needs numeric targets (use task: classification for labels)")
        numbers.append(n)
    return torch.tensor(numbers, dtype=torch.float32).unsqueeze(1), []  # (N, 1); NaN = unlabelled


def _split_files(path: Optional[str], train_path: Optional[str], val_path: Optional[str],
                 test_path: Optional[str], what: str) -> Optional[List[Optional[str]]]:
    """The three split files (val and test optional) when ``train_path`` is given, else None (one ``path``)."""
    if train_path is None:
        if val_path is not None or test_path is not None:
            raise KdkitError(f"{what}: data.val_path and data.test_path need data.train_path too")
        return None
    if path is not None:
        raise KdkitError(f"{what}: give either data.path (one file, split by fractions) or data.train_path "
                         f"(with val_path and test_path), not both")
    return [train_path, val_path, test_path]


@DATASETS.register("csv")
def csv(path: Optional[str] = None, target: str = "target", task: str = "classification",
        val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0, train_path: Optional[str] = None,
        val_path: Optional[str] = None, test_path: Optional[str] = None) -> DataSplits:
    """A numeric CSV table with a header row: every column but ``target`` is a feature.

    One file (``path``), cut into a fixed seeded split by ``val_fraction`` and ``test_fraction``; or your own
    splits, one file each: ``train_path``, ``val_path`` and ``test_path`` (the last two optional), with the same
    columns.

    Classification: the target's distinct values become classes 0..C-1, in numeric order when every value
    is a number (``"1"`` and ``"1.0"`` are one class), else in string order (``info["classes"]``).
    Regression: the target is a number; an empty or ``nan`` target marks an unlabelled row (NaN).

    Features are standardised per column with the training split's mean and std; regression targets too,
    so default learning rates fit targets of any scale. Both are recorded in ``info["preprocess"]``
    (``input_mean``, ``input_std``, ``target_mean``, ``target_std``: model input = (raw - mean) / std,
    prediction = output * std + mean), which lands in report.json and which ``kdkit export`` folds into the
    exported file; evaluation reports regression errors in the CSV's units (``ArrayData.target_scale``).

    Raises:
        KdkitError: a file that is not UTF-8 CSV, rows of the wrong length, non-numeric, NaN or infinite
            features, a non-numeric regression target, each naming the line and column; split files whose
            columns differ, or a validation/test class the training file lacks.
    """
    if task not in ("classification", "regression"):
        raise KdkitError(f"csv: data.task must be 'classification' or 'regression'; got {task!r}")
    files = _split_files(path, train_path, val_path, test_path, "csv")
    if files is None:
        features, feats, raw_targets, lines = _csv_table(path, target)
        n_val, n_test = int(len(feats) * val_fraction), int(len(feats) * test_fraction)
        tr, va, te = fixed_split(len(feats), n_val, n_test, seed=seed)
        source = str(path)
    else:
        tables = [_csv_table(f, target) if f is not None else None for f in files]
        features = tables[0][0]
        for f, tab in zip(files[1:], tables[1:]):
            if tab is not None and tab[0] != features:
                raise KdkitError(f"csv: {f} has the columns {', '.join(tab[0])} but {files[0]} has "
                                 f"{', '.join(features)}; expected the same columns in every split file")
        present = [tab for tab in tables if tab is not None]
        feats = np.concatenate([tab[1] for tab in present])
        raw_targets = [v for tab in present for v in tab[2]]
        lines = [n for tab in present for n in tab[3]]
        sizes = [0 if tab is None else len(tab[1]) for tab in tables]
        bounds = np.cumsum([0] + sizes)
        tr, va, te = (torch.arange(int(bounds[i]), int(bounds[i + 1])) for i in range(3))
        if task == "classification":
            known = set(tables[0][2])
            for f, tab in zip(files[1:], tables[1:]):
                extra = sorted(set(tab[2]) - known) if tab is not None else []
                if extra:
                    raise KdkitError(f"csv: {f} has the class {extra[0]!r} in {target!r}, which {files[0]} never "
                                     f"has; expected every validation and test class among the training ones")
        source = ", ".join(f for f in files if f is not None)
    y, values = _csv_targets(source, target, raw_targets, lines, task)
    num_classes: Optional[int] = len(values) if task == "classification" else None
    x = torch.from_numpy(feats)
    mean, std = _scale(x[tr])
    preprocess: Dict[str, object] = {"input_mean": mean.tolist(), "input_std": std.tolist()}
    target_scale = None
    if task == "regression":
        t_mean, t_std = _scale(y[tr])
        y = (y - t_mean) / t_std
        target_scale = (t_mean, t_std)
        preprocess.update(target_mean=t_mean.tolist(), target_std=t_std.tolist())

    def split(idx: torch.Tensor) -> Optional[ArrayData]:
        return ArrayData((x[idx] - mean) / std, y[idx], target_scale) if files is None or len(idx) else None

    return DataSplits(split(tr), split(va), split(te), num_classes=num_classes, input_shape=(x.shape[1],), task=task,
                      output_dim=1 if task == "regression" else None,
                      info={"source": source, "features": features, "target": target, "classes": values,
                            "preprocess": preprocess})
