"""The report's plots, built from data first: :func:`curve_data` says what is drawn (tests read it, and the
report embeds it as JSON beside the image), :func:`curves_png` draws it; :func:`ladder_figure` draws a
compression ladder with a legend instead of text labels beside the points (labels of nearby steps overlapped).
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

#: Keys of an epoch record that are not loss parts.
_NOT_PARTS = ("train_accuracy", "train_loss")


def _series(label: str, hist: Sequence[Mapping[str, Any]], key: str, scale: float = 1.0) -> Optional[Dict[str, Any]]:
    pts = [(r["epoch"], r[key] * scale) for r in hist if isinstance(r.get(key), (int, float))]
    if not pts:
        return None
    return {"label": label, "key": key, "x": [p[0] for p in pts], "y": [p[1] for p in pts]}


def curve_data(histories: Mapping[str, Sequence[Mapping[str, Any]]], kept: Optional[Mapping[str, Any]] = None,
               teacher_accuracy: Optional[float] = None, teacher_label: str = "teacher") -> Dict[str, Any]:
    """What the training-curve figure shows, as plain data (accuracies in %, as in the table).

    Panels: ``loss`` (the total training loss and each logged part, ``train_kd``, ``train_ce``, ... separately),
    ``val_loss`` (validation NLL, or MSE for regression), ``accuracy`` (validation and training accuracy in %, a
    horizontal reference line at the teacher's accuracy). ``kept`` maps a model name to the epoch whose weights
    were kept: a vertical line on every panel and a marker on that model's validation accuracy.
    """
    kept = {k: v for k, v in (kept or {}).items() if v is not None}
    loss: List[Dict[str, Any]] = []
    val: List[Dict[str, Any]] = []
    acc: List[Dict[str, Any]] = []
    for name, hist in histories.items():
        keys = sorted({k for r in hist for k in r if k.startswith("train_") and k not in _NOT_PARTS
                       and not k.startswith("train_accuracy")})
        for key, label in [("train_loss", "loss (total)")] + [(k, k[len("train_"):]) for k in keys]:
            s = _series(f"{name} {label}", hist, key)
            loss += [s] if s else []
        for key, label in (("val_nll", "validation NLL"), ("val_mse", "validation MSE")):
            s = _series(f"{name} {label}", hist, key)
            val += [s] if s else []
        for key, label in (("val_accuracy", "validation"), ("train_accuracy", "training")):
            s = _series(f"{name} {label}", hist, key, 100.0)
            acc += [s] if s else []
    markers = []
    for name, epoch in kept.items():
        s = _series(name, histories.get(name, ()), "val_accuracy", 100.0)
        if s and epoch in s["x"]:
            markers.append({"label": f"{name}: kept epoch {epoch}", "x": epoch, "y": s["y"][s["x"].index(epoch)]})
    refs = [] if teacher_accuracy is None else [{"label": teacher_label, "y": 100.0 * teacher_accuracy}]
    return {"kept_epochs": kept, "panels": [
        {"name": "loss", "title": "Training loss and its parts", "ylabel": "loss", "series": loss},
        {"name": "val_loss", "title": "Validation loss", "ylabel": "NLL (MSE for regression)", "series": val},
        {"name": "accuracy", "title": "Accuracy", "ylabel": "accuracy (%)", "series": acc, "hlines": refs,
         "markers": markers},
    ]}


def png_base64(fig) -> str:
    """The figure as a base64 PNG (to embed in an HTML page), closed afterwards."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def pyplot():
    """matplotlib.pyplot on the Agg backend (no screen needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_png(data: Dict[str, Any]) -> str:
    """Draw :func:`curve_data`'s panels side by side; a base64 PNG."""
    plt = pyplot()
    panels = [p for p in data["panels"] if p["series"]]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.2 * max(1, len(panels)), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        colors = series_colors(len(panel["series"]))
        for s, color in zip(panel["series"], colors):
            style = ":" if s["key"].startswith("train_") and panel["name"] == "accuracy" else "-"
            ax.plot(s["x"], s["y"], style, marker="." if len(s["x"]) < 30 else None, label=s["label"], color=color)
        if panel["name"] == "accuracy":
            low = accuracy_floor(panel["series"], [h["y"] for h in panel.get("hlines", [])])
            if low is not None:
                ax.set_ylim(bottom=low, top=100.5)
        for h in panel.get("hlines", []):
            ax.axhline(h["y"], color="k", linestyle="--", linewidth=1, label=f"{h['label']} ({h['y']:.2f}%)")
        for m in panel.get("markers", []):
            ax.plot([m["x"]], [m["y"]], "*", color="red", markersize=12, label=m["label"])
        for name, epoch in data["kept_epochs"].items():
            ax.axvline(epoch, color="red", alpha=0.4, linewidth=1,
                       label=f"kept epoch ({name})" if panel["name"] != "accuracy" else None)
        ax.set(xlabel="epoch", ylabel=panel["ylabel"], title=panel["title"])
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.tight_layout()
    return png_base64(fig)


def series_colors(n: int) -> List[Any]:
    """``n`` distinct colours: matplotlib's 10-colour cycle, or 20 paired colours beyond 10 lines (never a
    colour used twice in one panel up to 20)."""
    plt = pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def accuracy_floor(series: Sequence[Mapping[str, Any]], others: Sequence[float] = ()) -> Optional[float]:
    """The lower edge of an accuracy axis (percent): just below the lowest value after each series' first
    epoch, so that the epochs that matter are not squeezed into the top of an axis from 30 %. None: no data."""
    values = [y for s in series for y in list(s["y"])[1:] if y is not None] + list(others)
    if not values:
        return None
    return max(0.0, 5.0 * math.floor((min(values) - 1.0) / 5.0))


def ladder_points(rows: Mapping[str, Mapping[str, Any]], key: str) -> List[Dict[str, Any]]:
    """The points of one ladder panel: ``{"label", "x", "y"}`` (x = ``key``, y = accuracy in %), in ladder order."""
    return [{"label": n, "x": r[key], "y": 100.0 * r["accuracy"]} for n, r in rows.items()
            if r.get("accuracy") is not None and r.get(key) is not None]


def ladder_figure(rows: Mapping[str, Mapping[str, Any]]):
    """Accuracy against batch-1 latency and against bytes on disk, one marker per step named in a legend
    below the panels (never as text beside the points, where nearby steps' names overlapped)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    markers = "osD^v<>pPX*h"
    names = [n for n, r in rows.items() if r.get("accuracy") is not None]  # one style per step, in both panels
    handles: Dict[str, Any] = {}
    panels = ((axes[0], "latency_ms_b1", "CPU latency, batch 1 (ms)"), (axes[1], "bytes", "bytes on disk"))
    for ax, key, label in panels:
        pts = ladder_points(rows, key)
        ax.plot([p["x"] for p in pts], [p["y"] for p in pts], "-", color="0.6", zorder=1)
        for p in pts:
            i = names.index(p["label"])
            handles[p["label"]] = ax.scatter([p["x"]], [p["y"]], marker=markers[i % len(markers)], color=f"C{i % 10}",
                                             s=50, zorder=2, label=p["label"])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels of a log axis overlapped
        ax.set(xlabel=label, ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    labels = [n for n in names if n in handles]  # a step measured in either panel is named once
    fig.legend([handles[n] for n in labels], labels, loc="lower center", ncol=min(4, max(1, len(labels))),
               fontsize=10)
    fig.suptitle("Compression ladder: accuracy against latency and size")
    fig.tight_layout(rect=(0, 0.08 + 0.05 * ((len(labels) - 1) // 4), 1, 1))
    return fig


def ladder_html(rows: Mapping[str, Mapping[str, Any]]) -> str:
    img = png_base64(ladder_figure(rows))
    return f'<h2>Compression ladder</h2><img alt="accuracy against latency and size" src="data:image/png;base64,{img}">'
