"""Distillation into scikit-learn models: soft targets from any teacher, the students, readable tree rules."""

import numpy as np
import pytest
import torch
from torch import nn

from kdkit.errors import KdkitError
from kdkit.recipes.classical import (
    STUDENTS,
    OnnxTeacher,
    compare_students,
    expand_soft_targets,
    fit_student,
    parse_rules,
    predict_rules,
    soft_targets,
    teacher_features,
    tree_rules,
)


def _data(n=300, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] + x[:, 2] > 0).astype(int)  # 4 classes
    return x, y


def _teacher(d=6):
    torch.manual_seed(0)
    x, y = _data(400, d, seed=1)
    model = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), 0.02)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(80):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


def test_soft_targets_by_hand_for_logit_and_probability_teachers():
    logits = np.array([[2.0, 0.0], [0.0, 0.0]])
    p = soft_targets(lambda x: logits, np.zeros((2, 1)), temperature=2.0)
    e = np.exp(1.0)
    np.testing.assert_allclose(p, [[e / (e + 1), 1 / (e + 1)], [0.5, 0.5]])
    probs = np.array([[0.9, 0.1]])
    q = soft_targets(lambda x: probs, np.zeros((1, 1)), temperature=2.0)  # p^(1/T), renormalised
    np.testing.assert_allclose(q, [[0.75, 0.25]])


def test_onnx_teacher_gives_the_same_soft_targets_as_its_torch_module(tmp_path):
    pytest.importorskip("onnxruntime")
    from kdkit.export import export_onnx

    model = _teacher()
    x, _ = _data(50)
    export_onnx(model, torch.from_numpy(x[:1]), tmp_path / "t.onnx")
    np.testing.assert_allclose(soft_targets(OnnxTeacher(tmp_path / "t.onnx"), x, 3.0),
                               soft_targets(model, x, 3.0), atol=1e-6)
    np.testing.assert_allclose(soft_targets(str(tmp_path / "t.onnx"), x), soft_targets(model, x), atol=1e-6)


def test_sklearn_teacher_uses_predict_proba():
    from sklearn.linear_model import LogisticRegression

    x, y = _data()
    lr = LogisticRegression(max_iter=200).fit(x, y)
    np.testing.assert_allclose(soft_targets(lr, x), lr.predict_proba(x), atol=1e-6)


def test_expand_soft_targets_keeps_the_distribution():
    x = np.arange(4, dtype=np.float32).reshape(2, 2)
    p = np.array([[0.7, 0.2995, 0.0005], [0.0, 0.0, 1.0]])
    xr, yr, wr = expand_soft_targets(x, p, min_weight=1e-3)
    assert yr.tolist() == [0, 1, 2] and np.allclose(xr, x[[0, 0, 1]])
    np.testing.assert_allclose(wr, [0.7 / 0.9995, 0.2995 / 0.9995, 1.0])


def test_logistic_regression_on_soft_targets_matches_the_teacher():
    """A linear teacher is matched almost exactly: the weighted-copies loss is the soft cross-entropy."""
    from sklearn.linear_model import LogisticRegression

    x, y = _data(400)
    teacher = LogisticRegression(C=0.5, max_iter=500).fit(x, y)
    p = teacher.predict_proba(x)
    student = fit_student("logistic_regression", x, p, min_weight=1e-6, C=1e4, max_iter=2000)
    assert np.abs(student.predict_proba(x) - p).max() < 0.02


def test_every_student_against_labels_only():
    teacher = _teacher()
    x, y = _data(300)
    xt, yt = _data(200, seed=5)
    results = compare_students(teacher, x, y, xt, yt, kinds=STUDENTS, temperature=2.0,
                               options={"gradient_boosting": {"max_iter": 20}})
    assert [r.kind for r in results] == list(STUDENTS)
    for r in results:
        for scores in (r.distilled, r.labels_only):
            assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["fidelity"] <= 1.0
        assert r.distilled["fidelity"] > 0.7


def test_feature_transfer_uses_the_teacher_trunk():
    teacher = _teacher()
    x, y = _data(200)
    feats = teacher_features(teacher, x, "1")
    assert feats.shape == (200, 32) and (feats >= 0).all()  # ReLU outputs
    res = compare_students(teacher, x, y, x, y, kinds=("logistic_regression",), features="1")
    assert res[0].distilled["fidelity"] > 0.9
    with pytest.raises(KdkitError, match="no module named"):
        teacher_features(teacher, x, "trunk")


def test_tree_rules_classify_exactly_as_the_tree():
    teacher = _teacher()
    x, _ = _data(400)
    tree = fit_student("decision_tree", x, soft_targets(teacher, x), max_depth=6)
    names = [f"f{i}" for i in range(6)]
    text = tree_rules(tree, feature_names=names, class_names=["a", "b", "c", "d"])
    assert text.startswith("if ") and " then class " in text
    rules = parse_rules(text, feature_names=names)
    assert len(rules) == tree.get_n_leaves()
    xt, _ = _data(500, seed=9)
    np.testing.assert_array_equal(predict_rules(rules, xt), tree.predict(xt))
    # pixel positions for images
    img = np.random.default_rng(0).normal(size=(100, 1, 3, 4)).astype(np.float32)
    t2 = fit_student("decision_tree", img, soft_targets(lambda z: np.random.default_rng(1).normal(size=(len(z), 3)),
                                                          img), max_depth=3)
    text2 = tree_rules(t2, image_shape=(1, 3, 4))
    assert "pixel[" in text2
    np.testing.assert_array_equal(predict_rules(parse_rules(text2, image_shape=(1, 3, 4)), img),
                                  t2.predict(img.reshape(100, -1)))


def test_bad_inputs():
    x, _ = _data(10)
    with pytest.raises(KdkitError, match="unknown simple student"):
        fit_student("random_forest", x, np.full((10, 2), 0.5))
    with pytest.raises(KdkitError, match="soft targets must be"):
        fit_student("decision_tree", x, np.full((9, 2), 0.5))
    with pytest.raises(KdkitError, match="teacher must be"):
        soft_targets(42, x)
    with pytest.raises(KdkitError, match="not found"):
        OnnxTeacher("/nonexistent/t.onnx")
    with pytest.raises(KdkitError, match="fitted scikit-learn DecisionTreeClassifier"):
        tree_rules(object())
