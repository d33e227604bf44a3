"""Distilling a teacher into scikit-learn models: logistic regression, linear SVM, decision tree, boosted trees.

The teacher is anything that returns logits or probabilities for a batch of inputs (:func:`as_soft_teacher`):
a PyTorch module, a fitted scikit-learn estimator (``predict_proba``, else ``decision_function``), an ONNX
model run through onnxruntime (:class:`OnnxTeacher`: teachers from TensorFlow/Keras or other frameworks work
once exported to ONNX), or a plain callable.

How each student fits the teacher's soft targets ``p = softmax(z / T)`` (or tempered probabilities
``p ∝ q^(1/T)`` for probability teachers), and why:

- **logistic regression, gradient-boosted trees, decision tree**: *sample-weighted hard labels*. Every
  training input is repeated once per class ``c`` with label ``c`` and sample weight ``p_c``. For models
  trained by log-loss (multinomial logistic regression, ``HistGradientBoostingClassifier``) the weighted loss
  ``sum_c p_c * -log q_c(x)`` *is* the soft-target cross-entropy of Hinton et al. (2015), so this is exact,
  not an approximation, and needs no regression head. For a classification tree, each leaf's weighted class
  counts become the average teacher distribution of the inputs reaching it, and splits minimise the weighted
  impurity of those distributions (the tree equivalent of matching soft targets; "born-again trees",
  Breiman & Shang 1996; Frosst & Hinton 2017). Copies with ``p_c < min_weight`` are dropped to bound the cost.
- **linear SVM**: the hinge loss has no soft-target form, so ``LinearSVC`` is fit on the teacher's arg-max
  labels with sample weight = the teacher's confidence ``max_c p_c``: inputs the teacher is unsure about
  count less.

Feature transfer: with ``features`` set to a teacher module name, students are fit on that layer's outputs
(flattened) instead of raw inputs: a frozen teacher trunk with a simple head.

Every student is compared with the same model fit on the true labels alone: accuracy, and fidelity
(agreement with the teacher's arg-max) on test data (:func:`compare_students`).

Decision trees print as if-then rules (:func:`tree_rules`); :func:`parse_rules` reads the text back and
:func:`predict_rules` classifies with it, exactly as the tree does (thresholds are printed with full float
precision and compared on float32 inputs, as scikit-learn does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..errors import KdkitError

STUDENTS = ("logistic_regression", "linear_svm", "decision_tree", "gradient_boosting")


# ----------------------------------------------------------------------------- teachers

class OnnxTeacher:
    """An ONNX model as a teacher, run with onnxruntime on the CPU.

    Args:
        path: the ``.onnx`` file (first input fed, first output read: logits or probabilities).
        batch_size: inputs per onnxruntime call.
    """

    def __init__(self, path: Union[str, Path], batch_size: int = 512):
        from ..export import onnx_session

        path = Path(path)
        if not path.is_file():
            raise KdkitError(f"ONNX teacher {path} not found")
        self.path = path
        self.session = onnx_session(path)
        self.input_name = self.session.get_inputs()[0].name
        self.batch_size = batch_size

    def __call__(self, x) -> np.ndarray:
        from ..export import run_onnx

        x = x.numpy() if torch.is_tensor(x) else np.asarray(x)
        return run_onnx(self.session, x.astype(np.float32), self.batch_size)


def _looks_like_probabilities(out: np.ndarray) -> bool:
    return bool(out.ndim == 2 and np.all(out >= -1e-6) and np.allclose(out.sum(1), 1.0, atol=1e-4))


def as_soft_teacher(teacher) -> Callable[[np.ndarray], Tuple[np.ndarray, str]]:
    """Wrap a teacher as ``f(x) -> (outputs (N, C), kind)`` with ``kind`` ``"logits"`` or ``"probabilities"``.

    Accepts an ``nn.Module`` / :class:`kdkit.Teacher` (logits), a fitted scikit-learn estimator
    (``predict_proba`` -> probabilities, else ``decision_function`` -> logits), an :class:`OnnxTeacher` or a
    path to a ``.onnx`` file, or any callable (kind detected: rows that are non-negative and sum to 1 are
    probabilities).
    """
    from ..teacher import Teacher

    if isinstance(teacher, Teacher):
        teacher = teacher.model
    if isinstance(teacher, (str, Path)) and str(teacher).endswith(".onnx"):
        teacher = OnnxTeacher(teacher)
    if isinstance(teacher, nn.Module):
        module = teacher.eval()

        def run_torch(x):
            from ..evaluation.metrics import model_device

            xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
            outs = []
            with torch.inference_mode():
                for i in range(0, len(xt), 512):
                    outs.append(module(xt[i:i + 512].to(model_device(module))).float().cpu())
            return torch.cat(outs).numpy(), "logits"

        return run_torch
    if hasattr(teacher, "predict_proba"):
        return lambda x: (np.asarray(teacher.predict_proba(_flat(x))), "probabilities")
    if hasattr(teacher, "decision_function"):
        def run_decision(x):
            d = np.asarray(teacher.decision_function(_flat(x)))
            if d.ndim == 1:  # binary: one margin -> two logits
                d = np.stack([-d / 2, d / 2], 1)
            return d, "logits"

        return run_decision
    if callable(teacher):
        def run_callable(x):
            out = teacher(x)
            out = out.detach().cpu().numpy() if torch.is_tensor(out) else np.asarray(out)
            return out, "probabilities" if _looks_like_probabilities(out) else "logits"

        return run_callable
    raise KdkitError(f"teacher must be a torch module, a scikit-learn estimator with predict_proba or "
                     f"decision_function, an ONNX file or a callable; got {type(teacher).__name__}")


def soft_targets(teacher, x, temperature: float = 1.0) -> np.ndarray:
    """The teacher's class distribution on ``x`` at ``temperature``: (N, C), rows sum to 1."""
    if temperature <= 0:
        raise KdkitError(f"temperature must be > 0; got {temperature}")
    out, kind = as_soft_teacher(teacher)(x)
    out = np.asarray(out, dtype=np.float64)
    logits = np.log(np.clip(out, 1e-12, None)) if kind == "probabilities" else out
    z = logits / temperature
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def _flat(x) -> np.ndarray:
    x = x.numpy() if torch.is_tensor(x) else np.asarray(x)
    return x.reshape(len(x), -1).astype(np.float32)


def teacher_features(model: nn.Module, x, layer: str, batch_size: int = 512) -> np.ndarray:
    """Outputs of the teacher module ``layer`` on ``x``, flattened to (N, D): a frozen trunk's features."""
    from ..evaluation.metrics import model_device
    from ..methods.hooks import capture

    xt = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not torch.is_tensor(x) else x.float()
    model = model.eval()
    feats = []
    with capture(model, layer, who="teacher") as cap, torch.inference_mode():
        for i in range(0, len(xt), batch_size):
            model(xt[i:i + batch_size].to(model_device(model)))
            feats.append(cap[layer].flatten(1).float().cpu())
    return torch.cat(feats).numpy()


# ----------------------------------------------------------------------------- students

def make_student(kind: str, seed: int = 0, **options: Any):
    """A fresh scikit-learn model of ``kind`` (one of :data:`STUDENTS`) with sensible small-data defaults."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC
    from sklearn.tree import DecisionTreeClassifier

    if kind == "logistic_regression":
        return LogisticRegression(**{"max_iter": 300, "C": 1.0, **options})
    if kind == "linear_svm":
        return LinearSVC(**{"C": 0.05, "max_iter": 2000, "random_state": seed, **options})
    if kind == "decision_tree":
        return DecisionTreeClassifier(**{"max_depth": 8, "random_state": seed, **options})
    if kind == "gradient_boosting":
        return HistGradientBoostingClassifier(**{"max_iter": 100, "random_state": seed, **options})
    raise KdkitError(f"unknown simple student {kind!r}; known: {', '.join(STUDENTS)}")


def expand_soft_targets(x: np.ndarray, p: np.ndarray,
                        min_weight: float = 1e-3) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Repeat each input once per class with weight ``p_c`` (copies with ``p_c < min_weight`` dropped).

    Returns ``(x_rep, y_rep, w_rep)``. The kept weights of each input are renormalised to sum to 1, so every
    input counts once in total.
    """
    n, c = p.shape
    keep = p >= min_weight
    keep[np.arange(n), p.argmax(1)] = True  # every input keeps at least its top class
    w = np.where(keep, p, 0.0)
    w = w / w.sum(1, keepdims=True)
    rows, cls = np.nonzero(keep)
    return x[rows], cls.astype(np.int64), w[rows, cls]


def fit_student(kind: str, x, p: np.ndarray, seed: int = 0, min_weight: float = 1e-3, **options: Any):
    """Fit a ``kind`` student on inputs ``x`` (N, ...) to teacher distributions ``p`` (N, C) as described above."""
    x = _flat(x)
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2 or len(p) != len(x):
        raise KdkitError(f"soft targets must be (N, C) for N={len(x)} inputs; got shape {p.shape}")
    model = make_student(kind, seed, **options)
    with _one_thread():
        if kind == "linear_svm":
            model.fit(x, p.argmax(1), sample_weight=p.max(1))
        else:
            xr, yr, wr = expand_soft_targets(x, p, min_weight)
            model.fit(xr, yr, sample_weight=wr)
    return model


def fit_on_labels(kind: str, x, y, seed: int = 0, **options: Any):
    """The same model on the true labels alone (the baseline every distilled student is compared with)."""
    model = make_student(kind, seed, **options)
    with _one_thread():
        model.fit(_flat(x), np.asarray(y))
    return model


def _one_thread():
    """BLAS/OpenMP on one thread: on a busy 2-core machine, spinning thread pools made fits ~100x slower."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def predict_classes(model, x, classes: Optional[int] = None) -> np.ndarray:
    """Class indices predicted by a fitted student (its ``classes_`` mapped back to 0..C-1 indices)."""
    pred = model.predict(_flat(x))
    return np.asarray(pred).astype(np.int64)


@dataclass
class SimpleStudentResult:
    """One simple model, distilled and on labels: accuracy and fidelity (agreement with the teacher)."""

    kind: str
    distilled: Dict[str, float]
    labels_only: Dict[str, float]
    model: Any = None
    baseline: Any = None

    def as_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "distilled": self.distilled, "labels_only": self.labels_only}


def _scores(pred: np.ndarray, y: Optional[np.ndarray], teacher_pred: np.ndarray) -> Dict[str, float]:
    out = {"fidelity": float(np.mean(pred == teacher_pred))}
    if y is not None:
        out["accuracy"] = float(np.mean(pred == y))
    return out


def compare_students(teacher, x_train, y_train, x_test, y_test, kinds: Sequence[str] = STUDENTS,
                     temperature: float = 1.0, features: Optional[str] = None, seed: int = 0,
                     options: Optional[Dict[str, Dict[str, Any]]] = None) -> List[SimpleStudentResult]:
    """Distil ``teacher`` into each simple model of ``kinds`` and fit the same model on labels; score both.

    Args:
        teacher: anything :func:`as_soft_teacher` accepts.
        x_train, y_train: the transfer set (labels used only by the labels-only baselines).
        x_test, y_test: evaluation data.
        temperature: softening of the teacher's targets.
        features: a teacher module name: fit every model on that layer's outputs (feature transfer; torch
            teachers only). Baselines use the same features, so the comparison isolates the targets.
        options: per-kind scikit-learn options, e.g. ``{"decision_tree": {"max_depth": 6}}``.
    """
    options = options or {}
    p_train = soft_targets(teacher, x_train, temperature)
    t_test = soft_targets(teacher, x_test).argmax(1)
    if features is not None:
        from ..teacher import Teacher

        module = teacher.model if isinstance(teacher, Teacher) else teacher
        if not isinstance(module, nn.Module):
            raise KdkitError("features (feature transfer) needs a PyTorch teacher whose layers can be hooked")
        x_train = teacher_features(module, x_train, features)
        x_test = teacher_features(module, x_test, features)
    y_test = None if y_test is None else np.asarray(y_test)
    results = []
    for kind in kinds:
        opts = options.get(kind, {})
        student = fit_student(kind, x_train, p_train, seed, **opts)
        baseline = fit_on_labels(kind, x_train, y_train, seed, **opts)
        results.append(SimpleStudentResult(
            kind, _scores(predict_classes(student, x_test), y_test, t_test),
            _scores(predict_classes(baseline, x_test), y_test, t_test), student, baseline))
    return results


# ----------------------------------------------------------------------------- readable trees

Condition = Tuple[int, str, float]  # (feature index, "<=" or ">", threshold)


def feature_namer(feature_names: Optional[Sequence[str]] = None,
                  image_shape: Optional[Sequence[int]] = None) -> Callable[[int], str]:
    """How a feature index is printed: a given name, ``pixel[c,row,col]`` / ``pixel[row,col]``, or ``x[i]``."""
    if feature_names is not None:
        return lambda i: str(feature_names[i])
    if image_shape is not None:
        shape = tuple(int(s) for s in image_shape)
        if len(shape) == 3 and shape[0] == 1:
            shape = shape[1:]

        def pixel(i: int) -> str:
            return "pixel[" + ",".join(str(int(v)) for v in np.unravel_index(i, shape)) + "]"

        return pixel
    return lambda i: f"x[{i}]"


def _tree_paths(tree) -> List[Tuple[List[Condition], int, float, int]]:
    """Every root-to-leaf path: (conditions, predicted class index, leaf purity, samples)."""
    t = tree.tree_
    out = []

    def walk(node: int, conds: List[Condition]) -> None:
        left, right = t.children_left[node], t.children_right[node]
        if left == right:  # a leaf
            value = t.value[node][0]
            cls = int(np.argmax(value))
            total = float(value.sum())
            # weighted count: with soft-target copies (weights summing to 1 per input) this counts inputs
            out.append((conds, cls, float(value[cls] / total) if total else 0.0,
                        int(round(t.weighted_n_node_samples[node]))))
            return
        f, thr = int(t.feature[node]), float(t.threshold[node])
        walk(left, conds + [(f, "<=", thr)])
        walk(right, conds + [(f, ">", thr)])

    walk(0, [])
    return out


def tree_rules(tree, feature_names: Optional[Sequence[str]] = None, image_shape: Optional[Sequence[int]] = None,
               class_names: Optional[Sequence[str]] = None) -> str:
    """A fitted ``DecisionTreeClassifier`` as readable if-then rules, one line per leaf.

    Example line: ``if pixel[12,5] <= 0.3141 and pixel[20,14] > -0.25 then class 3 (Dress)  # p=0.91, n=120``.
    Thresholds are printed with full float precision (``repr``), so :func:`predict_rules` on the text
    classifies exactly as the tree does. Rules are mutually exclusive and cover every input.
    """
    if not hasattr(tree, "tree_") or not hasattr(tree, "classes_"):
        raise KdkitError(f"tree_rules needs a fitted scikit-learn DecisionTreeClassifier; got {type(tree).__name__}")
    name = feature_namer(feature_names, image_shape)
    lines = []
    for conds, cls, purity, n in _tree_paths(tree):
        label = tree.classes_[cls]
        text = " and ".join(f"{name(f)} {op} {thr!r}" for f, op, thr in conds) or "always"
        cname = f" ({class_names[int(label)]})" if class_names is not None else ""
        lines.append(f"if {text} then class {label}{cname}  # p={purity:.2f}, n={n}")
    return "\n".join(lines)


_COND = re.compile(r"^(?P<name>.+?) (?P<op><=|>) (?P<thr>\S+)$")
_RULE = re.compile(r"^if (?P<conds>.+) then class (?P<label>-?\d+)")


def parse_rules(text: str, feature_names: Optional[Sequence[str]] = None,
                image_shape: Optional[Sequence[int]] = None) -> List[Tuple[List[Condition], int]]:
    """Read rules printed by :func:`tree_rules` back into ``[(conditions, class label)]``."""
    name = feature_namer(feature_names, image_shape)
    n_features = len(feature_names) if feature_names is not None else int(np.prod(image_shape)) if image_shape else None
    index: Dict[str, int] = {}
    if n_features is not None:
        index = {name(i): i for i in range(n_features)}
    rules = []
    for line in text.splitlines():
        m = _RULE.match(line.strip())
        if not m:
            continue
        conds: List[Condition] = []
        if m.group("conds") != "always":
            for part in m.group("conds").split(" and "):
                c = _COND.match(part.strip())
                if not c:
                    raise KdkitError(f"cannot read rule condition {part!r}")
                fname = c.group("name")
                if fname in index:
                    f = index[fname]
                elif fname.startswith("x[") and fname.endswith("]"):
                    f = int(fname[2:-1])
                else:
                    raise KdkitError(f"rule names unknown feature {fname!r}")
                conds.append((f, c.group("op"), float(c.group("thr"))))
        rules.append((conds, int(m.group("label"))))
    return rules


def predict_rules(rules: Sequence[Tuple[List[Condition], int]], x) -> np.ndarray:
    """Classify inputs (N, ...) with parsed rules: the first rule whose conditions all hold."""
    # scikit-learn casts inputs to float32 and compares them with float64 thresholds: do exactly that.
    x = _flat(x).astype(np.float64)
    pred = np.full(len(x), -1, dtype=np.int64)
    undecided = np.ones(len(x), dtype=bool)
    for conds, label in rules:
        hit = undecided.copy()
        for f, op, thr in conds:
            hit &= (x[:, f] <= thr) if op == "<=" else (x[:, f] > thr)
        pred[hit] = label
        undecided &= ~hit
    return pred


__all__ = ["OnnxTeacher", "STUDENTS", "SimpleStudentResult", "as_soft_teacher", "compare_students",
           "expand_soft_targets", "feature_namer", "fit_on_labels", "fit_student", "make_student", "parse_rules",
           "predict_classes", "predict_rules", "soft_targets", "teacher_features", "tree_rules"]
