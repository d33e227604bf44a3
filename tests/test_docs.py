"""The docs stay true: their code blocks run, their configs load, their generated parts build.

Every fenced block in ``README.md`` and the pages of ``docs/`` (in the site's order) that a user would run is a
``python``, ``bash`` or ``yaml`` block. A comment line right before a block can say:

- ``<!-- doctest: skip (why) -->``: not run (installs, hours-long benchmarks); counted against the 90 % goal;
- ``<!-- doctest: file NAME -->``: the block is a file the next blocks use: written to NAME, not run;
- ``<!-- doctest: needs MODULE -->``: run only where MODULE is installed (e.g. the MiniLM wheel), or where the
  path ``/...`` exists (Debian's fortunes).

YAML blocks are loaded as configs (a fragment over a minimal config); the slow test runs every page in order in one
fresh folder, as a new user following the docs would (``configs/`` of the clone beside it).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RUN_LANGS = {"python", "bash", "yaml"}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
DIRECTIVE = re.compile(r"<!-- doctest: (skip|file|needs)\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    directive: Optional[str] = None
    arg: str = ""

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> List[Path]:
    """README, then the site's pages in navigation order."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    return [ROOT / "README.md"] + [ROOT / "docs" / next(iter(item.values())) for item in nav]


def blocks(page: Path) -> List[Block]:
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        lang = m.group(1)
        if lang not in RUN_LANGS:
            continue
        before = text[:m.start()].rstrip("\n").split("\n")[-1]
        d = DIRECTIVE.search(before)
        out.append(Block(page.name if page.parent == ROOT else f"docs/{page.name}", text[:m.start()].count("\n") + 1,
                         lang, m.group(2), d.group(1) if d else None, d.group(2) if d else ""))
    return out


def all_blocks() -> List[Block]:
    return [b for p in pages() for b in blocks(p)]


def test_the_docs_exist_in_the_site_order_and_most_of_their_code_runs():
    found = all_blocks()
    assert len(pages()) >= 17 and all(p.is_file() for p in pages())
    skipped = [b for b in found if b.directive == "skip"]
    assert not [b for b in skipped if not b.arg], "a skip says why"
    share = 1 - len(skipped) / len(found)
    assert share >= 0.9, f"{len(skipped)} of {len(found)} code blocks are not run: {', '.join(map(str, skipped))}"


def _merged(fragment: dict) -> dict:
    base = {"out_dir": "runs/doc-check", "data": {"name": "digits"}, "model": {"name": "mlp"}}
    if any(k in fragment for k in ("teacher", "teachers", "student")):
        base.pop("model")
    merged = dict(base)
    for k, v in fragment.items():
        merged[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "data" else v
    return merged


@pytest.mark.parametrize("block", [b for b in all_blocks() if b.lang == "yaml" and b.directive != "skip"], ids=str)
def test_every_yaml_block_is_a_valid_config(block, tmp_path):
    """Every key and value of a config block is checked: misspelt keys, wrong types and unknown names fail."""
    import kdkit

    data = yaml.safe_load(block.code)
    assert isinstance(data, dict), f"{block}: a YAML block is a mapping"
    if "sweep" in data:  # a sweep config's own section, read by kdkit sweep
        from kdkit.recipes.sweep_space import parse_sweep_block

        parse_sweep_block(data.pop("sweep"), str(block))
        if not data:
            return
    cfg = data if block.directive == "file" else _merged(data)
    kdkit.load_config(cfg)


def test_the_generated_references_build():
    sys.path.insert(0, str(ROOT / "docs"))
    import hooks

    config = hooks.config_reference()
    from kdkit.config import TrainConfig

    assert "`labelled_seed`" in config and all(f"`{k}`" in config for k in TrainConfig.model_fields)
    cli = hooks.cli_reference()
    assert "kdkit distill" in cli and "--int8-max-drop" in cli
    page = hooks.render("a\n<!-- generated: registries -->\nb")
    assert "`digits`" in page and "`kd`" in page and page.startswith("a\n")
    assert "text_students.json" in hooks.benchmark_tables() or not (ROOT / "benchmarks/results/text_students.json"
                                                                    ).exists()


# ----------------------------------------------------------------------------- running the pages

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs-run")
    (d / "configs").symlink_to(ROOT / "configs")
    return d


def _env(workdir: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(KDKIT_CACHE_DIR=str(workdir / ".cache"), MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    return env


def _available(what: str) -> bool:
    """A module that imports, or (a path) a file or folder that exists (e.g. Debian's fortunes)."""
    return Path(what).exists() if what.startswith("/") else importlib.util.find_spec(what) is not None


def run_block(block: Block, workdir: Path, timeout: int = 900) -> bool:
    """Run one block in ``workdir``; False when it needs a module that is not installed."""
    if block.directive == "needs" and not all(_available(w) for w in block.arg.split()):
        return False
    if block.directive == "file":
        (workdir / block.arg).write_text(block.code)
        return True
    if block.lang == "yaml":
        return True  # checked by test_every_yaml_block_is_a_valid_config
    script = workdir / f"_doc_block.{'py' if block.lang == 'python' else 'sh'}"
    script.write_text(block.code if block.lang == "python" else "set -eo pipefail\n" + block.code)
    cmd = [sys.executable, str(script)] if block.lang == "python" else ["bash", str(script)]
    out = subprocess.run(cmd, cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{block} failed:\n{block.code}\n--- output ---\n{(out.stdout + out.stderr)[-3000:]}"
    return True


@pytest.mark.slow
@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_each_page_runs_in_order(page, workdir):
    missing = [b for b in blocks(page) if b.directive != "skip" and not run_block(b, workdir)]
    if missing:
        pytest.skip(f"ran the rest; {', '.join(map(str, missing))} need modules not installed here")
