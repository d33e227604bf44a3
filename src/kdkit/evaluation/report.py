"""Reports: ``report.json`` (numbers) and ``report.html`` (what was run, comparison table, training curves), and a
console table.

A run's ``report.json`` holds a ``run`` block (:func:`run_info`: models, data sizes, method, optimiser, schedule,
seed, device, threads, versions, wall time) recorded while the run happens, so the page can say what was run.
:func:`render_report` rewrites ``report.html`` from ``report.json`` and ``metrics.jsonl`` alone; run directories
written before the ``run`` block existed render too, their missing fields shown as "unknown".
"""

from __future__ import annotations

import html
import json
import platform
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..training.rundir import write_json
from .plots import curve_data, curves_png

UNKNOWN = "unknown"

# Columns of the comparison table: (metric key, header, format).
COLUMNS = [
    ("perplexity", "perplexity", "{:.2f}"),
    ("token_accuracy", "next-token accuracy", "{:.2%}"),
    ("accuracy", "accuracy", "{:.2%}"),
    ("macro_f1", "macro-F1", "{:.4f}"),
    ("agreement", "agreement w/ teacher", "{:.2%}"),
    ("ece", "ECE", "{:.4f}"),
    ("nll", "NLL", "{:.4f}"),
    ("mse", "MSE", "{:.4f}"),
    ("parameters", "params", "{:,}"),
    ("nonzero", "non-zero params", "{:,}"),
    ("bytes", "bytes on disk", "{:,}"),
    ("latency_ms_b1", "latency b1 (ms)", "{:.3f}"),
    ("latency_ms_b32", "latency b32 (ms)", "{:.2f}"),
    ("latency_ms_b256", "latency b256 (ms)", "{:.2f}"),
    ("ort_latency_ms_b1", "onnxruntime b1 (ms)", "{:.3f}"),
    ("ort_latency_ms_b32", "onnxruntime b32 (ms)", "{:.2f}"),
    ("ort_latency_ms_b256", "onnxruntime b256 (ms)", "{:.2f}"),
    ("gen_tokens_per_s", "generation b1 (tokens/s)", "{:.1f}"),
]


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def table_rows(models: Dict[str, Dict[str, Any]]) -> List[List[str]]:
    cols = [c for c in COLUMNS if any(c[0] in m for m in models.values())]
    rows = [["model"] + [h for _, h, _ in cols]]
    for name, m in models.items():
        rows.append([name] + [_cell(m.get(k), f) for k, _, f in cols])
    return rows


def format_table(models: Dict[str, Dict[str, Any]]) -> str:
    """A plain-text table, one row per model."""
    rows = table_rows(models)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _table_html(models: Dict[str, Dict[str, Any]]) -> str:
    """The comparison table; latency cells add their quartiles when the run measured them."""
    rows = table_rows(models)
    cols = [c for c in COLUMNS if any(c[0] in m for m in models.values())]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = []
    for (name, m), row in zip(models.items(), rows[1:]):
        cells = [html.escape(row[0])]
        for (key, _, fmt), text in zip(cols, row[1:]):
            q1, q3 = m.get(f"{key}_q1"), m.get(f"{key}_q3")
            spread = f' <small>({_cell(q1, fmt)}&ndash;{_cell(q3, fmt)})</small>' if q1 is not None else ""
            cells.append(html.escape(text) + spread)
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _latency_note(models: Dict[str, Dict[str, Any]]) -> str:
    threads = sorted({m["latency_threads"] for m in models.values() if m.get("latency_threads") is not None})
    repeats = sorted({m["latency_repeats"] for m in models.values() if m.get("latency_repeats") is not None})
    how = (f"median of {'/'.join(map(str, repeats))} timed runs after warm-up, quartiles in brackets"
           if repeats else "median CPU wall time per batch after warm-up")
    return (f"Latency: {how}; torch CPU threads while timing: "
            f"<span id=\"latency-threads\">{'/'.join(map(str, threads)) if threads else UNKNOWN}</span>.")


def run_info(cfg, *, student, teacher=None, splits=None, device=None, wall_seconds: Optional[float] = None,
             teacher_val_accuracy: Optional[float] = None, command: str = "distill", task=None) -> Dict[str, Any]:
    """The ``run`` block of ``report.json``: everything the report names about how the run was made.

    Args:
        cfg: the resolved :class:`kdkit.config.RunConfig`.
        student: the trained model; teacher: a :class:`kdkit.teacher.Teacher` (or ensemble) or None.
        splits: the :class:`kdkit.data.DataSplits` trained on (sizes, labelled share, augmentation).
        device: where it trained; wall_seconds: set-up to the end of training.
        task: the run's kind of task (:mod:`kdkit.tasks`): its name, and what it says about the training data.
    """
    import torch

    from ..version import __version__

    def model(m, spec) -> Dict[str, Any]:
        nets = [m] if isinstance(m, torch.nn.Module) else list(getattr(m, "models", None) or [m.model])
        return {"name": getattr(spec, "name", None) if spec is not None else None,
                "class": " + ".join(type(n).__name__ for n in nets),
                "parameters": sum(p.numel() for n in nets for p in n.parameters())}

    tr = cfg.train
    info: Dict[str, Any] = {
        "command": command, "seed": cfg.seed, "device": str(device) if device is not None else cfg.device,
        "threads": torch.get_num_threads(), "kdkit": __version__, "torch": torch.__version__,
        "python": platform.python_version(), "wall_seconds": wall_seconds,
        "student": model(student, cfg.model if command == "train" else cfg.student),
        "teacher": model(teacher, cfg.teacher) if teacher is not None else None,
        "teacher_val_accuracy": teacher_val_accuracy,
        "method": {"name": "supervised" if command == "train" else cfg.method.name,
                   "options": {} if command == "train" else cfg.method.options()},
        "optimizer": {"name": tr.optimizer, "lr": tr.lr, "weight_decay": tr.weight_decay,
                      **({"momentum": tr.momentum} if tr.optimizer == "sgd" else {})},
        "schedule": {"name": tr.schedule, "epochs": tr.epochs, "warmup_epochs": tr.warmup_epochs,
                     **({"step_size": tr.step_size, "gamma": tr.gamma} if tr.schedule == "step" else {})},
        "batch_size": cfg.data.batch_size,
        "data": {"name": cfg.data.name, "labelled_fraction_asked": cfg.data.labelled_fraction},
    }
    if task is not None:
        info["task"] = task.name
    if splits is not None:
        from ..teacher.cache import transform_description

        info["data"]["splits"] = {k: len(getattr(splits, k)) for k in ("train", "val", "test")
                                  if getattr(splits, k) is not None and hasattr(getattr(splits, k), "__len__")}
        if task is not None:
            info["data"].update(task.describe_data(splits.train))
        desc = transform_description(splits.train)
        info["data"]["augment"] = None if desc in ("", "none") else desc
    return info


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, Mapping) or d.get(p) is None:
            return None
        d = d[p]
    return d


def _fmt_model(m: Any) -> Optional[str]:
    if not isinstance(m, Mapping):
        return None
    name = f"{m['name']} " if m.get("name") else ""
    params = f", {m['parameters']:,} parameters" if isinstance(m.get("parameters"), int) else ""
    return f"{name}({m.get('class', UNKNOWN)}{params})"


def _fmt_data(report: Mapping[str, Any]) -> Optional[str]:
    d = _get(report, "run", "data")
    name = (d or {}).get("name") or report.get("dataset")
    if name is None:
        return None
    parts = [str(name)]
    splits = (d or {}).get("splits")
    parts.append(", ".join(f"{k} {v:,}" for k, v in splits.items()) if splits else f"splits {UNKNOWN}")
    frac = (d or {}).get("labelled_fraction")
    if (d or {}).get("targets"):  # what the task says of its targets where a labelled share means nothing
        parts.append(f"{d['targets']} targets")
    else:
        parts.append(f"labelled {d['labelled_train']:,} of the training samples ({frac:.1%})" if frac is not None
                     else f"labelled fraction {UNKNOWN}")
    if (d or {}).get("augment"):
        parts.append(f"augmentation {d['augment']}")
    return "; ".join(parts)


def _fmt_opts(d: Any, skip: Sequence[str] = ("name",)) -> Optional[str]:
    if not isinstance(d, Mapping):
        return None
    opts = ", ".join(f"{k}={v}" for k, v in d.items() if k not in skip)
    return f"{d.get('name', '')}" + (f" ({opts})" if opts else "")


def run_rows(report: Mapping[str, Any], run_dir: Optional[Path] = None) -> List[tuple]:
    """The "What was run" table: ``(id, label, text or None, raw html or None)``; None text means unknown."""
    run = report.get("run") or {}
    method = run.get("method")
    method_text = None
    if isinstance(method, Mapping):
        opts = ", ".join(f"{k}={v}" for k, v in (method.get("options") or {}).items())
        method_text = f"{method.get('name')}" + (f" ({opts})" if opts else "")
    versions = (f"kdkit {run['kdkit']}, torch {run['torch']}, Python {run.get('python', UNKNOWN)}"
                if run.get("kdkit") and run.get("torch") else None)
    wall = f"{run['wall_seconds']:.1f} s" if isinstance(run.get("wall_seconds"), (int, float)) else None
    kept = report.get("kept_epoch")
    kept_text = (f"{kept} of {report.get('epochs', UNKNOWN)} ({report.get('keep', UNKNOWN)})" if kept is not None
                 else None)
    teacher = _fmt_model(run.get("teacher")) if run.get("teacher") else (
        "none" if run.get("command") == "train" or (run and "teacher" in run) else None)
    links = " ".join(f'<a href="{f}">{f}</a>' for f in ("config.yaml", "metrics.jsonl")
                     if run_dir is None or (Path(run_dir) / f).exists())
    return [
        ("teacher", "Teacher", teacher, None),
        ("student", "Student" if run.get("command") != "train" else "Model", _fmt_model(run.get("student")), None),
        ("data", "Data", _fmt_data(report), None),
        ("method", "Method", method_text, None),
        ("optimizer", "Optimiser", _fmt_opts(run.get("optimizer")), None),
        ("schedule", "Schedule", _fmt_opts(run.get("schedule")), None),
        ("batch_size", "Batch size", None if run.get("batch_size") is None else str(run["batch_size"]), None),
        ("seed", "Seed", None if run.get("seed") is None else str(run["seed"]), None),
        ("device", "Device", run.get("device"), None),
        ("threads", "Threads (training)", None if run.get("threads") is None else str(run["threads"]), None),
        ("versions", "Versions", versions, None),
        ("wall_time", "Wall time", wall, None),
        ("kept_epoch", "Kept epoch", kept_text, None),
        ("files", "Files", None, links or None),
    ]


def _runs_html(runs: Sequence[Mapping[str, Any]], run_dir: Optional[Path]) -> str:
    """A report over several runs (``kdkit demo``): one row per run, linking to its own report."""
    head = "".join(f"<th>{h}</th>" for h in ("run", "command", "model", "teacher", "method", "labels", "epochs",
                                            "seed", "report"))
    rows = []
    for r in runs:
        link = f"{r['dir']}/report.html"
        exists = run_dir is None or (Path(run_dir) / link).exists()
        cells = [r.get("name"), r.get("command"), r.get("model"), r.get("teacher") or "none", r.get("method"),
                 r.get("labels"), r.get("epochs"), r.get("seed")]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c)) if c is not None else f'<em>{UNKNOWN}</em>'}</td>"
                                     for c in cells)
                    + (f'<td><a href="{html.escape(link)}">{html.escape(link)}</a></td>' if exists else "<td></td>")
                    + "</tr>")
    return (f'<h2>What was run</h2><div class="scroll"><table class="run"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _run_html(report: Mapping[str, Any], run_dir: Optional[Path]) -> str:
    if report.get("runs"):
        return _runs_html(report["runs"], run_dir)
    cells = []
    for key, label, text, raw in run_rows(report, run_dir):
        value = raw if raw is not None else html.escape(text) if text is not None else f"<em>{UNKNOWN}</em>"
        cells.append(f'<tr><th>{html.escape(label)}</th><td id="run-{key}">{value}</td></tr>')
    return f'<h2>What was run</h2><table class="run">{"".join(cells)}</table>'


def _curves_html(report: Mapping[str, Any], histories: Dict[str, Sequence[Dict[str, Any]]]) -> str:
    if not any(histories.values()):
        return ""
    kept = {"student": report.get("kept_epoch")} if "student" in histories else {}
    if "model" in histories:
        kept = {"model": report.get("kept_epoch")}
    t_acc, label = _get(report, "run", "teacher_val_accuracy"), "teacher (validation)"
    if t_acc is None and _get(report, "models", "teacher", "accuracy") is not None:
        t_acc, label = report["models"]["teacher"]["accuracy"], f"teacher ({report.get('split', 'test')})"
    data = curve_data(histories, kept, t_acc, label)
    blob = json.dumps(data).replace("</", "<\\/")
    return (f'<h2>Training curves</h2><img alt="training curves" src="data:image/png;base64,{curves_png(data)}">'
            f'<script type="application/json" id="plot-data">{blob}</script>')


def _verdict_html(report: Mapping[str, Any]) -> str:
    """The result in a sentence and the run's warnings, first on the page."""
    from .verdict import headline

    sentence = report.get("headline")
    if not isinstance(sentence, str):
        sentence = headline(report.get("models") or {}, report.get("split") or "test")
    out = f'<p class="summary"><strong>{html.escape(sentence)}</strong></p>' if sentence else ""
    for w in report.get("warnings") or []:
        out += f'<p class="warning">Warning: {html.escape(str(w))}</p>'
    return out


def render_html(report: Mapping[str, Any], histories: Dict[str, Sequence[Dict[str, Any]]],
                run_dir: Optional[Path] = None, extra_html: str = "") -> str:
    """The report page of ``report`` (the content of ``report.json``) and its training ``histories``."""
    title = str(report.get("title", "kdkit report"))
    models = report.get("models") or {}
    split = report.get("split")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
th{{background:#f3f3f3}}table.run td{{text-align:left}}img{{max-width:100%}}
p.warning{{background:#fff4e5;border-left:4px solid #e69500;padding:6px 10px}}
.scroll{{max-width:100%;overflow-x:auto}}</style></head>
<body><h1>{html.escape(title)}</h1>
{_verdict_html(report)}
{_run_html(report, run_dir)}
<h2>Results</h2>
<p>{html.escape((split or "test").capitalize())}-split metrics. Agreement: share of inputs where the model's arg-max
equals the teacher's. {_latency_note(models)}</p>
{_table_html(models)}
{_curves_html(report, histories)}
{extra_html}
</body></html>
"""


def samples_html(models: Dict[str, Dict[str, Any]]) -> str:
    """Generated text side by side (language models): one row per prompt, one column per model with samples."""
    having = {name: m["samples"] for name, m in models.items() if isinstance(m.get("samples"), list) and m["samples"]}
    if not having:
        return ""
    prompts = [s["prompt"] for s in next(iter(having.values()))]
    head = "<th>prompt</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in having)
    rows = []
    for i, p in enumerate(prompts):
        cells = "".join(f"<td style='text-align:left'>{html.escape(s[i]['continuation']) if i < len(s) else ''}</td>"
                        for s in having.values())
        rows.append(f"<tr><td>{html.escape(p)}</td>{cells}</tr>")
    return ("<h2>Generated samples (greedy)</h2><table><thead><tr>" + head + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def write_report(run_dir, models: Dict[str, Dict[str, Any]], histories: Dict[str, Sequence[Dict[str, Any]]],
                 title: str = "kdkit report", extra: Dict[str, Any] = None, extra_html: str = "") -> Dict[str, Any]:
    """Write ``report.json`` and ``report.html`` into ``run_dir``; returns the JSON content.

    ``extra`` (``run``: :func:`run_info`, ``kept_epoch``, ``split``, ...) goes into ``report.json`` beside
    ``models``; ``extra_html`` (already escaped HTML: more tables, plots) goes after the training curves.
    """
    run_dir = Path(run_dir)
    report = {"title": title, "models": models, **(extra or {})}
    extra_html = samples_html(models) + extra_html
    write_json(run_dir / "report.json", report)
    (run_dir / "report.html").write_text(render_html(report, histories, run_dir, extra_html))
    return report


def render_report(run_dir) -> Path:
    """Rewrite ``RUN_DIR/report.html`` from ``report.json`` and ``metrics.jsonl`` (any kdkit version's run
    directory: fields it did not record are shown as unknown). Returns the page's path.

    Raises:
        KdkitError: no readable ``report.json`` in ``run_dir``.
    """
    from ..errors import KdkitError
    from ..training.rundir import read_json, read_metrics

    run_dir = Path(run_dir)
    report = read_json(run_dir / "report.json")  # damaged or foreign: one error naming the file
    if report is None:
        raise KdkitError(f"{run_dir} has no readable report.json; expected a finished kdkit run directory")
    history = read_metrics(run_dir)  # a half-written last line is left out
    name = "model" if _get(report, "run", "command") == "train" or "model" in (report.get("models") or {}) \
        else "student"
    page = run_dir / "report.html"
    page.write_text(render_html(report, {name: history} if history else {}, run_dir))
    return page


def append_report(run_dir, key: str, value: Any, html_section: str = "") -> None:
    """Add ``key: value`` to an existing ``report.json`` and ``html_section`` to the end of ``report.html``.

    Later commands (``kdkit export``) use this to put their numbers beside a run's own.
    """
    from ..training.rundir import read_json

    run_dir = Path(run_dir)
    report = read_json(run_dir / "report.json") or {}
    report[key] = value
    write_json(run_dir / "report.json", report)
    page_path = run_dir / "report.html"
    if html_section:
        page = page_path.read_text() if page_path.is_file() else "<!doctype html><html><body>\n</body></html>\n"
        cut = page.rfind("</body>")
        page = page[:cut] + html_section + "\n" + page[cut:] if cut >= 0 else page + html_section
        page_path.write_text(page)
