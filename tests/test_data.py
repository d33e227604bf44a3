"""Datasets: the digits split, IDX reading and its errors, CSV and image folders, the fast batch path."""

import gzip

import numpy as np
import pytest
import torch

from kdkit.data import DATASETS, ArrayData, hide_labels, make_loader, read_idx
from kdkit.data.core import TensorLoader
from kdkit.errors import KdkitError


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def test_digits_fixed_split():
    a, b = DATASETS.get("digits")(), DATASETS.get("digits")()
    assert (len(a.train), len(a.val), len(a.test)) == (1257, 180, 360)
    assert torch.equal(a.test.y, b.test.y) and a.input_shape == (1, 8, 8) and a.num_classes == 10


def test_read_idx_raw_and_gzip(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(arr))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
    assert np.array_equal(read_idx(tmp_path / "a"), arr)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)


def test_truncated_and_garbage_idx(tmp_path):
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    (tmp_path / "t").write_bytes(_idx_bytes(arr)[:-5])
    with pytest.raises(KdkitError, match="truncated"):
        read_idx(tmp_path / "t")
    (tmp_path / "g").write_bytes(b"hello world")
    with pytest.raises(KdkitError, match="not an IDX file"):
        read_idx(tmp_path / "g")
    (tmp_path / "z.gz").write_bytes(gzip.compress(_idx_bytes(arr))[:20])
    with pytest.raises(KdkitError, match="cannot read"):
        read_idx(tmp_path / "z.gz")


def _fake_mnist(root, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(_idx_bytes(rng.integers(0, 255, (n, 28, 28)))))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(rng.integers(0, 10, n)))


def test_fashion_mnist_from_idx_folder(tmp_path):
    _fake_mnist(tmp_path)
    splits = DATASETS.get("fashion_mnist")(root=str(tmp_path), val_size=5)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 10)
    assert splits.input_shape == (1, 28, 28)


def test_missing_dataset_says_where_and_how(tmp_path):
    with pytest.raises(KdkitError) as e:
        DATASETS.get("fashion_mnist")(root=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "nowhere" in msg and "apt-get install dataset-fashion-mnist" in msg and "data.root" in msg


def test_csv_classification_and_errors(tmp_path):
    path = tmp_path / "t.csv"
    rows = ["a,b,label"] + [f"{i},{i % 3},{'yes' if i % 2 else 'no'}" for i in range(30)]
    path.write_text("\n".join(rows))
    splits = DATASETS.get("csv")(path=str(path), target="label")
    assert splits.num_classes == 2 and splits.input_shape == (2,)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 30
    with pytest.raises(KdkitError, match="target column 'y'"):
        DATASETS.get("csv")(path=str(path), target="y")


def test_image_folder(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(np.full((10, 12), 40 * i, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    splits = DATASETS.get("image_folder")(root=str(tmp_path), image_size=8, grayscale=True, val_fraction=0.2,
                                          test_fraction=0.2)
    assert splits.num_classes == 2 and splits.input_shape == (1, 8, 8)
    assert splits.info["classes"] == ["cat", "dog"]


def test_tensor_loader_covers_each_sample_once_and_reshuffles():
    data = ArrayData(torch.arange(10).float().unsqueeze(1), torch.arange(10))
    loader = make_loader(data, batch_size=4, shuffle=True, seed=3)
    assert isinstance(loader, TensorLoader)
    first = torch.cat([b["index"] for b in loader])
    loader.set_epoch(1)
    second = torch.cat([b["index"] for b in loader])
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert not torch.equal(first, second)
    for b in loader:
        assert torch.equal(b["y"], b["index"]) and torch.equal(b["x"].squeeze(1), b["index"].float())


def test_hide_labels_keeps_requested_fraction():
    data = ArrayData(torch.zeros(100, 1), torch.ones(100, dtype=torch.long))
    part = hide_labels(data, 0.05)
    assert int((part.y >= 0).sum()) == 5 and int((part.y == -1).sum()) == 95
    assert int((data.y == 1).sum()) == 100  # the original is untouched
