"""Data paths a user can trust: DataLoaders as train/val/test data, regression targets (hidden as NaN,
standardised, reported in the CSV's units), CSV preprocessing that travels into the exported file, and
hostile data files that end in one KdkitError line."""

from __future__ import annotations

import gzip
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import kdkit
from kdkit.api import build_data, build_model
from kdkit.config import load_config
from kdkit.data import DATASETS, ArrayData, DataSplits, as_dataset, first_sample, hide_labels, num_samples, read_idx
from kdkit.data.core import fixed_split, make_loader
from kdkit.errors import KdkitError
from kdkit.evaluation.metrics import predict, quality
from kdkit.tasks import evaluate


def _xy(n=48, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x[:, 0] > 0).long()


def _mlp(d=4, c=2, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, c))


# ----------------------------------------------------------------------------- DataLoaders


class _DictData(Dataset):
    def __init__(self, x, y=None):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i]} if self.y is None else {"x": self.x[i], "y": self.y[i]}


class _InputsOnly(Dataset):
    """Inputs only, as float64 numpy rows (what a Dataset over a pandas frame typically yields)."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i].numpy().astype(np.float64)


def test_train_takes_dataloaders_as_train_val_and_test():
    x, y = _xy()
    dl = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    run = kdkit.train(_mlp(), dl, DataLoader(TensorDataset(x, y), batch_size=7),
                      test_data=DataLoader(TensorDataset(x, y), batch_size=5), epochs=2, lr=0.01, progress=False)
    assert set(run.metrics["student"]) >= {"accuracy", "nll"}
    assert [r["epoch"] for r in run.history] == [1, 2] and "val_accuracy" in run.history[0]


def test_distill_takes_dict_and_bare_tensor_dataloaders():
    x, y = _xy()
    teacher = _mlp(seed=1)
    train = DataLoader(_DictData(x, y), batch_size=16, shuffle=True)
    unlabelled_val = DataLoader(x, batch_size=10)  # batches are bare input tensors
    run = kdkit.distill(teacher, _mlp(seed=2), train, unlabelled_val,
                        test_data=DataLoader(_DictData(x, y), batch_size=9), epochs=2, lr=0.01, progress=False)
    assert "agreement" in run.metrics["student"] and "accuracy" in run.metrics["student"]
    assert "val_agreement" in run.history[-1]


def test_dataset_yielding_inputs_only_is_unlabelled_transfer_data():
    x, _ = _xy()
    run = kdkit.distill(_mlp(seed=1), _mlp(seed=2), _InputsOnly(x), epochs=1, progress=False)
    assert len(run.history) == 1
    batch = next(iter(make_loader(_InputsOnly(x), 4)))
    assert set(batch) == {"x", "index"} and batch["x"].dtype == torch.float32


def test_evaluate_on_a_reshuffling_dataloader_pairs_rows_in_one_pass():
    x, y = _xy(n=200)
    model = _mlp()
    dl = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    # The teacher is the model itself: agreement must be exactly 1 (two separate passes over a shuffling
    # loader would compare different samples).
    m = evaluate(model, dl, teacher=model, measure_latency=True)
    ref = quality(predict(model, (x, y))["outputs"], y)
    assert m["agreement"] == 1.0
    assert m["accuracy"] == pytest.approx(ref["accuracy"]) and m["nll"] == pytest.approx(ref["nll"], rel=1e-5)
    assert "latency_ms_b1" in m


def test_dataloader_batches_become_batch_dicts_without_index():
    x, y = _xy(n=10)
    batches = list(make_loader(DataLoader(TensorDataset(x.double(), y), batch_size=4), 999))
    assert [len(b["x"]) for b in batches] == [4, 4, 2]  # the loader's own batch size
    assert all(set(b) == {"x", "y"} and b["x"].dtype == torch.float32 for b in batches)
    bad = DataLoader(TensorDataset(x, y, y), batch_size=4)
    with pytest.raises(KdkitError, match="3 elements"):
        list(make_loader(bad, 4))
    with pytest.raises(KdkitError, match="without an 'x' key"):
        list(make_loader(DataLoader([{"inputs": x[0]}], batch_size=1), 1))


def test_first_sample_and_num_samples_for_every_kind_of_data():
    x, y = _xy(n=12)
    kinds = [ArrayData(x, y), TensorDataset(x, y), _DictData(x, y), _InputsOnly(x),
             DataLoader(TensorDataset(x, y), batch_size=5), (x, y), x]
    for data in kinds:
        assert torch.allclose(first_sample(data), x[0]), type(data).__name__
        assert num_samples(data) == 12, type(data).__name__
    with pytest.raises(KdkitError, match="empty"):
        first_sample(ArrayData(torch.zeros(0, 4)))


# ----------------------------------------------------------------------------- regression targets


def test_hidden_regression_targets_are_nan_not_minus_one():
    data = ArrayData(torch.zeros(10, 2), torch.arange(10.0).unsqueeze(1))
    part = hide_labels(data, 0.3)
    assert int(torch.isnan(part.y).sum()) == 7 and not bool((part.y == -1).any())
    kept = part.y[~torch.isnan(part.y)]
    assert set(kept.tolist()) <= set(range(10))
    cls = hide_labels(ArrayData(torch.zeros(10, 2), torch.ones(10, dtype=torch.long)), 0.3)
    assert int((cls.y == -1).sum()) == 7


def test_regression_metrics_skip_unlabelled_nan_targets():
    out = torch.tensor([[1.0], [2.0], [5.0]])
    y = torch.tensor([[0.0], [float("nan")], [3.0]])
    m = quality(out, y)
    assert m["mse"] == pytest.approx((1 + 4) / 2) and m["mae"] == pytest.approx((1 + 2) / 2)


def _regression_csv(path, n=60, seed=0, blank_every=0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(50.0, 10.0, (n, 3))
    target = 300.0 + 40.0 * (feats[:, 0] - 50) / 10 + rng.normal(0, 1, n)
    lines = ["f1,f2,f3,price"]
    for i, (row, t) in enumerate(zip(feats, target)):
        tv = "" if blank_every and i % blank_every == 0 else repr(float(t))
        lines.append(",".join(repr(float(v)) for v in row) + "," + tv)
    path.write_text("\n".join(lines) + "\n")
    return feats, target


def test_csv_regression_standardises_targets_and_states_the_scaling(tmp_path):
    feats, target = _regression_csv(tmp_path / "r.csv")
    splits = DATASETS.get("csv")(path=str(tmp_path / "r.csv"), target="price", task="regression")
    assert splits.output_dim == 1 and splits.num_classes is None
    tr, va, te = fixed_split(60, 6, 12, seed=0)
    pre = splits.info["preprocess"]
    json.dumps(splits.info)  # lands in report.json
    assert pre["target_mean"] == pytest.approx([target[tr.numpy()].mean()], rel=1e-5)
    assert pre["target_std"] == pytest.approx([target[tr.numpy()].std(ddof=1)], rel=1e-4)
    assert pre["input_mean"] == pytest.approx(feats[tr.numpy()].mean(0).tolist(), rel=1e-5)
    assert float(splits.train.y.mean()) == pytest.approx(0.0, abs=1e-5)
    # evaluate reports errors in the CSV's units: a model that always outputs 0 (the training mean once
    # un-scaled) has MSE = mean((target - train mean)^2) over the test rows.
    zero = nn.Linear(3, 1)
    nn.init.zeros_(zero.weight), nn.init.zeros_(zero.bias)
    m = evaluate(zero, splits.test, measure_latency=False)
    expected = target[te.numpy()] - target[tr.numpy()].mean()
    assert m["mse"] == pytest.approx(float(np.mean(expected ** 2)), rel=1e-4)
    assert m["mae"] == pytest.approx(float(np.mean(np.abs(expected))), rel=1e-4)


def test_unlabelled_regression_csv_builds_a_model_and_labelled_fraction_hides_with_nan(tmp_path):
    _regression_csv(tmp_path / "r.csv")
    base = {"name": "csv", "path": str(tmp_path / "r.csv"), "target": "price", "task": "regression"}
    cfg = load_config({"out_dir": str(tmp_path / "o"), "data": {**base, "unlabelled": True},
                       "model": {"name": "mlp", "hidden": [4]}})
    splits = build_data(cfg.data)
    assert splits.train.y is None and splits.output_dim == 1
    assert build_model(cfg.model, splits)(splits.train.x[:2]).shape == (2, 1)
    part = build_data(load_config({"out_dir": str(tmp_path / "o"), "data": {**base, "labelled_fraction": 0.5},
                                   "model": {"name": "mlp"}}).data)
    assert int(torch.isnan(part.train.y).sum()) == len(part.train) - round(0.5 * len(part.train))


def test_csv_blank_regression_targets_are_unlabelled(tmp_path):
    _regression_csv(tmp_path / "r.csv", blank_every=5)
    splits = DATASETS.get("csv")(path=str(tmp_path / "r.csv"), target="price", task="regression")
    ys = torch.cat([splits.train.y, splits.val.y, splits.test.y])
    assert int(torch.isnan(ys).sum()) == 12
    assert all(np.isfinite(v) for v in splits.info["preprocess"]["target_mean"])


def test_regression_csv_run_exports_a_file_that_takes_raw_rows(tmp_path):
    pytest.importorskip("onnxruntime")
    from kdkit.export import export_run, run_onnx

    feats, target = _regression_csv(tmp_path / "r.csv", n=80)
    cfg = {"seed": 0, "out_dir": str(tmp_path / "run"),
           "data": {"name": "csv", "path": str(tmp_path / "r.csv"), "target": "price", "task": "regression",
                    "batch_size": 16},
           "model": {"name": "mlp", "hidden": [8]}, "train": {"epochs": 3, "lr": 0.01, "progress": False}}
    kdkit.run_config(load_config(cfg), "train")
    result = export_run(tmp_path / "run", "onnx")
    assert result["normalisation"].startswith("baked in") and result["input_columns"] == ["f1", "f2", "f3"]
    stored = json.loads((tmp_path / "run" / "export" / "model.onnx.json").read_text())
    assert stored["preprocess"]["target_mean"] == result["preprocess"]["target_mean"]
    splits = build_data(load_config(cfg).data)
    model = build_model(load_config(cfg).model.model_copy(update={"checkpoint": str(tmp_path / "run")}), splits)
    _, _, te = fixed_split(80, 8, 16, seed=0)
    raw_rows = feats[te.numpy()].astype(np.float32)  # the CSV's own rows, never standardised
    onnx_out = run_onnx(tmp_path / "run" / "export" / "model.onnx", raw_rows)
    t_mean, t_std = (torch.tensor(splits.info["preprocess"][k]) for k in ("target_mean", "target_std"))
    with torch.no_grad():
        reference = model.eval()(splits.test.x) * t_std + t_mean  # PyTorch on standardised rows, un-scaled
    np.testing.assert_allclose(onnx_out, reference.numpy(), rtol=1e-4, atol=1e-3)


def test_csv_classification_export_takes_raw_rows(tmp_path):
    pytest.importorskip("onnxruntime")
    from kdkit.export import export_run, run_onnx

    rng = np.random.default_rng(1)
    feats = rng.normal([100.0, -5.0], [30.0, 0.1], (60, 2))
    labels = (feats[:, 0] > 100).astype(int)
    (tmp_path / "c.csv").write_text("a,b,label\n" + "\n".join(f"{float(a)!r},{float(b)!r},{c}"
                                                              for (a, b), c in zip(feats, labels)))
    cfg = {"seed": 0, "out_dir": str(tmp_path / "run"),
           "data": {"name": "csv", "path": str(tmp_path / "c.csv"), "target": "label", "batch_size": 16},
           "model": {"name": "mlp", "hidden": [8]}, "train": {"epochs": 2, "lr": 0.01, "progress": False}}
    kdkit.run_config(load_config(cfg), "train")
    export_run(tmp_path / "run", "onnx")
    splits = build_data(load_config(cfg).data)
    model = build_model(load_config(cfg).model.model_copy(update={"checkpoint": str(tmp_path / "run")}), splits)
    _, _, te = fixed_split(60, 6, 12, seed=0)
    onnx_out = run_onnx(tmp_path / "run" / "export" / "model.onnx", feats[te.numpy()].astype(np.float32))
    with torch.no_grad():
        reference = model.eval()(splits.test.x).numpy()
    np.testing.assert_allclose(onnx_out, reference, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- CSV classes


def test_csv_numeric_classes_sort_as_numbers_and_merge_spellings(tmp_path):
    rows = ["f,label"] + [f"{i},{i % 11}" for i in range(44)]
    (tmp_path / "c.csv").write_text("\n".join(rows))
    splits = DATASETS.get("csv")(path=str(tmp_path / "c.csv"), target="label", val_fraction=0, test_fraction=0)
    assert splits.num_classes == 11 and splits.info["classes"] == list(range(11))
    raw_label = torch.arange(44)[fixed_split(44, 0, 0, seed=0)[0]] % 11
    assert torch.equal(splits.train.y, raw_label)  # class index 2 is label 2, not "10"
    (tmp_path / "d.csv").write_text("f,label\n0,1\n1,1.0\n2,0\n3,2.50\n4,2.5")
    d = DATASETS.get("csv")(path=str(tmp_path / "d.csv"), target="label", val_fraction=0, test_fraction=0)
    assert d.num_classes == 3 and d.info["classes"] == [0, 1, 2.5]


# ----------------------------------------------------------------------------- hostile files


def test_binary_garbage_and_malformed_csv_files_are_one_line_errors(tmp_path):
    cases = {
        "binary.csv": (bytes(range(256)) * 8, "not UTF-8"),
        "ragged.csv": (b"a,b,target\n1,2,0\n3,1\n", "line 3 has 2 fields"),
        "nan.csv": (b"a,b,target\n1,2,0\n1,nan,1\n", "line 3, column 'b': value 'nan' is not finite"),
        "inf.csv": (b"a,b,target\n1,2,0\n-inf,2,1\n", "column 'a': value '-inf' is not finite"),
        "text.csv": (b"a,b,target\n1,2,0\n1,two,1\n", "value 'two' is not a number"),
        "nul.csv": (b"a,b,target\n1,2\x00,0\n1,2,1\n", "line 2, column 'b'"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(KdkitError, match=message):
            DATASETS.get("csv")(path=str(tmp_path / name))
    (tmp_path / "reg.csv").write_text("a,target\n1,3.5\n2,cheap\n")
    with pytest.raises(KdkitError, match="line 3: target 'cheap'.*task: regression needs numeric targets"):
        DATASETS.get("csv")(path=str(tmp_path / "reg.csv"), task="regression")


def test_binary_csv_through_the_cli_is_one_error_line(tmp_path, capsys):
    from kdkit.cli import main

    (tmp_path / "g.csv").write_bytes(bytes(range(128, 256)) * 4)
    (tmp_path / "c.yaml").write_text(f"out_dir: {tmp_path / 'run'}\ndata: {{name: csv, path: {tmp_path / 'g.csv'}}}\n"
                                     "model: {name: linear}\ntrain: {epochs: 1, progress: false}\n")
    with pytest.raises(SystemExit) as e:
        main(["train", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: csv:") and "UTF-8" in err[0]


def _idx(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def test_corrupt_deflate_stream_in_idx_gz(tmp_path):
    good = gzip.compress(_idx(np.zeros((4, 28, 28), np.uint8)))
    (tmp_path / "x.gz").write_bytes(good[:10] + b"\xff" * 8 + good[18:])  # valid gzip header, broken deflate
    with pytest.raises(KdkitError, match="cannot read IDX file"):
        read_idx(tmp_path / "x.gz")


def test_idx_header_whose_dimensions_overflow(tmp_path):
    # 65536^4 = 2^64 elements: int64 arithmetic wraps to 0 and "matches" a header-only file.
    (tmp_path / "x").write_bytes(bytes([0, 0, 0x08, 4]) + (65536).to_bytes(4, "big") * 4)
    with pytest.raises(KdkitError, match="truncated or corrupt"):
        read_idx(tmp_path / "x")


def _mnist_dir(root, train_labels: bytes, test_labels: bytes, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    root.mkdir(exist_ok=True)
    (root / "train-images-idx3-ubyte").write_bytes(_idx(rng.integers(0, 255, (n_train, 28, 28)).astype(np.uint8)))
    (root / "t10k-images-idx3-ubyte").write_bytes(_idx(rng.integers(0, 255, (n_test, 28, 28)).astype(np.uint8)))
    (root / "train-labels-idx1-ubyte").write_bytes(train_labels)
    (root / "t10k-labels-idx1-ubyte").write_bytes(test_labels)
    return root


def test_idx_labels_out_of_range_are_refused_when_the_splits_are_built(tmp_path):
    train = np.arange(20, dtype=np.uint8) % 10
    test = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 10], np.uint8)  # 10 with classes 0..9
    root = _mnist_dir(tmp_path / "a", _idx(train), _idx(test))
    with pytest.raises(KdkitError, match=r"test split: label 10 at position 9 is out of range; expected 0\.\.9"):
        DATASETS.get("mnist")(root=str(root), val_size=5)
    neg = (np.arange(20) % 10).astype(np.int8)
    neg[3] = -3
    root = _mnist_dir(tmp_path / "b", _idx(neg, 0x09), _idx(np.arange(10, dtype=np.uint8)))
    with pytest.raises(KdkitError, match="split: label -3 at position"):
        DATASETS.get("mnist")(root=str(root), val_size=0)
    root = _mnist_dir(tmp_path / "c", _idx(train.reshape(20, 1)), _idx(np.arange(10, dtype=np.uint8)))
    with pytest.raises(KdkitError, match=r"expected \(N,\) labels"):
        DATASETS.get("mnist")(root=str(root), val_size=5)


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_image_folder_refuses_a_decompression_bomb_before_decoding(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / cls / "ok.png")
    (tmp_path / "b" / "bomb.png").write_bytes(_png_declaring(30000, 30000))  # PIL refuses it when opening
    with pytest.raises(KdkitError, match="bomb.png: DecompressionBombError"):
        DATASETS.get("image_folder")(root=str(tmp_path), image_size=4, grayscale=True)
    (tmp_path / "b" / "bomb.png").write_bytes(_png_declaring(8000, 8000))  # below PIL's limit, above kdkit's
    with pytest.raises(KdkitError, match="bomb.png declares 8000x8000 pixels"):
        DATASETS.get("image_folder")(root=str(tmp_path), image_size=4, grayscale=True)
    (tmp_path / "b" / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(KdkitError, match="cannot read image"):
        DATASETS.get("image_folder")(root=str(tmp_path), image_size=4, grayscale=True)


def test_api_tuples_with_mismatched_lengths_or_bad_labels():
    x, y = _xy(n=12)
    with pytest.raises(KdkitError, match="x has 12 samples but y has 11"):
        kdkit.train(_mlp(), (x, y[:11]), epochs=1, progress=False)
    bad = y.clone()
    bad[4] = -3
    with pytest.raises(KdkitError, match="train split: label -3 at position 4"):
        as_dataset((x, bad), "train")
    inf = torch.zeros(12, 1)
    inf[2] = float("inf")
    with pytest.raises(KdkitError, match="position 2 is infinite"):
        as_dataset((x, inf), "val")
    with pytest.raises(KdkitError, match="data must be a torch Dataset"):
        as_dataset("not data")


def test_datasplits_check_labels_against_num_classes():
    x, y = _xy(n=8)
    test_y = y.clone()
    test_y[5] = 2
    with pytest.raises(KdkitError, match=r"test split: label 2 at position 5 is out of range; expected 0\.\.1"):
        DataSplits(ArrayData(x, y), None, ArrayData(x, test_y), num_classes=2, input_shape=(4,))
    ok = DataSplits(ArrayData(x, y), None, None, num_classes=2, input_shape=(4,))
    assert ok.output_dim is None and ok.preprocess is None
    reg = DataSplits(ArrayData(x, torch.zeros(8, 3)), None, None, num_classes=None, input_shape=(4,),
                     task="regression")
    assert reg.output_dim == 3


def test_quality_names_a_label_beyond_the_model_outputs():
    with pytest.raises(KdkitError, match="label 10 is out of range for a model with 10 outputs"):
        quality(torch.zeros(3, 10), torch.tensor([0, 10, 1]))
