"""Reports: ``report.json`` (numbers) and ``report.html`` (comparison table + training curves), and a console table."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Dict, List, Sequence

from ..training.rundir import write_json

# Columns of the comparison table: (metric key, header, format).
COLUMNS = [
    ("perplexity", "perplexity", "{:.2f}"),
    ("token_accuracy", "next-token accuracy", "{:.2%}"),
    ("accuracy", "accuracy", "{:.2%}"),
    ("agreement", "agreement w/ teacher", "{:.2%}"),
    ("ece", "ECE", "{:.4f}"),
    ("nll", "NLL", "{:.4f}"),
    ("mse", "MSE", "{:.4f}"),
    ("parameters", "params", "{:,}"),
    ("nonzero", "non-zero params", "{:,}"),
    ("bytes", "bytes on disk", "{:,}"),
    ("latency_ms_b1", "latency b1 (ms)", "{:.3f}"),
    ("latency_ms_b256", "latency b256 (ms)", "{:.2f}"),
    ("ort_latency_ms_b1", "onnxruntime b1 (ms)", "{:.3f}"),
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


def _curves_png(histories: Dict[str, Sequence[Dict[str, Any]]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, hist) in enumerate(histories.items()):
        color = f"C{i % 10}"  # one colour per model: solid validation, dotted training
        epochs = [r["epoch"] for r in hist]
        if any("train_loss" in r for r in hist):
            ax_loss.plot(epochs, [r.get("train_loss") for r in hist], color=color, label=f"{name} train loss")
        for key, style in (("val_accuracy", "-"), ("train_accuracy", ":")):
            if any(key in r for r in hist):
                ax_acc.plot(epochs, [r.get(key) for r in hist], style, color=color,
                            label=f"{name} {key.replace('_', ' ')}")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


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

    ``extra_html`` (already escaped HTML: more tables, plots) goes after the training curves.
    """
    run_dir = Path(run_dir)
    report = {"title": title, "models": models, **(extra or {})}
    extra_html = samples_html(models) + extra_html
    write_json(run_dir / "report.json", report)
    rows = table_rows(models)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    img = ""
    if any(histories.values()):
        img = (f'<h2>Training curves</h2>'
               f'<img alt="training curves" src="data:image/png;base64,{_curves_png(histories)}">')
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
th{{background:#f3f3f3}}img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Test-split metrics. Agreement: share of test inputs where the model's arg-max equals the teacher's.
Latency: median CPU wall time per batch after warm-up.</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{img}
{extra_html}
</body></html>
"""
    (run_dir / "report.html").write_text(page)
    return report


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
