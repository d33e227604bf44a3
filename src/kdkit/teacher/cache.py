"""Teacher-output cache: compute the frozen teacher's outputs once, reuse them every epoch.

In knowledge distillation the teacher's forward pass is most of a training
step's cost. When the inputs the teacher sees are the same every epoch (no
random augmentation), its outputs are a fixed table indexed by sample position,
and the loop can read that table instead of running the teacher. The
:class:`kdkit.teacher.Teacher` does the lookup by ``batch["index"]``; methods
never know.

Storage forms (``(N, C)`` teacher outputs for ``N`` samples):

- dense ``float32`` (exact) or ``float16`` (half the memory; logits rounded to
  ~3 significant digits, the maximum absolute error is reported);
- top-k sparse: the ``k`` largest logits and their class indices per sample,
  plus one ``float32`` "rest" logit per sample. Reconstruction puts the stored
  values back in place and fills every other class with the rest logit, chosen
  so that at temperature 1 the reconstructed distribution keeps each top-k
  probability exactly and spreads the remaining probability mass *uniformly*
  over the other ``C - k`` classes. The approximation error,
  ``KL(softmax(z/T) ‖ softmax(ẑ/T))`` between full and reconstructed soft
  targets, is measured for every sample at build time (mean and max at T=1 and
  T=4) and stored in the cache's metadata.

Where it lives: in memory when it fits, else (or when asked) in a directory of
``.npy`` files opened as numpy memory maps (plain arrays, never pickles) plus a
``meta.json``. A disk cache is keyed by a *slot* (what the teacher and dataset
look like: architecture, sizes, storage form) and carries a *fingerprint* of
the content (a hash of the teacher's weights and of the dataset's input tensors
plus its transform description); a slot whose fingerprint no longer matches is
stale, reported with a message naming what changed, and rebuilt. Building is
resumable: rows are written in chunks and marked done only after they are
flushed.

Teacher features. A method that reads the teacher's intermediate layers declares them
(``method.teacher_layers``); the cache then also holds, per row, what forward hooks capture at exactly those
module names (outputs, or inputs for ``name:input``), in ``train.cache_feature_dtype`` (default ``float16``:
half the memory; the logits keep ``train.cache_dtype``). For a text teacher that drops trailing all-pad
columns (:func:`sequence_length`), a captured tensor whose dimension 1 is the sequence is stored at the
dataset's full padded length, zeros past each example's real length, and cut on reading to the length the
teacher would have run at for that batch, so a method sees the same shapes cached and live.
:meth:`kdkit.teacher.Teacher.with_features` is the one place a method's teacher features come from.

Random augmentation breaks the premise (the teacher would see a different view
each epoch). kdkit's own replayable augmentation (:mod:`kdkit.teacher.augment`,
``data.augment: crop_flip``) keeps it: a fixed number of views per sample, each
a pure function of (seed, sample, view), as in FKD (Shen & Xing, "A Fast
Knowledge Distillation Framework for Visual Recognition", ECCV 2022); the cache
then holds one row per (sample, view) and the student always gets the view
whose teacher output it is paired with. Any other augmentation (a dataset with
``augmented = True``, a torchvision ``Random*`` transform) makes ``auto``
refuse to cache, and ``memory``/``disk`` refuse with an error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.core import teacher_inputs, trim_to_longest
from ..errors import KdkitError

CACHE_VERSION = 1
_DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16)}
# Names of torchvision-style transforms that draw random numbers: a dataset whose transform mentions one is augmented.
_RANDOM_TRANSFORMS = ("Random", "ColorJitter", "AutoAugment", "RandAugment", "TrivialAugment", "AugMix",
                      "GaussianBlur", "ElasticTransform", "Mixup", "CutMix")


#: What :func:`build_cache` did in this process: ``built`` caches computed (a teacher pass over the data each;
#: ``rows`` computed in all) and ``reused`` complete disk caches read instead. A sweep reads the change per trial.
BUILD_COUNTS: Dict[str, int] = {"built": 0, "reused": 0, "rows": 0}


# ----------------------------------------------------------------------------- fingerprints

def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    h.update(f"{t.dtype}:{t.numel()};".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16
                 else t.numpy().tobytes())


# In-process memo of fingerprints: {id(obj): (weakref to obj, version stamp, fingerprint)}. The stamp is made
# of the tensors' in-place version counters, so any in-place change (an optimiser step, x[3] += 1) misses.
_MEMO: Dict[int, Tuple[Any, Tuple, str]] = {}


def _memo(obj, stamp: Tuple, compute: Callable[[], str]) -> str:
    import weakref

    hit = _MEMO.get(id(obj))
    if hit is not None and hit[0]() is obj and hit[1] == stamp:
        return hit[2]
    fp = compute()
    try:
        _MEMO[id(obj)] = (weakref.ref(obj), stamp, fp)
    except TypeError:  # not weak-referenceable: no memo
        pass
    return fp


def fingerprint_model(model: nn.Module) -> str:
    """A hash of a module's class and every tensor of its ``state_dict`` (weights and buffers).

    Memoised per process (until a tensor of the module changes in place), so repeated runs with the same
    teacher hash it once."""
    state = model.state_dict()
    stamp = tuple((k, v.data_ptr(), v._version) for k, v in state.items())
    return _memo(model, stamp, lambda: _fingerprint_model(model, state))


def _fingerprint_model(model: nn.Module, state: Dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(type(model).__qualname__.encode())
    for k, v in state.items():
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        _hash_tensor(h, v)
    return h.hexdigest()


def transform_description(data) -> str:
    """What is done to a sample before the teacher sees it (``transform_description`` attribute, else repr)."""
    desc = getattr(data, "transform_description", None)
    if desc is not None:
        return str(desc)
    tf = getattr(data, "transform", None)
    return "none" if tf is None else repr(tf)


def is_augmented(data) -> bool:
    """Whether a dataset applies random augmentation (an ``augmented`` attribute, else its transform's names)."""
    flag = getattr(data, "augmented", None)
    if flag is not None:
        return bool(flag)
    desc = transform_description(data)
    return any(name in desc for name in _RANDOM_TRANSFORMS)


def fingerprint_data(data) -> str:
    """A hash of what the teacher sees: the input tensor of an in-memory dataset (every byte), else the
    dataset's type, length and 16 evenly spaced samples; plus the transform description."""
    h = hashlib.blake2b(digest_size=16)
    h.update(transform_description(data).encode())
    x = getattr(data, "teacher_x", None)  # the teacher's own token ids when it has its own tokenizer
    x = getattr(data, "x", None) if x is None else x
    if torch.is_tensor(x):
        def compute() -> str:
            h.update(f"array{tuple(x.shape)}".encode())
            _hash_tensor(h, x)
            return h.hexdigest()

        # Memoised per process on the input tensor (hashing 60,000 images takes most of a second).
        return _memo(x, (x.data_ptr(), x._version, tuple(x.shape), transform_description(data)), compute)
    n = len(data)
    h.update(f"{type(data).__qualname__}:{n}".encode())
    for i in sorted({int(j) for j in np.linspace(0, n - 1, num=min(16, n))}) if n else []:
        item = data[i]
        item = item.get("x") if isinstance(item, dict) else item[0] if isinstance(item, (tuple, list)) else item
        _hash_tensor(h, torch.as_tensor(item))
    return h.hexdigest()


def slot_name(model: nn.Module, data, out_shape: Tuple[int, ...], dtype: str, topk: Optional[int],
              layers: Sequence[str] = (), feature_dtype: str = "float16") -> str:
    """The name of a disk cache: what the teacher and dataset *look like*, not their content, and which teacher
    layers it holds (a cache of outputs only and one with features never share a slot)."""
    x = getattr(data, "x", None)
    shape = tuple(x.shape) if torch.is_tensor(x) else (len(data),)
    key = f"{type(model).__qualname__}|{type(data).__qualname__}|{shape}|{out_shape}|{dtype}|{topk}"
    if layers:  # outputs-only slots keep the names they always had
        key += f"|layers={list(layers)}|{feature_dtype}"
    return f"{type(model).__name__.lower()}-{len(data)}-" + hashlib.blake2b(key.encode(), digest_size=6).hexdigest()


def default_cache_dir() -> Path:
    """``$KDKIT_CACHE_DIR``, else ``~/.cache/kdkit/teacher``."""
    env = os.environ.get("KDKIT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "kdkit" / "teacher"


# ----------------------------------------------------------------------------- teacher features

def sequence_length(model: nn.Module, x: torch.Tensor) -> Optional[int]:
    """The sequence length a text teacher runs at for the batch ``x`` (B, L): the longest row's non-pad count (at
    least 1; :func:`kdkit.data.core.trim_to_longest`'s rule) when the model trims trailing all-pad columns
    (``trim`` and ``pad_token_id`` attributes, as :class:`~kdkit.hf.HFClassifier` and ``HFCausalLM``); None for
    every other model, which runs at the width it is given."""
    if not getattr(model, "trim", False) or getattr(model, "pad_token_id", None) is None:
        return None
    if not torch.is_tensor(x) or x.dim() != 2 or x.is_floating_point():
        return None

    return int(trim_to_longest(x, int(model.pad_token_id)).shape[1])


@dataclass(frozen=True)
class FeatureLayout:
    """What a cache stores of the teacher's layers: ``names`` (module names, ``name:input`` for inputs), one row's
    ``shapes`` (a sequence feature at the dataset's full padded length), and ``sequence``: whether dimension 1
    of each is the sequence (cut to the batch's run length when read)."""

    names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]
    sequence: Tuple[bool, ...]

    def describe(self) -> str:
        """``the teacher layers a, b`` (three or fewer), else ``N teacher layers (first, ..., last)``."""
        names = self.names
        if len(names) <= 3:
            return f"the teacher layers {', '.join(names)}"
        return f"{len(names)} teacher layers ({names[0]}, ..., {names[-1]})"


def _captured(model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The model's outputs on ``x`` and the tensors forward hooks capture at ``layers`` (call under inference mode)."""
    from ..methods.hooks import FeatureCapture  # the same capture the methods' live path uses

    if not layers:
        return model(x), []
    capture = FeatureCapture(model, layers, "teacher")
    with capture:
        out = model(x)
        feats = capture.features()
    capture.clear()
    return out, feats


def probe(model: nn.Module, data, device: torch.device,
          layers: Sequence[str] = ()) -> Tuple[Tuple[int, ...], Optional[FeatureLayout]]:
    """The teacher's output shape per sample and, with ``layers``, the :class:`FeatureLayout` of those layers,
    from a forward pass on the first two samples.

    A text teacher (:func:`sequence_length`) runs twice, the second time one position shorter: a captured tensor
    whose dimension 1 follows the run length is a sequence feature, stored at the data's full width.

    Raises:
        KdkitError: the teacher's output is not a tensor.
    """
    from ..data.core import make_loader

    batch = next(iter(make_loader(data, 2)))
    x = teacher_inputs(batch).to(device)
    with torch.inference_mode():
        out, feats = _captured(model, x, layers)
        length = sequence_length(model, x)
        shorter = _captured(model, x[:, :length - 1], layers)[1] if layers and length and length > 1 else None
    if not torch.is_tensor(out):
        raise KdkitError(f"the teacher returns {type(out).__name__}, not a tensor; only tensor outputs can be cached")
    if not layers:
        return tuple(out.shape[1:]), None
    shapes, sequence = [], []
    for i, f in enumerate(feats):
        seq = (length is not None and f.dim() >= 2 and f.shape[1] == length
               and (shorter is None or shorter[i].shape[1] == length - 1))
        shapes.append((x.shape[1], *f.shape[2:]) if seq else tuple(f.shape[1:]))
        sequence.append(bool(seq))
    return tuple(out.shape[1:]), FeatureLayout(tuple(layers), tuple(shapes), tuple(sequence))




# ----------------------------------------------------------------------------- top-k form

def topk_compress(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``k`` largest logits per row and one "rest" logit.

    Args:
        logits: (B, C) float logits, ``k < C``.
    Returns:
        values (B, k), indices (B, k) and rest (B,): the logit every other class gets so that, at temperature 1,
        the other ``C - k`` classes share the remaining probability mass uniformly:
        ``rest = log((1 - Σ_topk p) / (C - k)) + logsumexp(z)``.
    """
    z = logits.float()
    values, indices = z.topk(k, dim=1)
    c = z.shape[1]
    lse = torch.logsumexp(z, dim=1)
    # log of the mass outside the top k, computed stably as logsumexp over the other classes.
    others = z.scatter(1, indices, float("-inf"))
    log_rest_mass = torch.logsumexp(others, dim=1)
    rest = log_rest_mass - math.log(c - k)
    rest = torch.where(torch.isfinite(rest), rest, lse - 1e4)  # no mass left: a very negative logit
    del lse
    return values, indices, rest


def topk_expand(values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, k) values + (B, k) indices + (B,) rest -> (B, C) float32 logits (see :func:`topk_compress`)."""
    out = rest.float().unsqueeze(1).expand(len(rest), num_classes).clone()
    return out.scatter_(1, indices.long(), values.float())


def soft_target_kl(full: torch.Tensor, approx: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-sample ``KL(softmax(full/T) ‖ softmax(approx/T))``, shape (B,)."""
    lp = F.log_softmax(full.float() / temperature, dim=1)
    lq = F.log_softmax(approx.float() / temperature, dim=1)
    return (lp.exp() * (lp - lq)).sum(1)


# ----------------------------------------------------------------------------- the cache

@dataclass
class CacheSpec:
    """How to store: ``dtype`` "float32"|"float16" (the outputs); ``topk`` None (dense) or k; ``storage``
    "memory"|"disk"; ``layers``: module names of the teacher whose captured tensors are stored too (a feature
    method's ``teacher_layers``; empty: outputs only), in ``feature_dtype``."""

    dtype: str = "float32"
    topk: Optional[int] = None
    storage: str = "memory"
    layers: Tuple[str, ...] = ()
    feature_dtype: str = "float16"

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise KdkitError(f"cache dtype must be float32 or float16; got {self.dtype!r}")
        if self.feature_dtype not in _DTYPES:
            raise KdkitError(f"cache feature dtype must be float32 or float16; got {self.feature_dtype!r}")
        if isinstance(self.layers, str) or not all(isinstance(n, str) and n for n in self.layers):
            raise KdkitError(f"cache layers must be a list of module names; got {self.layers!r}")
        self.layers = tuple(dict.fromkeys(self.layers))
        if self.topk is not None and self.topk < 1:
            raise KdkitError(f"cache top-k must be >= 1; got {self.topk}")
        if self.storage not in ("memory", "disk"):
            raise KdkitError(f"cache storage must be memory or disk; got {self.storage!r}")


def feature_bytes(n: int, features: Optional["FeatureLayout"], spec: CacheSpec) -> int:
    """Bytes the stored teacher features take: ``n`` rows × Σ over layers of the per-row size (a sequence
    feature at the dataset's full padded length) × 2 (float16) or 4 (float32)."""
    if features is None:
        return 0
    itemsize = 2 if spec.feature_dtype == "float16" else 4
    return n * sum(int(np.prod(shape)) for shape in features.shapes) * itemsize


def cache_bytes(n: int, out_shape: Tuple[int, ...], spec: CacheSpec, features: Optional["FeatureLayout"] = None) -> int:
    """Bytes the cache's arrays take (values, plus indices and rest for top-k, plus the 1-byte done mask, plus the
    teacher features of :func:`feature_bytes`)."""
    itemsize = 2 if spec.dtype == "float16" else 4
    if spec.topk is None or len(out_shape) != 1 or spec.topk >= out_shape[0]:
        return n * int(np.prod(out_shape)) * itemsize + n + feature_bytes(n, features, spec)
    k = spec.topk
    idx_size = 2 if out_shape[0] <= 32767 else 4
    return n * k * (itemsize + idx_size) + n * 4 + n + feature_bytes(n, features, spec)


class TeacherCache:
    """A table of teacher outputs, one row per training sample, looked up by sample index.

    Build one with :func:`build_cache` (or :meth:`open` a complete disk cache). ``get(index)`` returns float32
    outputs (B, *out_shape) on the requested device; ``get_features(index, names, length)`` the stored teacher
    features (``feature0.npy``, ``feature1.npy``, ... in the order of ``meta["layers"]``).

    Attributes:
        meta: ``fingerprint``, ``n``, ``out_shape``, ``dtype``, ``topk``, ``complete``, measured errors, and for a
            feature cache ``layers``, ``feature_shapes``, ``feature_sequence``, ``feature_dtype``.
        path: the directory of a disk cache, or None in memory.
        features: the :class:`FeatureLayout` stored, or None (outputs only).
    """

    def __init__(self, arrays: Dict[str, Any], meta: Dict[str, Any], path: Optional[Path] = None):
        self.meta = meta
        self.path = path
        self._np = arrays  # numpy arrays (memmaps on disk)
        # Zero-copy torch views: indexing them reads only the rows asked for (pages, for a memmap).
        self._t = {k: torch.from_numpy(v) for k, v in arrays.items()}
        self.out_shape = tuple(meta["out_shape"])
        self.topk = meta.get("topk")
        layers = meta.get("layers") or []
        self.features = (FeatureLayout(tuple(layers), tuple(tuple(s) for s in meta["feature_shapes"]),
                                       tuple(bool(b) for b in meta["feature_sequence"])) if layers else None)
        self.filled = int(arrays["done"].sum()) if not meta.get("complete") else len(arrays["done"])

    # -- facts
    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self._np.values()))

    def __len__(self) -> int:
        return int(self.meta["n"])

    def describe(self) -> str:
        form = f"top-{self.topk}" if self.topk else "dense"
        where = f"disk ({self.path})" if self.path is not None else "memory"
        text = f"{form} {self.meta['dtype']} in {where}, {self.nbytes / 2**20:.1f} MiB"
        if "topk_kl_mean_t1" in self.meta:
            text += (f"; top-k reconstruction KL mean {self.meta['topk_kl_mean_t1']:.2e} (T=1), "
                     f"{self.meta['topk_kl_mean_t4']:.2e} (T=4), max {self.meta['topk_kl_max_t1']:.2e} (T=1)")
        if "fp16_max_abs_error" in self.meta:
            text += f"; fp16 max |error| {self.meta['fp16_max_abs_error']:.2e}"
        if self.features is not None:
            mib = sum(a.nbytes for k, a in self._np.items() if k.startswith("feature")) / 2**20
            text += f"; {self.features.describe()} in {self.meta['feature_dtype']}, {mib:.1f} MiB of it"
            if "feature_fp16_max_abs_error" in self.meta:
                text += f" (fp16 max |error| {self.meta['feature_fp16_max_abs_error']:.2e})"
        return text

    # -- lookup
    def get(self, index: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
        """Teacher outputs of samples ``index`` (B,), as float32 (B, *out_shape) on ``device``."""
        # The training step's hot path: no conversion (nor device object) made when none is needed.
        idx = index if index.dtype == torch.long and index.device.type == "cpu" else index.to("cpu", torch.long)
        if self.topk:
            out = topk_expand(self._t["values"][idx], self._t["indices"][idx], self._t["rest"][idx],
                              self.out_shape[0])
        else:
            out = self._t["values"][idx]
            out = out if out.dtype == torch.float32 else out.float()
        if device is None or out.device == (device if isinstance(device, torch.device) else torch.device(device)):
            return out
        return out.to(device, non_blocking=True)

    def get_features(self, index: torch.Tensor, names: Sequence[str], length: Optional[int] = None,
                     device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
        """The stored teacher features of samples ``index`` (B,) at module names ``names``, as float32 on ``device``.

        A sequence feature is cut to ``length`` positions (the length the teacher would have run at for this batch,
        :func:`sequence_length`); positions past a row's real length hold zeros.

        Raises:
            KdkitError: a name this cache does not hold (it was built for other layers, or without features).
        """
        held = self.features.names if self.features is not None else ()
        missing = [n for n in names if n not in held]
        if missing:
            raise KdkitError(f"the teacher cache holds no features of teacher layer(s) {', '.join(missing)} (it holds "
                             f"{', '.join(held) or 'outputs only'}); build it with those layers (CacheSpec.layers, "
                             f"the method's teacher_layers) or use train.teacher_cache=off")
        idx = index.to("cpu", torch.long)
        out = {}
        for name in names:
            i = held.index(name)
            t = self._t[f"feature{i}"]
            if self.features.sequence[i] and length is not None:
                t = t[:, :length]  # a view: the gather below copies only the positions this batch runs at
            t = t[idx].float()
            out[name] = t if device is None or t.device == torch.device(device) else t.to(device, non_blocking=True)
        return out

    def has(self, index: torch.Tensor) -> bool:
        """Whether every row of ``index`` is stored (a host-side check of the CPU done mask)."""
        return self.filled >= len(self) or bool(self._t["done"][index.to("cpu", torch.long)].all())

    # -- building
    @classmethod
    def allocate(cls, n: int, out_shape: Tuple[int, ...], spec: CacheSpec, fingerprint: Dict[str, str],
                 path: Optional[Path] = None, features: Optional[FeatureLayout] = None) -> "TeacherCache":
        """Empty arrays (memory, or fresh ``.npy`` memmaps under ``path``) for ``n`` rows, with room for the teacher
        ``features`` (from :func:`probe`) when given."""
        np_dtype = _DTYPES[spec.dtype][1]
        topk = spec.topk if spec.topk is not None and len(out_shape) == 1 and spec.topk < out_shape[0] else None
        shapes: Dict[str, Tuple[Tuple[int, ...], Any]] = {"done": ((n,), np.uint8)}
        if topk:
            idx_dtype = np.int16 if out_shape[0] <= 32767 else np.int32
            shapes.update(values=((n, topk), np_dtype), indices=((n, topk), idx_dtype), rest=((n,), np.float32))
        else:
            shapes["values"] = ((n, *out_shape), np_dtype)
        meta = {"version": CACHE_VERSION, "n": n, "out_shape": list(out_shape), "dtype": spec.dtype, "topk": topk,
                "complete": False, **fingerprint}
        if features is not None:
            for i, shape in enumerate(features.shapes):
                shapes[f"feature{i}"] = ((n, *shape), _DTYPES[spec.feature_dtype][1])
            meta.update(layers=list(features.names), feature_shapes=[list(s) for s in features.shapes],
                        feature_sequence=list(features.sequence), feature_dtype=spec.feature_dtype)
        if path is None:
            arrays = {k: np.zeros(s, dtype=d) for k, (s, d) in shapes.items()}
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "meta.json").unlink(missing_ok=True)  # incomplete until meta says otherwise
            arrays = {k: np.lib.format.open_memmap(path / f"{k}.npy", mode="w+", dtype=d, shape=s)
                      for k, (s, d) in shapes.items()}
            _write_meta(path, meta)
        return cls(arrays, meta, path)

    def put(self, index: torch.Tensor, outputs: torch.Tensor) -> None:
        """Store the teacher's outputs (B, *out_shape) of samples ``index`` (B,)."""
        idx = index.to("cpu", torch.long)
        out = outputs.detach().to("cpu").float()
        if self.topk:
            values, indices, rest = topk_compress(out, self.topk)
            self._t["values"][idx] = values.to(self._t["values"].dtype)
            self._t["indices"][idx] = indices.to(self._t["indices"].dtype)
            self._t["rest"][idx] = rest
            approx = topk_expand(self._t["values"][idx], self._t["indices"][idx], rest, self.out_shape[0])
            self._stat("topk_kl_t1", soft_target_kl(out, approx, 1.0))
            self._stat("topk_kl_t4", soft_target_kl(out, approx, 4.0))
        else:
            self._t["values"][idx] = out.to(self._t["values"].dtype)
            if self.meta["dtype"] == "float16":
                err = (self._t["values"][idx].float() - out).abs().reshape(len(idx), -1).amax(1)
                self._stat("fp16_abs_error", err)

    def put_features(self, index: torch.Tensor, features: Sequence[torch.Tensor], real: Optional[torch.Tensor]) -> None:
        """Store the captured teacher tensors of samples ``index`` (B,), in the order of the layout's names.

        A sequence feature (B, R, ...) ran at length R: it is written at positions ``0..R-1`` of its full-width
        row, multiplied by ``real`` (B, R), the mask of the example's real (non-pad) positions, so every position
        past an example's real length holds zero.

        Raises:
            KdkitError: a feature whose shape does not fit the layout (dimension 1 does not follow the run length),
                or a finite value beyond float16's range.
        """
        idx = index.to("cpu", torch.long)
        layout = self.features
        for i, (name, f) in enumerate(zip(layout.names, features)):
            f = f.detach().to("cpu").float()
            store = self._t[f"feature{i}"]
            row = tuple(store.shape[1:])
            if layout.sequence[i]:
                r = f.shape[1] if f.dim() >= 2 else -1
                if real is None or r != real.shape[1] or tuple(f.shape[2:]) != row[1:] or r > row[0]:
                    raise KdkitError(f"teacher layer {name!r} gave shape {tuple(f.shape)} on a batch the teacher ran "
                                     f"at length {None if real is None else real.shape[1]}; expected (B, that length, "
                                     f"{', '.join(map(str, row[1:]))}) as on the first batch")
                f = torch.where(real.reshape(*real.shape, *([1] * (f.dim() - 2))), f, torch.zeros((), dtype=f.dtype))
                full = torch.zeros((len(idx), *row), dtype=f.dtype)
                full[:, :r] = f
                f = full
            elif tuple(f.shape[1:]) != row:
                raise KdkitError(f"teacher layer {name!r} gave shape {tuple(f.shape)}; expected (B, "
                                 f"{', '.join(map(str, row))}) as on the first batch")
            stored = f.to(store.dtype)
            if store.dtype == torch.float16:
                bad = torch.isfinite(f) & ~torch.isfinite(stored)
                if bool(bad.any()):
                    raise KdkitError(f"teacher layer {name!r} has values beyond float16's range (max |value| "
                                     f"{float(f[bad].abs().max()):.3g} > 65504); use train.cache_feature_dtype: "
                                     f"float32")
                self._stat("feature_fp16_abs_error", (stored.float() - f).abs().reshape(len(idx), -1).amax(1))
            store[idx] = stored

    def _stat(self, name: str, per_sample: torch.Tensor) -> None:
        s = self.__dict__.setdefault("_stats", {})
        tot, mx, cnt = s.get(name, (0.0, 0.0, 0))
        s[name] = (tot + float(per_sample.double().sum()), max(mx, float(per_sample.max())), cnt + len(per_sample))

    def mark_done(self, index: torch.Tensor) -> None:
        self._t["done"][index.to("cpu", torch.long)] = 1

    def flush(self) -> None:
        """Write values first, the done mask after: an interrupted build never marks unwritten rows done."""
        for k, a in self._np.items():
            if k != "done" and isinstance(a, np.memmap):
                a.flush()
        done = self._np["done"]
        if isinstance(done, np.memmap):
            done.flush()

    def missing(self) -> torch.Tensor:
        """Indices of rows not built yet."""
        return torch.nonzero(self._t["done"] == 0).flatten()

    def finish(self) -> None:
        """Record the measured errors and mark complete (on disk: rewrite meta.json last)."""
        stats = self.__dict__.get("_stats", {})
        if "topk_kl_t1" in stats:
            for t in ("t1", "t4"):
                tot, mx, cnt = stats[f"topk_kl_{t}"]
                self.meta[f"topk_kl_mean_{t}"] = tot / max(cnt, 1)
                self.meta[f"topk_kl_max_{t}"] = mx
        if "fp16_abs_error" in stats:
            tot, mx, cnt = stats["fp16_abs_error"]
            self.meta["fp16_max_abs_error"] = mx
        if "feature_fp16_abs_error" in stats:
            self.meta["feature_fp16_max_abs_error"] = stats["feature_fp16_abs_error"][1]
        self.meta["complete"] = True
        if self.path is not None:
            self.flush()
            _write_meta(self.path, self.meta)

    @classmethod
    def open(cls, path: Path, writable: bool = False) -> Optional["TeacherCache"]:
        """A disk cache's memmaps (read-only by default), or None if there is none at ``path``."""
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            return None
        meta = json.loads(meta_file.read_text())
        if meta.get("version") != CACHE_VERSION:
            return None
        names = (["done", "values"] + (["indices", "rest"] if meta.get("topk") else [])
                 + [f"feature{i}" for i in range(len(meta.get("layers") or []))])
        try:
            arrays = {k: np.load(path / f"{k}.npy", mmap_mode="r+" if writable else "r", allow_pickle=False)
                      for k in names}
        except (OSError, ValueError):
            return None
        if not writable:
            # torch.from_numpy warns on read-only arrays; the cache never writes through these views.
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return cls(arrays, meta, path)
        return cls(arrays, meta, path)

    def to_memory(self) -> "TeacherCache":
        """A copy held in RAM (for a disk cache that fits)."""
        return TeacherCache({k: np.array(v) for k, v in self._np.items()}, dict(self.meta), None)

    def matches(self, fingerprint: Dict[str, str], layers: Sequence[str] = ()) -> Optional[str]:
        """None if this cache was built for ``fingerprint`` and holds the teacher ``layers``, else what differs
        (one phrase)."""
        changed = [what for what, key in (("teacher weights", "teacher_fingerprint"), ("dataset", "data_fingerprint"))
                   if self.meta.get(key) != fingerprint.get(key)]
        held = list(self.meta.get("layers") or [])
        if held != list(layers):
            changed.append(f"teacher layers (it holds {', '.join(held) or 'none'}, the method reads "
                           f"{', '.join(layers) or 'none'})")
        return " and ".join(changed) + " changed" if changed else None


def _write_meta(path: Path, meta: Dict[str, Any]) -> None:
    tmp = path / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path / "meta.json")


def fingerprint(model: nn.Module, data) -> Dict[str, str]:
    return {"teacher_fingerprint": fingerprint_model(model), "data_fingerprint": fingerprint_data(data)}


def build_cache(model: nn.Module, data, spec: CacheSpec, *, cache_dir: Optional[Path] = None, batch_size: int = 512,
                progress: bool = False, log: Callable[[str], None] = print) -> TeacherCache:
    """Compute (or reuse) the teacher's outputs on every sample of ``data``.

    With ``spec.layers`` the tensors forward hooks capture at those teacher modules are stored too (see the module
    docstring: full padded length and zeros past each example for a text teacher's sequence features).
    With ``spec.storage == "disk"`` the cache lives under ``cache_dir / slot``: a complete cache with the same
    fingerprint and the same layers is reused as is, an incomplete one is resumed, a stale one (teacher or
    dataset changed) is rebuilt after saying so. With ``"memory"``, a matching complete disk cache (if
    ``cache_dir`` has one) is loaded into RAM, else the outputs are computed in RAM.

    Args:
        model: the frozen teacher network (eval mode).
        data: the dataset whose ``index`` positions the training batches carry.
        spec: storage form.
        cache_dir: parent folder of disk caches (default :func:`default_cache_dir`).
        batch_size: batch size of the teacher's passes.
        progress: show a progress bar.
        log: where one-line messages go (reuse, staleness, resume).

    The returned cache is complete. A disk build that is interrupted (an exception, Ctrl-C) flushes the rows
    it finished, so the next build resumes from them.
    """
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    was_training = model.training
    model.eval()
    out_shape, features = probe(model, data, device, spec.layers)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / slot_name(model, data, out_shape, spec.dtype, spec.topk, spec.layers, spec.feature_dtype)
    fp: Optional[Dict[str, str]] = None
    if spec.storage == "disk" or (path / "meta.json").is_file():
        fp = fingerprint(model, data)  # hashing weights and data costs a fraction of one teacher pass
    cache, reused = _existing_cache(path, fp, spec, log)
    if reused:
        model.train(was_training)
        return cache
    augment = getattr(data, "augment", None)
    views = getattr(augment, "views", 1)  # replayable augmentation (kdkit.teacher.augment): one row per (sample, view)
    if cache is None:
        cache = TeacherCache.allocate(len(data) * views, out_shape, spec, fp or {},
                                      path if spec.storage == "disk" else None, features)
    todo = cache.missing()
    chunks = _build_batches(data, augment, views, todo, len(cache), batch_size, progress)
    try:
        _fill(cache, model, chunks, device, spec.layers)
    finally:
        if cache.path is not None:
            cache.flush()  # values first, then the done mask: what was finished is kept for a resume
        model.train(was_training)
    cache.filled = len(cache)
    cache.finish()
    BUILD_COUNTS["built"] += 1
    BUILD_COUNTS["rows"] += len(todo)
    return cache


def _existing_cache(path: Path, fp: Optional[Dict[str, str]], spec: CacheSpec,
                    log: Callable[[str], None]) -> Tuple[Optional[TeacherCache], bool]:
    """What is on disk at ``path``: ``(cache, True)`` a complete matching cache to use as is, ``(cache, False)`` an
    incomplete disk cache to resume, ``(None, False)`` nothing usable (missing, or stale: said through ``log``)."""
    existing = TeacherCache.open(path, writable=spec.storage == "disk")
    if existing is None:
        return None, False
    stale = existing.matches(fp, spec.layers)
    if stale is not None:
        log(f"teacher cache {path} is stale ({stale}); " + ("rebuilding it" if spec.storage == "disk"
                                                             else "ignoring it and caching in memory"))
        return None, False
    if existing.complete:
        log(f"teacher cache: reusing {path}")
        BUILD_COUNTS["reused"] += 1
        return (existing.to_memory() if spec.storage == "memory" else existing), True
    if spec.storage == "disk":
        log(f"teacher cache: resuming {path} ({existing.filled}/{len(existing)} rows done)")
        return existing, False
    return None, False


def _build_batches(data, augment, views: int, todo, rows: int, batch_size: int, progress: bool) -> Iterable:
    """The batches a build runs the teacher on: every (sample, view) of augmented data, only the missing rows of a
    resumed cache, else the dataset in order; behind a progress bar on request (a terminal only)."""
    from ..data.core import make_loader

    chunks: Iterable = make_loader(data, batch_size)
    if views > 1 or augment is not None:
        chunks = _view_batches(data, augment, batch_size)
    elif len(todo) < rows:  # resume: only the missing rows, in chunks of batch_size
        chunks = _subset_batches(data, todo, batch_size)
    if progress:  # a redirected log gets no bar fragments
        from ..training.progress import Progress

        chunks = Progress(bar=True)(chunks, total=-(-len(todo) // batch_size), desc="teacher cache")
    return chunks


@torch.inference_mode()
def _fill(cache: TeacherCache, model: nn.Module, chunks: Iterable, device: torch.device,
          layers: Sequence[str]) -> None:
    """Run the teacher on each batch not yet done and store its outputs (and captured layers); a disk cache is
    flushed every 20 batches."""
    for i, batch in enumerate(chunks):
        idx = batch.get("cache_index", batch["index"])
        if cache.has(idx):  # done before an interruption
            continue
        x = teacher_inputs(batch).to(device)
        out, feats = _captured(model, x, layers)
        cache.put(idx, out)
        if feats:
            length = sequence_length(model, x)
            real = None if length is None else (x[:, :length] != int(model.pad_token_id)).cpu()
            cache.put_features(idx, feats, real)
        cache.mark_done(idx)
        if cache.path is not None and i % 20 == 19:
            cache.flush()


def _view_batches(data, augment, batch_size: int):
    """Every (sample, view) of an augmented in-memory dataset, as batches with their ``cache_index``."""
    n = len(data)
    for v in range(augment.views):
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n))
            view = torch.full_like(idx, v)
            yield {"x": augment.apply(data.x[idx], idx, view), "index": idx, "cache_index": idx * augment.views + v}


def _subset_batches(data, todo: torch.Tensor, batch_size: int):
    from ..data.core import ArrayData, _Indexed, teacher_view

    seen = teacher_view(data)  # what the teacher reads: its own token ids when it has its own tokenizer
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        if isinstance(seen, ArrayData):
            yield {"x": seen.x[idx], "index": idx}
        else:
            wrapped = _Indexed(data)
            items = [wrapped[int(i)] for i in idx]
            yield {"x": torch.stack([torch.as_tensor(it["x"]) for it in items]), "index": idx}
