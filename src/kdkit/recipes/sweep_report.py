"""What a sweep leaves in its directory: ``best.yaml``, ``sweep.json`` and ``report.html``.

The report holds the table of trials (values searched, score, state, seconds, what the teacher did), the
best trial's training curves, parameter importance (:func:`optuna.importance.get_param_importances`:
fANOVA, Hutter et al., "An Efficient Approach for Assessing Hyperparameter Importance", ICML 2014) and a
parallel-coordinate plot (Inselberg, 1985) drawn with matplotlib: one line per finished trial across one
axis per searched setting and the score.
"""

from __future__ import annotations

import html
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..config import RunConfig, dump_config, load_config
from ..evaluation.plots import png_base64, pyplot
from ..training.rundir import read_metrics, write_text_atomic


@dataclass
class SweepResult:
    """What :func:`sweep` hands back.

    Attributes:
        dir: the sweep directory.
        best_config: the best trial's resolved config (``best.yaml``; its ``out_dir`` is ``SWEEP_DIR/best``),
            None when no trial finished.
        best_value: its score (``metric`` at its kept epoch, on the validation split).
        best_trial: its trial number; ``best_params`` the searched values it ran with.
        trials: one row per trial (as in ``sweep.json``).
        teacher: teacher passes over the training set done, and saved by the shared cache.
        study: the Optuna study.
    """

    dir: Path
    metric: str
    direction: str
    best_config: Optional[RunConfig] = None
    best_value: Optional[float] = None
    best_trial: Optional[int] = None
    best_params: Dict[str, Any] = field(default_factory=dict)
    trials: List[Dict[str, Any]] = field(default_factory=list)
    teacher: Dict[str, Any] = field(default_factory=dict)
    study: Any = None


def _safe_url(url: str) -> str:
    """The URL without its password (for messages and sweep.json)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _rows(study, space) -> List[Dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        params = {k: (space_dim.value_of(v) if (space_dim := _dim(space, k)) is not None else v)
                  for k, v in t.params.items()}
        rows.append({"trial": t.number, "state": t.state.name.lower(), "params": params,
                     "value": t.value if t.values else None, "seconds": t.user_attrs.get("seconds"),
                     "epochs": t.user_attrs.get("epochs"), "teacher": t.user_attrs.get("teacher"),
                     "teacher_passes": t.user_attrs.get("teacher_passes"),
                     "ignored": t.user_attrs.get("ignored", []),
                     "retry_of": t.user_attrs.get("retry_of", t.system_attrs.get("failed_trial")),
                     "error": t.user_attrs.get("error"), "run_dir": t.user_attrs.get("run_dir")})
    return rows


def _dim(space, key: str):
    return next((d for d in space.dims if d.key == key), None)


def teacher_accounting(study, rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Teacher passes over the training set: done, what every trial running its teacher live would have
    done (one per epoch), and what every trial building its own cache would have done (one per trial)."""
    prebuilt = sum(int(v) for k, v in study.user_attrs.items() if k.startswith("kdkit_prebuild:"))
    with_teacher = [r for r in rows if r["teacher"] not in (None, "none")]
    done = prebuilt + sum(r["teacher_passes"] or 0 for r in with_teacher)
    live = sum(r["epochs"] or 0 for r in with_teacher)
    own_cache = sum(1 if r["teacher"] in ("shared cache", "cache built") else (r["epochs"] or 0)
                    for r in with_teacher)
    return {"passes_done": done, "shared_cache_builds": prebuilt,
            "trials_on_shared_cache": sum(r["teacher"] == "shared cache" for r in rows),
            "trials_live_teacher": sum(r["teacher"] == "live" for r in rows),
            "passes_if_live_teacher": live, "saved_vs_live_teacher": live - done,
            "passes_if_cache_per_trial": own_cache, "saved_vs_cache_per_trial": own_cache - done}


def importance(study) -> Dict[str, float]:
    """fANOVA importance of each searched setting over the completed trials ({} when too few to say)."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 3:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError):  # e.g. no setting shared by every completed trial
        return {}


def write_outputs(study, sweep_dir: Path, block, space, storage_url: str, seconds: float):
    """``best.yaml`` (runnable with ``kdkit distill``/``train``), ``sweep.json`` and ``report.html``."""
    rows = _rows(study, space)
    result = SweepResult(dir=sweep_dir, metric=block.metric, direction=block.resolved_direction(), trials=rows,
                         teacher=teacher_accounting(study, rows), study=study)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    best_history: List[Dict[str, Any]] = []
    if complete:
        best = study.best_trial
        run_dir = Path(best.user_attrs.get("run_dir", ""))
        result.best_trial, result.best_value = best.number, best.value
        result.best_params = next(r["params"] for r in rows if r["trial"] == best.number)
        if (run_dir / "config.yaml").is_file():  # on this machine (another worker's trial may live elsewhere)
            cfg = load_config(run_dir / "config.yaml")
            result.best_config = cfg.model_copy(update={"out_dir": str(sweep_dir / "best")})
            command = "train" if cfg.model is not None and cfg.student is None else "distill"
            write_text_atomic(sweep_dir / "best.yaml",
                              f"# kdkit sweep: trial {best.number}, {block.metric} {best.value:.6g} (kept epoch)\n"
                              f"# run it: kdkit {command} {sweep_dir / 'best.yaml'}\n"
                              + dump_config(result.best_config))
            best_history = read_metrics(run_dir)
    imp = importance(study)
    summary = {"study": study.study_name, "storage": _safe_url(storage_url), "sampler": block.sampler,
               "pruner": block.pruner, "metric": block.metric, "direction": result.direction,
               "space": {d.key: d.describe() for d in space.dims}, "fixed": space.fixed,
               "trials_target": block.trials, "seconds_this_process": round(seconds, 1),
               "states": {s: sum(r["state"] == s for r in rows) for s in dict.fromkeys(r["state"] for r in rows)},
               "best": {"trial": result.best_trial, "value": result.best_value, "params": result.best_params,
                        "config": str(sweep_dir / "best.yaml") if result.best_config is not None else None},
               "teacher": result.teacher, "importance": imp, "trials": rows}
    write_text_atomic(sweep_dir / "sweep.json", json.dumps(summary, indent=2, default=str) + "\n")
    write_text_atomic(sweep_dir / "report.html", _html(summary, best_history, space, block))
    return result


# ----------------------------------------------------------------------------- report.html



def _curves(history: List[Dict[str, Any]], metric: str) -> Optional[str]:
    if not history:
        return None
    plt = pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    epochs = [r["epoch"] for r in history]
    ax_loss.plot(epochs, [r.get("train_loss") for r in history], "o-", label="training loss")
    ax_val.plot(epochs, [r.get(metric) for r in history], "o-", label=metric)
    if any("train_accuracy" in r for r in history) and metric == "val_accuracy":
        ax_val.plot(epochs, [r.get("train_accuracy") for r in history], ":", label="train_accuracy")
    ax_loss.set(xlabel="epoch", title="Training loss")
    ax_val.set(xlabel="epoch", title=metric)
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=10)
    fig.tight_layout()
    return png_base64(fig)


def _position(dim, value: Any) -> Optional[float]:
    """Where a value sits on its axis, 0..1 (log ranges on a log scale, choices evenly spaced)."""
    if dim is None or value is None:
        return None
    if dim.is_choice:
        labels = [json.dumps(c, sort_keys=True, default=str) for c in dim.choices]
        key = json.dumps(value, sort_keys=True, default=str)
        return labels.index(key) / max(1, len(labels) - 1) if key in labels else None
    lo, hi, v = dim.low, dim.high, float(value)
    if dim.log:
        lo, hi, v = math.log(lo), math.log(hi), math.log(v)
    return (v - lo) / (hi - lo)


def axis_labels(dim) -> List[tuple]:
    """``(text, position 0..1)`` of the labels of one parallel-coordinates axis: every choice of a choice (none
    left unnamed in the middle), or the two ends of a range. A trial whose method does not take the option has
    no point on the axis (it is never drawn as a value)."""
    if dim.is_choice:
        n = max(1, len(dim.choices) - 1)
        return [(str(c), i / n) for i, c in enumerate(dim.choices)]
    return [(f"{dim.low:g}", 0.0), (f"{dim.high:g}", 1.0)]


def _parallel(rows: List[Dict[str, Any]], space, metric: str, maximize: bool) -> Optional[str]:
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    if len(done) < 2 or not space.dims:
        return None
    plt = pyplot()
    dims = list(space.dims)
    values = [r["value"] for r in done]
    vlo, vhi = min(values), max(values)
    span = (vhi - vlo) or 1.0
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * (len(dims) + 1)), 4))
    cmap = plt.get_cmap("viridis")
    for r in sorted(done, key=lambda r: r["value"] if maximize else -r["value"]):  # best drawn last, on top
        quality = (r["value"] - vlo) / span if maximize else (vhi - r["value"]) / span
        xs, ys = [], []
        for i, d in enumerate(dims):
            pos = _position(d, r["params"].get(d.key))
            if pos is not None:  # an option the trial's method does not take: no point on that axis
                xs.append(i)
                ys.append(pos)
        xs.append(len(dims))
        ys.append((r["value"] - vlo) / span)
        ax.plot(xs, ys, "-o", color=cmap(quality), alpha=0.8, markersize=3)
    for i, d in enumerate(dims):
        ax.axvline(i, color="#999", lw=0.8)
        for text, pos in axis_labels(d):
            ax.annotate(text, (i, pos), textcoords="offset points", xytext=(4, -3), fontsize=9)
    ax.axvline(len(dims), color="#999", lw=0.8)
    ax.annotate(f"{vlo:.4g}", (len(dims), 0), textcoords="offset points", xytext=(4, -3), fontsize=9)
    ax.annotate(f"{vhi:.4g}", (len(dims), 1), textcoords="offset points", xytext=(4, -3), fontsize=9)
    ax.set_xticks(range(len(dims) + 1), [d.key for d in dims] + [metric], fontsize=10)
    ax.set_yticks([])
    ax.set_ylim(-0.12, 1.12)
    ax.set_title("Completed trials (brighter: better score; choices evenly spaced, ranges to scale)")
    fig.tight_layout()
    return png_base64(fig)


def _importance_png(imp: Dict[str, float]) -> Optional[str]:
    if not imp:
        return None
    plt = pyplot()
    keys = list(imp)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(keys)))
    ax.barh(keys, [imp[k] for k in keys], color="C0")
    ax.set(xlabel="importance (fANOVA, share of the score's variance)", xlim=(0, 1))
    fig.tight_layout()
    return png_base64(fig)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _score(metric: str, value: Any) -> str:
    """A trial's score as the other pages show it: accuracies in percent, other metrics as numbers."""
    if not isinstance(value, (int, float)):
        return _fmt(value)
    return f"{100 * value:.2f}%" if "accuracy" in metric or "f1" in metric else f"{value:.4g}"


def _html(summary: Dict[str, Any], best_history, space, block) -> str:
    metric = summary["metric"]
    keys = [d.key for d in space.dims]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in
                   ["trial", "state"] + keys + [metric, "epochs", "seconds", "teacher"])
    body = []
    best = summary["best"]["trial"]
    for r in summary["trials"]:
        style = ' style="background:#e8f4e8"' if r["trial"] == best else ""
        cells = [r["trial"], r["state"] + (f" (retry of {r['retry_of']})" if r["retry_of"] is not None else "")]
        cells += [r["params"].get(k, "n/a") for k in keys] + [_score(metric, r["value"]), r["epochs"], r["seconds"],
                                                              r["teacher"]]
        body.append(f"<tr{style}>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in cells) + "</tr>")
    parts = [f"<h2>Trials</h2><p>Score: {html.escape(metric)} on the validation split at the epoch whose weights "
             f"were kept ({summary['direction']}). n/a: an option the trial's method does not take. Best trial "
             f"highlighted; its config is best.yaml.</p>",
             f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>']
    t = summary["teacher"]
    parts.append(f"<h2>Teacher</h2><p>Teacher passes over the training set: {t['passes_done']} done "
                 f"({t['shared_cache_builds']} shared-cache build(s); {t['trials_on_shared_cache']} trial(s) read "
                 f"the shared cache, {t['trials_live_teacher']} ran the teacher live). With the teacher live in "
                 f"every trial: {t['passes_if_live_teacher']} ({t['saved_vs_live_teacher']} saved); with a cache "
                 f"built per trial: {t['passes_if_cache_per_trial']} ({t['saved_vs_cache_per_trial']} saved).</p>")
    for title, png in (("Best trial's curves", _curves(best_history, metric)),
                       ("Parameter importance", _importance_png(summary["importance"])),
                       ("Parallel coordinates", _parallel(summary["trials"], space, metric,
                                                          summary["direction"] == "maximize"))):
        if png is not None:
            parts.append(f'<h2>{title}</h2><img alt="{title}" src="data:image/png;base64,{png}">')
        elif title == "Parameter importance":
            parts.append("<h2>Parameter importance</h2><p>Not computed: it needs at least 3 completed trials "
                         "sharing a searched setting.</p>")
    best_line = (f"best: trial {best}, {metric} {_score(metric, summary['best']['value'])}" if best is not None
                 else "no trial has finished")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>kdkit sweep: {html.escape(summary['study'])}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}th{{background:#f3f3f3}}img{{max-width:100%}}
.scroll{{max-width:100%;overflow-x:auto}}</style>
</head><body><h1>kdkit sweep: {html.escape(summary['study'])}</h1>
<p>{html.escape(summary['sampler'])} sampler, pruner {html.escape(summary['pruner'])}, storage
{html.escape(summary['storage'])}; {html.escape(best_line)}.</p>
{''.join(parts)}
</body></html>
"""
