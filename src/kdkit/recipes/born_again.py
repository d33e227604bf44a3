"""Born-again networks: distil a model into a fresh copy of itself, generation after generation.

Furlanello, Lipton, Tschannen, Itti & Anandkumar, "Born-Again Neural Networks", ICML 2018.
Generation 0 is a normally trained model; generation k (same architecture, new random
initialisation) is distilled from generation k-1. The paper also evaluates the ensemble of the
generations ("BAN ensemble"); the summary reports it too.

Each generation is an ordinary distillation run in its own sub-directory::

    <out_dir>/
      gen0/          (only when generation 0 is trained here)
      gen1/ ... genN/  run directories (config.yaml, checkpoints/, report.json, ...)
      summary.json   accuracy per generation and of the ensemble of generations 1..N

    kdkit born-again CONFIG --generations 3 [key.path=value ...]
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..config import ModelConfig, RunConfig
from ..errors import KdkitError
from ..evaluation.report import format_table
from ..methods.dml import reinitialise
from ..tasks import evaluate
from ..training.rundir import create_run_dir, write_json


@dataclass
class BornAgainRun:
    """What :func:`born_again` hands back.

    Attributes:
        runs: one :class:`kdkit.api.Run` per generation 1..N.
        summary: ``{"generations": [{"generation": k, metrics...}], "ensemble": {...}}``.
        dir: the parent directory, if any.
    """

    runs: List[Any] = field(default_factory=list)
    summary: Dict[str, Any] = field(default_factory=dict)
    dir: Optional[Path] = None

    @property
    def student(self) -> nn.Module:
        """The last generation."""
        return self.runs[-1].student


def _ensemble_metrics(models: List[nn.Module], data) -> Dict[str, Any]:
    from ..teacher import TeacherEnsemble

    ens = TeacherEnsemble([m.to("cpu") for m in models])
    return evaluate(ens.model, data, measure_latency=False)


def _summarise(gen0: Optional[Dict[str, Any]], runs: List[Any], test_data, out: Optional[Path]) -> Dict[str, Any]:
    rows = []
    if gen0 is not None:
        rows.append({"generation": 0, **gen0})
    for k, run in enumerate(runs, start=1):
        rows.append({"generation": k, **run.metrics.get("student", {}), "dir": str(run.dir) if run.dir else None})
    summary: Dict[str, Any] = {"generations": rows}
    if test_data is not None and len(runs) > 1:
        summary["ensemble"] = _ensemble_metrics([r.student for r in runs], test_data)
    if out is not None:
        write_json(out / "summary.json", summary)
    table = {f"gen{r['generation']}": r for r in rows}
    if "ensemble" in summary:
        table[f"ensemble gen1-{len(runs)}"] = summary["ensemble"]
    print(format_table(table))
    return summary


def born_again(teacher: nn.Module, train_data, val_data=None, *, generations: int = 2, method: str = "kd",
               test_data=None, out_dir=None, seed: int = 0, device: str = "auto", batch_size: int = 128,
               **options: Any) -> BornAgainRun:
    """Run ``generations`` born-again generations from a trained ``teacher`` (generation 0).

    Every generation's student is a deep copy of the teacher's architecture with fresh random weights
    (seeded by ``seed + k``), distilled from the previous generation with ``method`` and ``options``
    (training settings and method options, as for :func:`kdkit.distill`).

    Returns:
        A :class:`BornAgainRun`; with ``out_dir``, generation k is written to ``out_dir/gen{k}`` and the
        summary to ``out_dir/summary.json``.
    """
    from ..api import distill

    if generations < 1:
        raise KdkitError(f"generations must be >= 1; got {generations}")
    out = create_run_dir(out_dir) if out_dir is not None else None
    gen0 = evaluate(teacher, test_data, measure_latency=False) if test_data is not None else None
    runs, previous = [], teacher
    for k in range(1, generations + 1):
        torch.manual_seed(seed + k)
        student = reinitialise(copy.deepcopy(previous)).train().requires_grad_(True)
        run = distill(previous, student, train_data, val_data, method=method, test_data=test_data,
                      out_dir=(out / f"gen{k}") if out is not None else None, seed=seed + k, device=device,
                      batch_size=batch_size, **options)
        runs.append(run)
        previous = run.student
    return BornAgainRun(runs, _summarise(gen0, runs, test_data, out), out)


def born_again_config(cfg: RunConfig, generations: int = 2) -> BornAgainRun:
    """``kdkit born-again``: generations from a config.

    Generation 0 is ``teacher.checkpoint`` when given; otherwise it is trained here (supervised) from the
    ``student`` (or ``model``) section into ``out_dir/gen0``. Every later generation uses generation 0's
    architecture, the config's ``method``/``train``/``data`` and seed ``seed + k``.
    """
    from ..api import run_config
    from ..assemble import _model_spec_from_run, validate

    if generations < 1:
        raise KdkitError(f"--generations must be >= 1; got {generations}")
    if cfg.out_dir is None:
        raise KdkitError("config: out_dir is required (the parent directory of the generations)")
    if cfg.teachers:
        raise KdkitError("config: born-again starts from one teacher; remove `teachers:`")
    base = Path(cfg.out_dir)
    if cfg.teacher is not None:
        if cfg.teacher.checkpoint is None:
            raise KdkitError("config: teacher.checkpoint is required (generation 0), or omit teacher to train it here")
        validate(cfg.model_copy(update={"student": cfg.student or ModelConfig(name="linear")}), "distill")
        arch = cfg.teacher
        if arch.name is None:
            arch = _model_spec_from_run(Path(arch.checkpoint)).model_copy(update={"checkpoint": arch.checkpoint})
        if cfg.student is not None and cfg.student.name not in (None, arch.name):
            raise KdkitError(f"config: born-again students share the teacher's architecture ({arch.name}); "
                             f"remove student: {cfg.student.name}")
    else:
        arch = cfg.student or cfg.model
        if arch is None:
            raise KdkitError("config: give teacher: {checkpoint: RUN_DIR} (generation 0) or a student/model section")
    create_run_dir(base)
    gen0_metrics = None
    if cfg.teacher is not None:
        previous = arch  # generation 0 as given (name + checkpoint)
    else:
        gen0_cfg = cfg.model_copy(update={"out_dir": str(base / "gen0"),
                                          "model": arch.model_copy(update={"checkpoint": None}),
                                          "student": None, "teacher": None})
        gen0 = run_config(gen0_cfg, "train")
        gen0_metrics = gen0.metrics.get("model")
        previous = ModelConfig(checkpoint=str(base / "gen0"))
    student_spec = arch.model_copy(update={"checkpoint": None})
    runs = []
    for k in range(1, generations + 1):
        cfg_k = cfg.model_copy(update={"out_dir": str(base / f"gen{k}"), "seed": cfg.seed + k, "model": None,
                                       "student": student_spec, "teacher": previous})
        run = run_config(cfg_k, "distill")
        if gen0_metrics is None and k == 1:
            gen0_metrics = run.metrics.get("teacher")
        runs.append(run)
        previous = ModelConfig(checkpoint=str(run.dir))
    from ..assemble import build_data

    splits = build_data(cfg.data, cfg.seed)
    test = splits.test if splits.test is not None else splits.val
    return BornAgainRun(runs, _summarise(gen0_metrics, runs, test, base), base)
