"""In-memory datasets, the fast batch iterator and the split container.

Every batch in kdkit is a dict: ``{"x": inputs, "y": labels (optional),
"index": positions in the dataset}``. ``index`` lets a method or a teacher
cache look things up per sample (CRD's memory bank, cached teacher outputs).
Labels equal to ``-1`` mark unlabelled samples (a label-scarce transfer set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

UNLABELLED = -1


class ArrayData(Dataset):
    """A dataset held as whole tensors: ``x`` of shape (N, ...) and optional ``y`` of shape (N,) or (N, D).

    Batches of an ArrayData are cut from the tensors directly (no per-sample
    Python work); see :class:`TensorLoader`.
    """

    def __init__(self, x: torch.Tensor, y: Optional[torch.Tensor] = None):
        if y is not None and len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        item = {"x": self.x[i], "index": torch.tensor(i)}
        if self.y is not None:
            item["y"] = self.y[i]
        return item

    def subset(self, idx: torch.Tensor) -> "ArrayData":
        return ArrayData(self.x[idx], None if self.y is None else self.y[idx])

    def without_labels(self) -> "ArrayData":
        return ArrayData(self.x, None)


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
        indices: restrict to these positions (used by distributed sharding).
    """

    def __init__(self, data: ArrayData, batch_size: int, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        n = len(self.data)
        order = epoch_permutation(n, self.seed, self.epoch) if self.shuffle else torch.arange(n)
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
        x, y = self.data.x, self.data.y
        for start in range(0, stop, self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = {"x": x[idx], "index": idx}
            if y is not None:
                batch["y"] = y[idx]
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


class _Indexed(Dataset):
    """Wraps a user dataset returning ``(x, y)``, ``x`` or a dict so that items become batch dicts with an index."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        item = self.data[i]
        if isinstance(item, dict):
            out = dict(item)
        elif isinstance(item, (tuple, list)):
            out = {"x": item[0]}
            if len(item) > 1:
                out["y"] = torch.as_tensor(item[1])
        else:
            out = {"x": item}
        out["index"] = torch.tensor(i)
        return out


def make_loader(data, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                num_workers: int = 0, rank: int = 0, world_size: int = 1):
    """The batch iterator for ``data``: :class:`TensorLoader` for :class:`ArrayData`, a DataLoader otherwise.

    A DataLoader or any other iterable of batch dicts passes through unchanged.
    """
    if isinstance(data, ArrayData):
        return TensorLoader(data, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                            rank=rank, world_size=world_size)
    if isinstance(data, DataLoader):
        return data
    if world_size > 1:
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                                      seed=seed, drop_last=drop_last)
    else:
        sampler = _EpochSampler(len(data), seed, shuffle)
    return DataLoader(_Indexed(data), batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers)


def as_dataset(data) -> Dataset:
    """Accept a Dataset, an ``(x, y)`` tuple of tensors/arrays, or a single tensor of inputs."""
    if data is None or isinstance(data, (Dataset, DataLoader)):
        return data
    if isinstance(data, (tuple, list)) and len(data) in (1, 2):
        x = torch.as_tensor(data[0])
        y = torch.as_tensor(data[1]) if len(data) == 2 and data[1] is not None else None
        if x.dtype == torch.float64:
            x = x.float()
        if y is not None and y.dtype == torch.float64:
            y = y.float()
        return ArrayData(x, y)
    if isinstance(data, torch.Tensor):
        return ArrayData(data)
    raise TypeError("data must be a torch Dataset, a DataLoader, a tensor of inputs or an (x, y) tuple; "
                    f"got {type(data).__name__}")


@dataclass
class DataSplits:
    """What a dataset builder returns.

    Attributes:
        train, val, test: datasets (val/test may be None).
        num_classes: number of classes, or None for regression.
        input_shape: shape of one input, without the batch dimension.
        task: "classification" or "regression".
        info: free-form facts for the report (source path, sizes, normalisation).
    """

    train: Dataset
    val: Optional[Dataset]
    test: Optional[Dataset]
    num_classes: Optional[int]
    input_shape: Tuple[int, ...]
    task: str = "classification"
    info: Dict[str, object] = field(default_factory=dict)


def fixed_split(n: int, n_val: int, n_test: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed random split of ``range(n)`` into (train, val, test) positions."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val + n_test:], perm[:n_val], perm[n_val:n_val + n_test]


def hide_labels(data: ArrayData, labelled_fraction: float, seed: int = 0) -> ArrayData:
    """Keep labels for a stratified-at-random ``labelled_fraction`` of ``data``; the rest become UNLABELLED (-1)."""
    if labelled_fraction >= 1.0 or data.y is None:
        return data
    n = len(data)
    keep = int(round(labelled_fraction * n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 17))
    y = data.y.clone()
    y[perm[keep:]] = UNLABELLED
    return ArrayData(data.x, y)
