"""``kdkit compare RUN_DIR ...``: several run directories side by side, as a table and one HTML page.

The table (printed, and at the top of the page) has each run's key test numbers from ``report.json``
(the student's, or the model's for ``kdkit train``), the epoch whose weights were kept and the wall
time (``run.wall_seconds``, or the sum of ``epoch_seconds`` for runs that predate it). The page adds the
config keys whose values differ between the runs (``config.yaml`` flattened to ``train.lr``,
``method.temperature``, ...; ``out_dir`` left out) and the curves of every run overlaid (validation
accuracy in %, validation NLL, training loss), drawn with matplotlib and embedded as a PNG: the page
is one self-contained file.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..config import flatten
from ..errors import KdkitError
from ..training.rundir import read_json, read_metrics, write_text_atomic

#: Columns of the comparison: (key, header, format). Keys come from the run's main model in report.json,
#: except ``kept_epoch``, ``epochs`` and ``wall_seconds`` (see :func:`load_run`).
COLUMNS: List[Tuple[str, str, str]] = [
    ("accuracy", "accuracy", "{:.2%}"),
    ("agreement", "agreement", "{:.2%}"),
    ("nll", "NLL", "{:.4f}"),
    ("ece", "ECE", "{:.4f}"),
    ("mse", "MSE", "{:.4f}"),
    ("parameters", "params", "{:,}"),
    ("teacher_accuracy", "teacher acc.", "{:.2%}"),
    ("kept_epoch", "kept epoch", "{}"),
    ("wall_seconds", "wall s", "{:.1f}"),
]
#: Config keys that differ between runs by construction and say nothing about the recipe.
IGNORED_KEYS = ("out_dir", "train.progress", "train.quiet")
#: A run of kdkit train names its model ``model:``, one of kdkit distill ``student:``: the same role, compared as one.
ROLE_ALIASES = (("model.", "student."),)
MISSING = "-"


@dataclass
class RunSummary:
    """What the comparison reads from one run directory."""

    label: str
    path: Path
    numbers: Dict[str, Any]
    config: Dict[str, Any]
    epochs: List[Dict[str, Any]] = field(default_factory=list)


@dataclass
class Comparison:
    runs: List[RunSummary]
    differing: Dict[str, List[Any]]  # config key -> one value per run (MISSING where a run lacks the key)
    table: str
    html_path: Optional[Path] = None


def _main_model(models: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The model a run is about: the student (distill), the model (train), else the first one reported."""
    for name in ("student", "model"):
        if isinstance(models.get(name), dict):
            return models[name]
    return next((m for m in models.values() if isinstance(m, dict)), {})


def load_run(path) -> RunSummary:
    """Read one run directory (``config.yaml`` required; ``report.json`` and ``metrics.jsonl`` when present)."""
    from ..config import parse_yaml

    path = Path(path)
    try:
        text = (path / "config.yaml").read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KdkitError(f"{path / 'config.yaml'}: not a YAML config (not UTF-8 text, byte {e.start})") from None
    config = parse_yaml(text, str(path / "config.yaml")) or {}
    if not isinstance(config, dict):
        raise KdkitError(f"{path / 'config.yaml'}: not a kdkit config (expected a mapping of sections)")
    report: Dict[str, Any] = read_json(path / "report.json") or {}  # damaged or foreign: one error naming it
    epochs = read_metrics(path)
    models = report.get("models") if isinstance(report.get("models"), dict) else {}
    main = _main_model(models)
    numbers = {k: v for k, v in main.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    teacher = models.get("teacher") if isinstance(models.get("teacher"), dict) else {}
    if "accuracy" in teacher:
        numbers["teacher_accuracy"] = teacher["accuracy"]
    kept = report.get("kept_epoch", main.get("kept_epoch"))
    if kept is not None:
        numbers["kept_epoch"] = f"{kept}/{report.get('epochs', len(epochs) or '?')}"
    run_block = report.get("run") if isinstance(report.get("run"), dict) else {}
    if isinstance(run_block.get("wall_seconds"), (int, float)):
        numbers["wall_seconds"] = run_block["wall_seconds"]
    elif epochs and all("epoch_seconds" in r for r in epochs):
        numbers["wall_seconds"] = sum(r["epoch_seconds"] for r in epochs)
    return RunSummary(label=str(path), path=path, numbers=numbers,
                      config=flatten(config) if isinstance(config, dict) else {}, epochs=epochs)


def _roles(flat: Dict[str, Any]) -> Dict[str, Any]:
    """``model.*`` keys of a kdkit train run read as ``student.*`` (the trained model's role), an absent
    (null) section dropped, so a train run and a distill run of the same model do not differ by their names."""
    out: Dict[str, Any] = {}
    for k, v in flat.items():
        for old, new in ROLE_ALIASES:  # "model.hidden" -> "student.hidden", "model" -> "student"
            if k == old[:-1] or k.startswith(old):
                k = new[:-1] + k[len(old) - 1:]
        if v is None and k in out:  # an absent section beside the same role's keys
            continue
        out[k] = v
    return out


def check_run_dirs(paths: Sequence) -> List[Path]:
    """The run directories, or one :class:`KdkitError` naming every path that is not one."""
    if not paths:
        raise KdkitError("kdkit compare: give at least one run directory")
    bad = [str(p) for p in paths if not (Path(p) / "config.yaml").is_file()]
    if bad:
        raise KdkitError(f"not kdkit run directories (no config.yaml): {', '.join(bad)}")
    return [Path(p) for p in paths]


def differing_keys(runs: Sequence[RunSummary]) -> Dict[str, List[Any]]:
    """Config keys whose values are not the same in every run. A key some runs lack counts as differing,
    unless every run either lacks it or has it null (an absent section: ``model: null`` beside ``model.name``)."""
    keys = sorted({k for r in runs for k in r.config} - set(IGNORED_KEYS))
    out = {}
    for k in keys:
        values = [r.config.get(k, MISSING) for r in runs]
        if all(v is None or v == MISSING for v in values):
            continue
        if any(json.dumps(v, sort_keys=True, default=str) != json.dumps(values[0], sort_keys=True, default=str)
               for v in values[1:]):
            out[k] = values
    return out


def _cell(value: Any, fmt: str) -> str:
    if value is None or value == MISSING:
        return MISSING
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def table_rows(runs: Sequence[RunSummary]) -> List[List[str]]:
    """Header row, then one row per run; columns no run has are left out."""
    cols = [c for c in COLUMNS if any(c[0] in r.numbers for r in runs)]
    rows = [["run"] + [h for _, h, _ in cols]]
    for r in runs:
        rows.append([r.label] + [_cell(r.numbers.get(k), f) for k, _, f in cols])
    return rows


def format_rows(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def curve_series(runs: Sequence[RunSummary]) -> Dict[str, Dict[str, Tuple[List[int], List[float]]]]:
    """What the plot draws: panel -> run label -> (epochs, values). Accuracy in %; NLL, else training loss."""
    panels: Dict[str, Dict[str, Tuple[List[int], List[float]]]] = {"validation accuracy (%)": {},
                                                                     "validation NLL": {}, "training loss": {}}
    for r in runs:
        for panel, key, scale in (("validation accuracy (%)", "val_accuracy", 100.0),
                                  ("validation NLL", "val_nll", 1.0), ("training loss", "train_loss", 1.0)):
            pts = [(rec["epoch"], rec[key] * scale) for rec in r.epochs
                   if isinstance(rec.get(key), (int, float)) and "epoch" in rec]
            if pts:
                panels[panel][r.label] = ([p[0] for p in pts], [p[1] for p in pts])
    return {k: v for k, v in panels.items() if v}


def _curves_png(series: Dict[str, Dict[str, Tuple[List[int], List[float]]]], labels: Sequence[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(series), figsize=(5.2 * len(series), 4), squeeze=False)
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # one colour per run in every panel
    for ax, (panel, by_run) in zip(axes[0], series.items()):
        for label, (xs, ys) in by_run.items():
            ax.plot(xs, ys, marker="o", markersize=3, color=colors[label], label=label)
        ax.set(xlabel="epoch", title=panel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _html_table(rows: List[List[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _value_text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=str)


def _links(runs: Sequence[RunSummary], page: Optional[Path]) -> str:
    """Each run's own report, linked from the comparison page (paths relative to where the page is written)."""
    import os

    items = []
    for r in runs:
        target = r.path / "report.html"
        href = os.path.relpath(target.resolve(), page.resolve().parent) if page is not None else str(target)
        items.append(f'<li><a href="{html.escape(href)}">{html.escape(r.label)}</a>'
                     + ("" if target.exists() else " (no report.html)") + "</li>")
    return f"<ul>{''.join(items)}</ul>"


def render_html(comparison: Comparison, page: Optional[Path] = None) -> str:
    runs = comparison.runs
    metrics = _html_table(table_rows(runs))
    if comparison.differing:
        rows = [["config key"] + [r.label for r in runs]]
        rows += [[k] + [_value_text(v) for v in values] for k, values in comparison.differing.items()]
        config = _html_table(rows)
    else:
        config = "<p>The runs' configs are the same (apart from out_dir and the console settings).</p>"
    series = curve_series(runs)
    curves = "<p>No per-epoch metrics (metrics.jsonl) to plot.</p>"
    if series:
        png = _curves_png(series, [r.label for r in runs])
        curves = f'<img alt="validation curves" src="data:image/png;base64,{png}">'

    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>kdkit compare</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin-bottom:1em}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
th{{background:#f3f3f3}}img{{max-width:100%}}</style></head>
<body><h1>kdkit compare: {len(runs)} run(s)</h1>
<h2>Runs</h2>
{_links(runs, page)}
<h2>Metrics</h2>
<p>From each run's report.json (test split, or validation where there is none): the student, or the model of
kdkit train. Kept epoch: the epoch whose weights were kept, of the epochs run. Wall s: seconds from set-up to the
end of training (report.json's run.wall_seconds; the sum of the epochs' seconds for older runs).</p>
{metrics}
<h2>Config keys that differ</h2>
{config}
<h2>Curves</h2>
{curves}
</body></html>
"""


def compare_runs(run_dirs: Sequence, out=None, force: bool = False) -> Comparison:
    """Compare run directories: the table (``.table``), and the HTML page written to ``out`` (None: no page).

    Raises:
        KdkitError: a path that is not a run directory (all such paths named), or ``out`` exists and not ``force``.
    """
    paths = check_run_dirs(run_dirs)
    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.exists() and not force:
        raise KdkitError(f"{out_path} already exists; give --force to overwrite it or --out another file")
    if out_path is not None and out_path.is_dir():
        raise KdkitError(f"--out {out_path} is a directory; expected an HTML file path")
    runs = [load_run(p) for p in paths]
    has = {old: any(k.startswith(old) for r in runs for k in r.config if r.config[k] is not None)
           for pair in ROLE_ALIASES for old in pair}
    if all(has[a] and has[b] for a, b in ROLE_ALIASES):  # train and distill runs side by side: one role
        for r in runs:
            r.config = _roles(r.config)
    comparison = Comparison(runs=runs, differing=differing_keys(runs), table=format_rows(table_rows(runs)))
    if out_path is not None:
        try:
            write_text_atomic(out_path, render_html(comparison, out_path))
        except OSError as e:
            raise KdkitError(f"cannot write {out_path}: {e.strerror or e}") from None
        comparison.html_path = out_path
    return comparison
