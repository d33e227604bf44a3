"""In-memory datasets, the fast batch iterator and the split container.

Every batch in kdkit is a dict: ``{"x": inputs, "y": labels (optional),
"index": positions in the dataset}``. ``index`` lets a method or a teacher
cache look things up per sample (CRD's memory bank, cached teacher outputs).
A user's DataLoader gives batches without ``index`` (kdkit cannot see which
samples it drew), so its teacher runs live.

Unlabelled samples: a classification label of ``-1`` (:data:`UNLABELLED`), a
regression target of NaN (every column), as in a label-scarce transfer set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import KdkitError

UNLABELLED = -1
#: Causal-LM targets: a position with nothing to predict (padding, prompt, last token) holds this value.
IGNORE_INDEX = -100


class ArrayData(Dataset):
    """A dataset held as whole tensors: ``x`` of shape (N, ...) and optional ``y`` of shape (N,) or (N, D).

    Batches of an ArrayData are cut from the tensors directly (no per-sample
    Python work); see :class:`TensorLoader`.

    ``target_scale`` (regression only): ``(mean, std)`` of shape (D,) when ``y`` holds standardised
    targets; a target in the data's own units is ``y * std + mean``. :func:`kdkit.evaluation.metrics.predict`
    uses it to report outputs and targets in those units.

    Tokenised text (see :mod:`kdkit.hf.text`): ``x`` is a LongTensor (N, L) of ids right-padded with
    ``pad_token_id``. When the teacher has its own tokenizer, ``teacher_x`` (N, L') holds the same texts in
    the teacher's ids (padded with ``teacher_pad_token_id``); batches carry it as ``batch["teacher_x"]`` and
    the teacher reads it instead of ``x`` (:func:`teacher_inputs`). ``bucket_by_length``: the training
    loader puts samples of similar length in the same batch (:class:`TensorLoader`).
    """

    def __init__(self, x: torch.Tensor, y: Optional[torch.Tensor] = None,
                 target_scale: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, *,
                 teacher_x: Optional[torch.Tensor] = None, pad_token_id: Optional[int] = None,
                 teacher_pad_token_id: Optional[int] = None, bucket_by_length: bool = False):
        if y is not None and len(x) != len(y):
            raise KdkitError(f"inputs and targets differ in length: x has {len(x)} samples but y has {len(y)}; "
                             "expected one target per input")
        if teacher_x is not None and len(teacher_x) != len(x):
            raise KdkitError(f"teacher inputs differ in length: x has {len(x)} samples but teacher_x has "
                             f"{len(teacher_x)}; expected the same texts tokenised twice")
        if bucket_by_length and pad_token_id is None:
            raise KdkitError("bucket_by_length needs pad_token_id (lengths are the non-pad tokens of x)")
        self.x = x
        self.y = y
        self.target_scale = target_scale
        self.teacher_x = teacher_x
        self.pad_token_id = pad_token_id
        self.teacher_pad_token_id = teacher_pad_token_id
        self.bucket_by_length = bucket_by_length

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        item = {"x": self.x[i], "index": torch.tensor(i)}
        if self.y is not None:
            item["y"] = self.y[i]
        if self.teacher_x is not None:
            item["teacher_x"] = self.teacher_x[i]
        return item

    def _like(self, x: torch.Tensor, y: Optional[torch.Tensor], teacher_x: Optional[torch.Tensor]) -> "ArrayData":
        return ArrayData(x, y, self.target_scale, teacher_x=teacher_x, pad_token_id=self.pad_token_id,
                         teacher_pad_token_id=self.teacher_pad_token_id, bucket_by_length=self.bucket_by_length)

    def subset(self, idx: torch.Tensor) -> "ArrayData":
        return self._like(self.x[idx], None if self.y is None else self.y[idx],
                          None if self.teacher_x is None else self.teacher_x[idx])

    def without_labels(self) -> "ArrayData":
        return self._like(self.x, None, self.teacher_x)

    def with_labels(self, y: Optional[torch.Tensor]) -> "ArrayData":
        """The same inputs with other targets (``hide_labels``)."""
        return self._like(self.x, y, self.teacher_x)


def teacher_inputs(batch: Dict[str, Any]) -> Any:
    """What the teacher reads from a batch: ``teacher_x`` when the teacher has its own tokenizer, else ``x``."""
    t = batch.get("teacher_x")
    return batch["x"] if t is None else t


def teacher_view(data):
    """``data`` as the teacher sees it: an ArrayData whose ``x`` is ``teacher_x`` when the texts were tokenised
    for the teacher too (targets kept), else ``data`` itself."""
    tx = getattr(data, "teacher_x", None)
    if not isinstance(data, ArrayData) or tx is None:
        return data
    return ArrayData(tx, data.y, data.target_scale, pad_token_id=data.teacher_pad_token_id)


def bucketed_order(order: torch.Tensor, lengths: torch.Tensor, batch_size: int, seed: int, epoch: int,
                   pool_batches: int = 50) -> torch.Tensor:
    """Reorder a shuffled ``order`` so that each batch holds samples of similar length (length bucketing).

    The shuffled order is cut into pools of ``pool_batches * batch_size`` samples; each pool is sorted by
    length (stable) and cut into batches; the full batches of all pools are shuffled, and the one smaller
    batch (if any) goes last, so ``drop_last`` drops it. A pure function of (order, lengths, seed, epoch):
    a resumed run replays it exactly. Padding then costs at most the length spread within a batch.
    """
    pool = max(1, pool_batches) * batch_size
    sorted_pools = []
    for start in range(0, len(order), pool):
        chunk = order[start:start + pool]
        sorted_pools.append(chunk[torch.sort(lengths[chunk], stable=True).indices])
    flat = torch.cat(sorted_pools) if sorted_pools else order
    n_full = len(flat) // batch_size
    full = flat[:n_full * batch_size].view(n_full, batch_size)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_919)
    return torch.cat([full[torch.randperm(n_full, generator=g)].reshape(-1), flat[n_full * batch_size:]])


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a pure function of (seed, epoch), so a resumed run replays it exactly."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class TensorLoader:
    """Batches of an :class:`ArrayData` by tensor slicing: the fast path for data that fits in memory.

    Args:
        data: the dataset.
        batch_size: samples per batch.
        shuffle: draw a new order every epoch (call :meth:`set_epoch`).
        seed: base seed of the order.
        drop_last: drop the last, smaller batch.
        rank, world_size: distributed sharding (each rank takes every ``world_size``-th sample).
        bucket: length-bucketed batches (:func:`bucketed_order`) when shuffling; None takes the data's
            ``bucket_by_length``. The order stays a pure function of (seed, epoch).
    """

    def __init__(self, data: ArrayData, batch_size: int, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, bucket: Optional[bool] = None):
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.bucket = getattr(data, "bucket_by_length", False) if bucket is None else bucket
        self.epoch = 0
        self._lengths: Optional[torch.Tensor] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def lengths(self) -> torch.Tensor:
        """Non-pad tokens per sample (computed once)."""
        if self._lengths is None:
            pad = getattr(self.data, "pad_token_id", None)
            if pad is None:
                raise KdkitError("length bucketing needs tokenised data with a pad_token_id (kdkit.hf.text)")
            self._lengths = (self.data.x != pad).sum(1)
        return self._lengths

    def _order(self) -> torch.Tensor:
        n = len(self.data)
        order = epoch_permutation(n, self.seed, self.epoch) if self.shuffle else torch.arange(n)
        if self.shuffle and self.bucket:
            # Global batches of batch_size * world_size similar lengths; striding gives each rank its share.
            order = bucketed_order(order, self.lengths(), self.batch_size * self.world_size, self.seed, self.epoch)
        if self.world_size > 1:
            # Same rule as DistributedSampler: pad to a multiple of world_size, then stride.
            total = -(-n // self.world_size) * self.world_size
            order = torch.cat([order, order[: total - n]])[self.rank::self.world_size]
        return order

    def __len__(self) -> int:
        n = len(self._order())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        order = self._order()
        n = len(order)
        stop = n - n % self.batch_size if self.drop_last else n
        x, y, tx = self.data.x, self.data.y, getattr(self.data, "teacher_x", None)
        for start in range(0, stop, self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = {"x": x[idx], "index": idx}
            if y is not None:
                batch["y"] = y[idx]
            if tx is not None:
                batch["teacher_x"] = tx[idx]
            yield batch


class _EpochSampler(torch.utils.data.Sampler):
    """Sampler whose order is :func:`epoch_permutation`, so generic datasets resume exactly too."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = epoch_permutation(self.n, self.seed, self.epoch) if self.shuffle else torch.arange(self.n)
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.n


def to_batch(item: Any, where: str = "a data item") -> Dict[str, Any]:
    """One item of a user Dataset, or one batch of a user DataLoader, as a kdkit batch dict.

    Accepted: a dict with an ``"x"`` key, an ``(x,)`` or ``(x, y)`` tuple/list (``y`` None: unlabelled),
    or bare inputs. numpy arrays become tensors and float64 becomes float32, as :func:`as_dataset` does,
    so a model's float32 weights meet float32 inputs.
    """
    if isinstance(item, dict):
        if "x" not in item:
            raise KdkitError(f"{where} is a dict without an 'x' key (keys: {', '.join(map(str, item))}); "
                             "expected {'x': inputs, 'y': targets (optional)}")
        out = dict(item)
    elif isinstance(item, (tuple, list)):
        if len(item) not in (1, 2):
            raise KdkitError(f"{where} is a {type(item).__name__} of {len(item)} elements; expected x, (x,) "
                             "or (x, y), or a dict {'x': ..., 'y': ...}")
        out = {"x": item[0]}
        if len(item) == 2 and item[1] is not None:
            out["y"] = item[1]
    else:
        out = {"x": item}
    for key in ("x", "y"):
        if key in out:
            out[key] = _tensor(out[key])
    return out


def _tensor(v: Any) -> Any:
    if isinstance(v, np.ndarray) or (isinstance(v, (int, float)) and not isinstance(v, bool)):
        v = torch.as_tensor(v)
    if isinstance(v, torch.Tensor) and v.dtype == torch.float64:
        v = v.float()
    return v


class _Indexed(Dataset):
    """Wraps a user dataset returning ``(x, y)``, ``x`` or a dict so that items become batch dicts with an index."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        out = to_batch(self.data[i], f"item {i} of the dataset")
        out["index"] = torch.tensor(i)
        return out


class LoaderBatches:
    """A user's DataLoader seen as kdkit batch dicts (see :func:`to_batch`); its own sampler decides the order.

    Batches carry no ``index``: kdkit cannot tell which samples a user's loader drew, so a teacher cache
    (which looks outputs up by index) is refused for it and the teacher runs live.
    """

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        # DistributedSampler and kdkit's own samplers reshuffle per epoch through set_epoch.
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for i, batch in enumerate(self.loader):
            yield to_batch(batch, f"batch {i} of the DataLoader")


def make_loader(data, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                num_workers: int = 0, rank: int = 0, world_size: int = 1):
    """The batch iterator for ``data``: :class:`TensorLoader` for :class:`ArrayData`, a DataLoader otherwise.

    A user's DataLoader keeps its own batch size, order and workers (``batch_size``, ``shuffle`` and the rest
    are ignored for it); its batches are converted to batch dicts by :class:`LoaderBatches`.
    """
    if isinstance(data, ArrayData):
        return TensorLoader(data, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                            rank=rank, world_size=world_size)
    if isinstance(data, LoaderBatches):
        return data
    if isinstance(data, DataLoader):
        return LoaderBatches(data)
    if world_size > 1:
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                                      seed=seed, drop_last=drop_last)
    else:
        sampler = _EpochSampler(len(data), seed, shuffle)
    return DataLoader(_Indexed(data), batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers)


def as_dataset(data, split: str = "data") -> Dataset:
    """Accept a Dataset, a DataLoader, an ``(x, y)`` tuple of tensors/arrays, or a single tensor of inputs.

    ``split`` names the data in error messages (``"train"``, ``"val"``, ``"test"``). Tuples are checked here:
    x and y of equal length, integer labels >= -1, no infinite targets (:func:`check_targets`).
    """
    if data is None or isinstance(data, (Dataset, DataLoader)):
        return data
    if isinstance(data, (tuple, list)) and len(data) in (1, 2):
        try:
            x = torch.as_tensor(data[0])
            y = torch.as_tensor(data[1]) if len(data) == 2 and data[1] is not None else None
        except (TypeError, ValueError, RuntimeError) as e:
            raise KdkitError(f"{split} data: cannot make tensors of the (x, y) tuple: {e}; expected numeric "
                             "arrays or tensors") from None
        if x.dim() == 0:
            raise KdkitError(f"{split} data: x is a single number; expected an array of samples (N, ...)")
        if y is not None and y.dim() == 0:
            raise KdkitError(f"{split} data: y is a single number; expected one target per sample (N,) or (N, D)")
        if y is not None and len(x) != len(y):
            raise KdkitError(f"{split} data: x has {len(x)} samples but y has {len(y)}; expected one target per "
                             "input")
        if x.dtype == torch.float64:
            x = x.float()
        if y is not None and y.dtype == torch.float64:
            y = y.float()
        out = ArrayData(x, y)
        check_targets(out, split)
        return out
    if isinstance(data, torch.Tensor):
        return ArrayData(data)
    raise KdkitError(f"{split} data must be a torch Dataset, a DataLoader, a tensor of inputs or an (x, y) tuple; "
                     f"got {type(data).__name__}")


def trim_to_longest(x: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Drop trailing columns that are padding in every row of ``x`` (B, L); keep at least one column.

    Right padding is the contract (the tokenising step refuses the pad id as a real token), so the
    longest row's length is the number of columns any row needs. One host sync per batch.
    """
    longest = int((x != pad_token_id).sum(1).max()) if x.numel() else 0
    return x[:, :max(longest, 1)] if longest < x.shape[1] else x


def has_token_targets(data) -> bool:
    """Whether ``data`` holds causal-LM rows: in memory, with integer ``x`` (N, L) token ids and integer ``y`` of the
    same shape (``y[:, t]`` the token position ``t`` must predict, :data:`IGNORE_INDEX` where none is).

    This shape rule is the one place the loop, the metrics and the checks tell language-model data apart
    (:mod:`kdkit.lm.evaluate` handles it); class labels are (N,), regression targets float.
    """
    x, y = getattr(data, "x", None), getattr(data, "y", None)
    return (isinstance(data, ArrayData) and torch.is_tensor(x) and torch.is_tensor(y) and x.dim() == 2
            and tuple(x.shape) == tuple(y.shape) and not x.is_floating_point() and not y.is_floating_point()
            and y.dtype != torch.bool)


def check_targets(data, split: str, num_classes: Optional[int] = None) -> None:
    """Refuse targets a run would crash on later: integer labels outside ``-1..num_classes-1``, infinite targets.

    Checked for in-memory data (:class:`ArrayData`); a generic Dataset is not read here. ``-1`` (classification)
    and NaN (regression) mark unlabelled samples and pass.

    Raises:
        KdkitError: naming the split, the first bad value and its position.
    """
    y = getattr(data, "y", None) if isinstance(data, ArrayData) else None
    if y is None or y.numel() == 0:
        return
    if y.is_floating_point():
        bad = torch.isinf(y).reshape(len(y), -1).any(dim=1)
        if bool(bad.any()):
            i = int(bad.to(torch.uint8).argmax())
            raise KdkitError(f"{split} split: target {y[i].tolist()} at position {i} is infinite; expected finite "
                             "numbers (NaN marks an unlabelled sample)")
        return
    if y.dtype == torch.bool or y.is_complex():
        raise KdkitError(f"{split} split: targets have dtype {y.dtype}; expected integer class labels or float "
                         "regression targets")
    token = has_token_targets(data)  # causal LM: -100 marks positions with nothing to predict
    bad = (y < 0) & (y != IGNORE_INDEX) if token else y < UNLABELLED
    if num_classes is not None:
        bad |= y >= num_classes
    bad = bad.reshape(len(y), -1).any(dim=1)
    if bool(bad.any()):
        i = int(bad.to(torch.uint8).argmax())
        expected = f"0..{num_classes - 1}" if num_classes is not None else "labels >= 0"
        if token:
            bad_value = int(y[i][((y[i] < 0) & (y[i] != IGNORE_INDEX)) | (y[i] >= (num_classes or 2**62))][0])
            raise KdkitError(f"{split} split: token target {bad_value} in row {i} is out of range; expected token ids "
                             f"{expected} (or {IGNORE_INDEX} where nothing is predicted)")
        raise KdkitError(f"{split} split: label {y[i].tolist()} at position {i} is out of range; expected "
                         f"{expected} (or -1 for an unlabelled sample)")


def first_sample(data) -> torch.Tensor:
    """One input of ``data`` without a batch dimension: works for ArrayData, any Dataset, a DataLoader, a tuple.

    Raises:
        KdkitError: when the data is empty.
    """
    data = as_dataset(data)
    if isinstance(data, ArrayData):
        if len(data) == 0:
            raise KdkitError("the data is empty; expected at least one sample")
        return data.x[0]
    if isinstance(data, DataLoader):
        batch = next(iter(LoaderBatches(data)), None)
        if batch is None:
            raise KdkitError("the DataLoader gave no batches; expected at least one sample")
        return torch.as_tensor(batch["x"])[0]
    try:
        n = len(data)
    except TypeError:
        n = None
    if n == 0:
        raise KdkitError("the dataset is empty; expected at least one sample")
    return torch.as_tensor(to_batch(data[0], "item 0 of the dataset")["x"])


def num_samples(data) -> Optional[int]:
    """The number of samples in ``data`` (ArrayData, Dataset, DataLoader over a sized dataset), else None."""
    data = as_dataset(data)
    if isinstance(data, DataLoader):
        data = data.dataset
    try:
        return len(data)
    except TypeError:  # an IterableDataset without __len__
        return None


@dataclass
class DataSplits:
    """What a dataset builder returns.

    Attributes:
        train, val, test: datasets (val/test may be None).
        num_classes: number of classes, or None for regression.
        input_shape: shape of one input, without the batch dimension.
        task: "classification" or "regression".
        info: JSON-serialisable facts for the report (source path, sizes, normalisation). ``info["preprocess"]``,
            when present, is the preprocessing a deployed model must apply: ``input_mean``/``input_std`` (per
            feature: model input = (raw - mean) / std) and, for regression, ``target_mean``/``target_std`` (per
            output: prediction in the data's units = output * std + mean). Export folds it into the file.
        output_dim: number of regression outputs (target columns); None for classification. Filled from the
            training targets when a builder leaves it out, so a model can be sized without reading samples.

    Building a DataSplits checks in-memory targets (:func:`check_targets`): labels out of range name the split.
    """

    train: Dataset
    val: Optional[Dataset]
    test: Optional[Dataset]
    num_classes: Optional[int]
    input_shape: Tuple[int, ...]
    task: str = "classification"
    info: Dict[str, object] = field(default_factory=dict)
    output_dim: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            check_targets(getattr(self, name), name, self.num_classes)
        y = getattr(self.train, "y", None) if isinstance(self.train, ArrayData) else None
        if self.output_dim is None and self.task == "regression" and y is not None:
            self.output_dim = int(y[0].numel()) if len(y) else None

    @property
    def preprocess(self) -> Optional[Dict[str, Any]]:
        """``info["preprocess"]`` (see above), or None when inputs need no preprocessing the model lacks."""
        p = self.info.get("preprocess")
        return p if isinstance(p, dict) else None


def fixed_split(n: int, n_val: int, n_test: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed random split of ``range(n)`` into (train, val, test) positions."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val + n_test:], perm[:n_val], perm[n_val:n_val + n_test]


def hide_labels(data: ArrayData, labelled_fraction: float, seed: int = 0) -> ArrayData:
    """Keep the targets of a random ``labelled_fraction`` of ``data``; hide the rest.

    Hidden classification labels become UNLABELLED (-1); hidden regression (float) targets become NaN,
    which the regression losses and metrics skip (a -1.0 would be a real target value).
    """
    if labelled_fraction >= 1.0 or data.y is None:
        return data
    n = len(data)
    keep = int(round(labelled_fraction * n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 17))
    y = data.y.clone()
    y[perm[keep:]] = float("nan") if y.is_floating_point() else UNLABELLED
    return data.with_labels(y)
