"""The run directory: one folder per run, never overwritten silently.

    <out_dir>/
      config.yaml        the resolved config
      metrics.jsonl      one JSON line per epoch
      checkpoints/       best.safetensors (kept weights), last.safetensors, state.safetensors (resume point)
      report.json        final numbers
      report.html        comparison table and training curves
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import KdkitError

PROBE = ".kdkit-write-test"


def create_run_dir(path, resume: bool = False) -> Path:
    """Make ``path`` for a new run, or check it for a resumed one.

    Raises:
        KdkitError: a new run whose directory exists and is not empty, a resume whose directory is not a run
            directory, or a path that cannot be created (under a regular file, no permission).
    """
    p = Path(path)
    if resume:
        if not (p / "config.yaml").is_file():
            raise KdkitError(f"cannot resume: {p} is not a kdkit run directory (no config.yaml)")
        return p
    # What a kill during creation can leave (the probe, a config.yaml not yet renamed) does not make a run.
    leftovers = {PROBE, "config.yaml.tmp"}
    if p.exists() and (not p.is_dir() or any(f.name not in leftovers for f in p.iterdir())):
        raise KdkitError(f"run directory {p} already exists and is not empty; choose another out_dir "
                         f"(e.g. out_dir={p}-2) or continue it with --resume {p} (Python: resume=True)")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / PROBE
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise KdkitError(f"cannot create run directory {p}: {e.strerror or e} "
                         f"(expected a writable folder path)") from None
    return p


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_metrics(run_dir) -> List[Dict[str, Any]]:
    """The epoch records of ``run_dir/metrics.jsonl`` ([] when there is none).

    A last line without its newline is one being written (or cut by a kill) and is left out; any other line that is
    not a JSON object is damage, named with its line.

    Raises:
        KdkitError: a line that is not JSON or not an object, or a file that is not UTF-8 text.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    text = _text(path)
    lines = text.split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # the half-written last line of a run in progress or killed
                break
            raise KdkitError(f"{path} line {n} is damaged (not JSON); expected one JSON object per epoch") from None
        if not isinstance(record, dict):
            raise KdkitError(f"{path} line {n} holds a JSON {type(record).__name__}, not an epoch record (a JSON "
                             f"object); is this a kdkit run directory?")
        records.append(record)
    return records


def write_json(path, data: Dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path) -> Optional[Dict[str, Any]]:
    """A JSON object kdkit wrote (``report.json``, ``compressed.json``, ...), or None when the file is missing.

    Raises:
        KdkitError: the file is not UTF-8, not JSON, or JSON of another shape (not an object); named with its path.
    """
    p = Path(path)
    if not p.is_file():
        return None
    try:
        data = json.loads(_text(p))
    except json.JSONDecodeError as e:
        raise KdkitError(f"{p} is damaged (not JSON: {e.msg} at line {e.lineno}); expected the file as kdkit wrote "
                         f"it (rerun the command that writes it)") from None
    if not isinstance(data, dict):
        raise KdkitError(f"{p} holds a JSON {type(data).__name__}, not the object kdkit writes there; is this a kdkit "
                         f"run directory?")
    return data


def _text(p: Path) -> str:
    """A run-directory file as UTF-8 text, or one error naming it."""
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KdkitError(f"{p} is not UTF-8 text (byte {e.start}); expected the file as kdkit wrote it") from None
