"""``kdkit export RUN_DIR``: export a run directory's model as its kind of task says, and record what was written.

The run's model is rebuilt from its ``config.yaml`` (or a ``kdkit compress`` run's last float model), its task is
chosen from the data (:mod:`kdkit.tasks`), and :meth:`~kdkit.tasks.base.Task.export` writes the file and checks its
parity; this module then writes the record beside the file, the model card (for tasks that have one) and the
report's export section. The file formats and checks themselves are in :mod:`kdkit.export.core`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from ..errors import KdkitError
from .core import FORMATS


def _load_run_model(run_dir: Path):
    """The run's model (best checkpoint, or a compress run's last float model), its config, data splits and task."""
    from ..assemble import build_data, build_model, check_rebuildable
    from ..compress.ladder import is_compress_run, load_compressed
    from ..config import load_config
    from ..tasks import task_for

    if not (run_dir / "config.yaml").is_file():
        raise KdkitError(f"{run_dir} is not a kdkit run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    check_rebuildable(cfg, run_dir, "export")
    splits = build_data(cfg.data, cfg.seed)
    task = task_for(splits)
    if is_compress_run(run_dir):
        return load_compressed(run_dir), cfg, splits, task
    spec = cfg.model or cfg.student
    if spec is None:
        raise KdkitError(f"{run_dir}/config.yaml names no model or student to export")
    model = build_model(spec.model_copy(update={"checkpoint": str(run_dir)}), splits, task=task).eval()
    return model, cfg, splits, task


def record_path(path: Path) -> Path:
    """Where the record of an exported file goes: beside it, its name plus ``.json`` (``model.onnx.json``,
    ``model.pt.json``), so exports of several formats into one folder never share a record."""
    return path.with_name(path.name + ".json")


def export_run(run_dir, fmt: str = "onnx", int8: bool = False, out=None, samples: int = 256,
               calibration_samples: int = 512, int8_max_drop: float = 1.0, keep_int8: bool = False) -> Dict[str, Any]:
    """``kdkit export``: export a run directory's model, check parity on test inputs, add it to the report.

    The file goes to ``out`` or ``RUN_DIR/export/model[-int8].onnx`` / ``model.pt``; ``<file>.json`` beside it
    (``model.onnx.json``) holds the numbers, which are also appended to the run's report, and ``MODEL_CARD.md``
    beside it describes the model (:mod:`kdkit.export.card`).
    """
    from ..evaluation.report import append_report
    from ..training.rundir import read_json, write_json
    from .card import card_path, check_card_writable, write_model_card

    if fmt not in FORMATS:
        raise KdkitError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    model, cfg, splits, task = _load_run_model(run_dir)
    read_json(run_dir / "report.json")  # the report the export is added to: damaged or foreign fails before writing
    path = Path(out) if out is not None else run_dir / "export" / task.export_name(fmt, int8)
    if task.writes_model_card:
        check_card_writable(card_path(path))  # before anything is written: an edited or foreign card stops the export
    result, section = task.export(model, splits, path, fmt, int8, samples=samples,
                                  calibration_samples=calibration_samples, dataset=cfg.data.name,
                                  int8_max_drop=int8_max_drop, keep_int8=keep_int8)
    if task.writes_model_card:
        result["model_card"] = str(write_model_card(run_dir, cfg, result))
    write_json(record_path(path), result)
    append_report(run_dir, f"export_{path.stem}", result, section)
    return result


__all__ = ["export_run"]
