"""Compression: pruning, low-rank factorisation, int8 quantisation, parameter transfer, the compress ladder."""

import pytest
import torch
from torch import nn

from kdkit.compress import (
    count_nonzero,
    count_parameters,
    factorize,
    factorize_layer,
    load_compressed,
    prune_structured,
    prune_unstructured,
    quantize_dynamic,
    quantize_static,
    rank_for_energy,
    save_quantized,
    transfer_weights,
)
from kdkit.config import load_config
from kdkit.errors import KdkitError
from kdkit.models import create_model

SHAPE = (1, 12, 12)



def _cnn(width=8, large=False):
    torch.manual_seed(0)
    return create_model("cnn_large" if large else "cnn_small", num_classes=5, input_shape=SHAPE, width=width).eval()


def test_structured_pruning_removes_parameters_and_keeps_outputs_finite():
    model = _cnn()
    x = torch.randn(6, *SHAPE)
    pruned = prune_structured(model, x[:2], sparsity=0.5)
    before, after = count_parameters(model), count_parameters(pruned)
    assert after <= 0.5 * before
    assert after > 0
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels < 8  # channels really gone, not zeroed
    out = pruned(x)
    assert out.shape == (6, 5) and torch.isfinite(out).all()
    assert count_parameters(model) == before  # the original is left alone


def test_structured_pruning_mlp_and_unsupported_model():
    torch.manual_seed(0)
    mlp = create_model("mlp", num_classes=3, input_shape=(10,), hidden=[16]).eval()
    pruned = prune_structured(mlp, torch.randn(2, 10), target_parameters=100)
    assert count_parameters(pruned) <= 100
    assert pruned[1].out_features < 16 and pruned[3].in_features == pruned[1].out_features
    linear = create_model("linear", num_classes=3, input_shape=(10,))
    with pytest.raises(KdkitError, match="output layer"):
        prune_structured(linear, torch.randn(2, 10), sparsity=0.5)
    with pytest.raises(KdkitError, match="sparsity"):
        prune_structured(mlp, torch.randn(2, 10), sparsity=1.5)


def test_unstructured_pruning_zeroes_smallest_weights_permanently():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 4))
    weights = torch.cat([model[0].weight.flatten(), model[2].weight.flatten()]).abs()
    stats = prune_unstructured(model, sparsity=0.5)
    assert stats["sparsity"] == pytest.approx(0.5, abs=1 / 280)
    threshold = weights.sort().values[139]
    kept = torch.cat([model[0].weight.flatten(), model[2].weight.flatten()])
    assert (kept[kept != 0].abs() >= threshold).all()  # global magnitude: survivors are the large ones
    assert not hasattr(model[0], "weight_mask") and not model[0]._forward_pre_hooks
    assert count_nonzero(model) == count_parameters(model) - 140
    assert torch.isfinite(model(torch.randn(3, 10))).all()


@pytest.mark.parametrize("layer", [nn.Linear(12, 7), nn.Conv2d(3, 6, 3, stride=2, padding=1)])
def test_full_rank_svd_reproduces_the_layer(layer):
    torch.manual_seed(0)
    x = torch.randn(4, 12) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 9, 9)
    full = min(layer.weight.flatten(1).shape)
    thin = factorize_layer(layer, rank=full)
    assert thin[0].weight.shape[0] == full
    torch.testing.assert_close(thin(x), layer(x), atol=1e-5, rtol=1e-5)
    # a lower rank is the best rank-r approximation: its error equals the dropped singular values' energy
    r = full - 2
    w = layer.weight.detach().flatten(1)
    s = torch.linalg.svdvals(w.double())
    approx = thin_w = factorize_layer(layer, rank=r)
    if isinstance(layer, nn.Linear):
        thin_w = approx[1].weight @ approx[0].weight
    else:
        thin_w = approx[1].weight.flatten(1) @ approx[0].weight.flatten(1)
    err = torch.linalg.matrix_norm((w - thin_w.detach()).double())
    assert err.item() == pytest.approx(s[r:].pow(2).sum().sqrt().item(), rel=1e-4)


def test_rank_for_energy_by_hand():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 0.7) == 2
    assert rank_for_energy(s, 1.0) == 3


def test_lowrank_bad_inputs():
    with pytest.raises(KdkitError, match="rank must be an integer in 1..7"):
        factorize_layer(nn.Linear(12, 7), rank=8)
    with pytest.raises(KdkitError, match="rank"):
        factorize(nn.Sequential(nn.Linear(4, 4)), rank=0)
    with pytest.raises(KdkitError, match="grouped"):
        factorize_layer(nn.Conv2d(4, 4, 3, groups=2), rank=1)
    with pytest.raises(KdkitError, match="only Linear and Conv2d"):
        factorize(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), rank=1, layers=["1"])
    with pytest.raises(KdkitError, match="no module named"):
        factorize(nn.Sequential(nn.Linear(4, 4)), rank=1, layers=["nope"])


def test_factorize_model_saves_parameters():
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=3, input_shape=(40,), hidden=[32])
    records = factorize(model, rank=4)
    assert [r["module"] for r in records] == ["1"]  # the 32x3 head would not get smaller
    assert count_parameters(model) == 4 * (40 + 32) + 32 + 3 * 32 + 3


def _trained_mlp():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, 0] + x[:, 1] > 0).long() + 2 * (x[:, 2] > 0).long()
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), 0.02)
    for _ in range(80):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_outputs_within_tolerance(mode, tmp_path):
    """Stated tolerance (as kdkit export --int8): int8 logits within 10% of the largest |float logit|,
    arg-max agreement >= 95%."""
    model, x = _trained_mlp()
    q = quantize_dynamic(model) if mode == "dynamic" else quantize_static(model, x[:128])
    with torch.inference_mode():
        ref, out = model(x), q(x)
    assert (out - ref).abs().max() <= 0.1 * ref.abs().max()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
    size = save_quantized(q, tmp_path / "q.safetensors")
    from kdkit.compress import quantized_tensors
    from kdkit.training.checkpoint import save_weights

    tensors, _ = quantized_tensors(q)
    data_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert data_bytes < 4 * count_parameters(model)  # int8 weights (+ per-channel scales) vs float32
    assert size >= data_bytes and size < save_weights(model, tmp_path / "f.safetensors").stat().st_size + 1024
    assert tensors["0.weight"].dtype == torch.int8 and tensors["0.weight"].shape == (32, 8)


def test_transfer_every_other_block():
    teacher, student = _cnn(8, large=True), _cnn(8)
    torch.manual_seed(1)
    student = create_model("cnn_small", num_classes=5, input_shape=SHAPE, width=8)
    report = transfer_weights(student, teacher, "every_other")
    assert not report["skipped"]
    torch.testing.assert_close(student.features[1][0].weight, teacher.features[2][0].weight)
    torch.testing.assert_close(student.head.weight, teacher.head.weight)
    with pytest.raises(KdkitError, match="no tensor"):
        transfer_weights(nn.Sequential(nn.Linear(3, 3)), nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(KdkitError, match="unknown layer rule"):
        transfer_weights(student, teacher, "odd")


def test_compress_config_validation():
    with pytest.raises(KdkitError, match="unknown step 'prun'"):
        load_config({"compress": [{"step": "prun"}]})
    with pytest.raises(KdkitError, match="exactly one of rank"):
        load_config({"compress": [{"step": "lowrank"}]})
    with pytest.raises(KdkitError, match="unknown key 'speed'"):
        load_config({"compress": [{"step": "prune", "sparsity": 0.5, "speed": 1}]})
    with pytest.raises(KdkitError, match="must be the last step"):
        load_config({"compress": [{"step": "quantize"}, {"step": "distill", "epochs": 1}]})
    cfg = load_config({"compress": [{"step": "prune", "sparsity": 0.5}]})
    assert cfg.compress[0]["structured"] is True


def test_compress_ladder_end_to_end(tmp_path):
    from kdkit.api import run_config
    from kdkit.compress import run_compress

    teacher_dir = tmp_path / "teacher"
    run_config(load_config({"out_dir": str(teacher_dir), "data": {"name": "digits"}, "device": "cpu",
                            "model": {"name": "mlp", "hidden": [32, 32]},
                            "train": {"epochs": 2, "lr": 0.01, "progress": False}}), "train")
    cfg = load_config({"out_dir": str(tmp_path / "c"), "data": {"name": "digits"}, "device": "cpu",
                       "teacher": {"checkpoint": str(teacher_dir)},
                       "train": {"lr": 0.005, "progress": False},
                       "compress": [{"step": "prune", "sparsity": 0.5, "epochs": 1},
                                    {"step": "lowrank", "rank": 4},
                                    {"step": "quantize", "mode": "dynamic"}]})
    ladder = run_compress(cfg)
    rows = list(ladder.rows.values())
    assert len(rows) == 4
    assert rows[1]["parameters"] <= 0.5 * rows[0]["parameters"]
    assert rows[3]["bytes"] < rows[1]["bytes"]
    for r in rows:
        assert {"accuracy", "agreement", "latency_ms_b1", "latency_ms_b256"} <= set(r)
    assert (ladder.dir / "report.html").read_text().count("data:image/png") >= 1
    rebuilt = load_compressed(ladder.dir)
    x = torch.randn(5, 64)
    torch.testing.assert_close(rebuilt(x), ladder.float_model(x))
