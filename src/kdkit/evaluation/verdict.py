"""What a run's numbers mean, in a sentence, and the warnings a careful reader would raise.

``headline`` says what came out (the student's score beside the teacher's, how much smaller it is);
``run_warnings`` flags a teacher that is worse than its student (distilling from it cannot help) and a student
that ended far from its teacher while still improving at its last epoch (it needed more training). Both land in
``report.json`` (``headline``, ``warnings``) and at the top of ``report.html``; the warnings are also printed.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

#: A teacher this far (accuracy points / relative perplexity) below its student is flagged.
TEACHER_WORSE_POINTS = 0.5
TEACHER_WORSE_PERPLEXITY = 0.05
#: A student this far from its teacher, kept at its last epoch, is flagged as stopped too early.
FAR_POINTS = 5.0
FAR_PERPLEXITY = 0.25


def _score(m: Mapping[str, Any]) -> Optional[tuple]:
    """(name, value, higher_is_better) of the figure that ranks models of this kind."""
    for key, higher in (("accuracy", True), ("perplexity", False), ("mse", False)):
        if isinstance(m.get(key), (int, float)):
            return key, float(m[key]), higher
    return None


def _fmt(key: str, value: float) -> str:
    return f"{100 * value:.2f}%" if key == "accuracy" else f"{value:.4g}"


def headline(models: Mapping[str, Mapping[str, Any]], split: str = "test") -> Optional[str]:
    """One sentence: the student's (or model's) score beside its teacher's, and how much smaller it is."""
    name = "student" if "student" in models else "model" if "model" in models else None
    if name is None:
        return None
    s = _score(models[name])
    if s is None:
        return None
    key, value, _ = s
    label = key.replace("mse", "mean squared error")
    t = models.get("teacher")
    ts = _score(t) if isinstance(t, Mapping) else None
    if ts is None or ts[0] != key:
        return f"The {'model' if name == 'model' else 'student'} reached a {split} {label} of {_fmt(key, value)}."
    text = (f"The student reached a {split} {label} of {_fmt(key, value)} against its teacher's "
            f"{_fmt(key, ts[1])}")
    agree = models[name].get("agreement")
    if isinstance(agree, (int, float)):
        text += f", agreeing with it on {100 * agree:.1f}% of inputs"
    sp, tp = models[name].get("parameters"), t.get("parameters")
    if isinstance(sp, (int, float)) and isinstance(tp, (int, float)) and sp:
        text += f", with {tp / sp:.1f}x fewer parameters"
    return text + "."


def run_warnings(models: Mapping[str, Mapping[str, Any]], history: Sequence[Mapping[str, Any]] = (),
                 epochs: Optional[int] = None, kept_epoch: Optional[int] = None) -> List[str]:
    """The warnings a run deserves (empty when none): teacher worse than student; far from it and unconverged."""
    out: List[str] = []
    s, t = models.get("student"), models.get("teacher")
    if not isinstance(s, Mapping) or not isinstance(t, Mapping):
        return out
    ss, ts = _score(s), _score(t)
    if ss is None or ts is None or ss[0] != ts[0]:
        return out
    key, sv, higher = ss
    tv = ts[1]
    if higher:
        worse, gap = tv < sv - TEACHER_WORSE_POINTS / 100, 100 * (tv - sv)
        far = gap > FAR_POINTS
    else:
        worse, gap = tv > sv * (1 + TEACHER_WORSE_PERPLEXITY), sv / tv - 1 if tv else 0.0
        far = gap > FAR_PERPLEXITY
    if worse:
        out.append(f"the teacher ({key} {_fmt(key, tv)}) is worse than its student ({_fmt(key, sv)}): distilling "
                   f"from it cannot help; train the teacher longer or check its checkpoint")
    improving = epochs is not None and kept_epoch is not None and kept_epoch >= epochs and len(history) >= 2
    if far and improving:
        how = f"{gap:.1f} points below" if higher else f"{100 * gap:.0f}% above"
        out.append(f"the student ended {how} its teacher ({key} {_fmt(key, sv)} against {_fmt(key, tv)}) and was "
                   f"still improving at its last epoch: train it longer (train.epochs) or with a higher learning "
                   f"rate (train.lr)")
    return out


def summary(models: Dict[str, Dict[str, Any]], history: Sequence[Mapping[str, Any]] = (),
            epochs: Optional[int] = None, kept_epoch: Optional[int] = None, split: str = "test") -> Dict[str, Any]:
    """``{"headline": sentence or None, "warnings": [...]}`` for ``report.json``."""
    return {"headline": headline(models, split), "warnings": run_warnings(models, history, epochs, kept_epoch)}


__all__ = ["headline", "run_warnings", "summary"]
