"""MkDocs hooks: the pages' generated parts, rebuilt from the code and the results at every build.

A page holds a marker line and the hook puts the generated Markdown in its place:

- ``<!-- generated: config-reference -->``: every config section and key, from kdkit's pydantic models;
- ``<!-- generated: cli-reference -->``: every command and option, from kdkit's argument parser;
- ``<!-- generated: registries -->``: the registered models, methods and datasets;
- ``<!-- generated: benchmark-tables -->``: the headline figures of every ``benchmarks/results/*.json``.

So none of them can drift from what kdkit does or what the benchmarks measured. The same functions are
imported by the tests (``tests/test_docs.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def _cell(value: Any) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    for junk in ("<class '", "'>"):
        text = text.replace(junk, "")
    return text


def config_reference() -> str:
    """One table per config section: key, type, default, meaning."""
    from pydantic import BaseModel

    from kdkit import config as c

    sections: List[Tuple[str, Any]] = [("(top level)", c.RunConfig), ("data", c.DataConfig),
                                       ("model / student / teacher", c.ModelConfig), ("method", c.MethodConfig),
                                       ("train", c.TrainConfig), ("ensemble", c.EnsembleConfig),
                                       ("tracking", c.TrackingConfig)]
    out = []
    for title, model in sections:
        out += [f"### `{title}`", "", (model.__doc__ or "").strip().splitlines()[0], "",
                "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                continue  # a nested section: its own table
            default = "(list)" if field.default_factory is not None else repr(field.default)
            out.append(f"| `{name}` | `{_cell(_type_name(ann))}` | `{_cell(default)}` | "
                       f"{_cell(field.description or '')} |")
        if getattr(model, "model_config", {}).get("extra") == "allow":
            out += ["", "Other keys are the named thing's own options (see the registries below)."]
        out.append("")
    out += ["### `compress` steps", "", "| step | options |", "|---|---|"]
    for step, cls in c.COMPRESS_STEPS.items():
        keys = ", ".join(f"`{k}`" for k in cls.model_fields if k != "step")
        out.append(f"| `{step}` | {keys} |")
    return "\n".join(out) + "\n"


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[Tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def cli_reference() -> str:
    """Each command's ``--help``, as the parser prints it."""
    from kdkit.cli import _parser

    parser = _parser()
    out = ["### `kdkit`", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in _subparsers(parser):
        out += [f"### `kdkit {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def registries() -> str:
    import kdkit
    from kdkit.methods import METHODS

    rows = [("models", kdkit.list_models()), ("methods", sorted(METHODS.names())),
            ("datasets", sorted(kdkit.DATASETS.names()))]
    return "\n".join(f"- **{k}**: " + ", ".join(f"`{n}`" for n in names) for k, names in rows) + "\n"


def _leaves(obj: Any, prefix: str = "", depth: int = 0) -> Iterator[Tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)
    elif isinstance(obj, (int, float, bool, str)) and not (isinstance(obj, str) and len(obj) > 80):
        yield prefix, obj


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    if math.isnan(v):
        return "nan"
    return f"{v:.4g}"


#: Top-level keys whose leaves are the headline figures of a results file, in order of preference.
HEADLINE_KEYS = ("verdict", "ratios", "ratios_kdkit_over_textbrewer", "medians", "summary", "comparisons", "table",
                 "results")


def benchmark_tables(limit: int = 40) -> str:
    """For each results file: what it holds at the top, and the leaves of its first headline section."""
    out = []
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        data = json.loads(path.read_text())
        key = next((k for k in HEADLINE_KEYS if k in data), None)
        out += [f"### `{path.name}`", ""]
        script = path.stem.split("_run")[0]
        if (ROOT / "benchmarks" / f"{script}.py").exists():
            out += [f"Written by `benchmarks/{script}.py`.", ""]
        if key is None:
            out += ["(no headline section)", ""]
            continue
        rows = [(k, v) for k, v in _leaves(data[key]) if not k.split(".")[-1].isdigit()]
        out += [f"`{key}` ({len(rows)} values{', the first ' + str(limit) if len(rows) > limit else ''}):", "",
                "| figure | value |", "|---|---:|"]
        out += [f"| `{_cell(k)}` | {_cell(_fmt(v))} |" for k, v in rows[:limit]]
        out.append("")
    return "\n".join(out)


GENERATORS = {"config-reference": config_reference, "cli-reference": cli_reference, "registries": registries,
              "benchmark-tables": benchmark_tables}


def render(markdown: str) -> str:
    """The page with each ``<!-- generated: NAME -->`` line replaced by its generated Markdown."""
    lines = []
    for line in markdown.split("\n"):
        name = line.strip()[len("<!-- generated: "):-len(" -->")] if line.strip().startswith(
            "<!-- generated: ") else None
        lines.append(GENERATORS[name]() if name is not None else line)
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Dict[str, Any], files: Any) -> str:  # MkDocs hook
    return render(markdown)


#: Plots the benchmarks write into ``benchmarks/results/``, published under ``assets/`` (never copied by hand).
PLOTS = ("text_students.png",)


def on_files(files: Any, config: Dict[str, Any]) -> Any:  # MkDocs hook
    from mkdocs.structure.files import File

    for name in PLOTS:
        path = ROOT / "benchmarks" / "results" / name
        if path.exists():
            files.append(File.generated(config, f"assets/{name}", abs_src_path=str(path)))
    return files
