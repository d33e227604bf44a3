"""The `kdkit` command describes itself: plain `kdkit`, `--version`, every subcommand's `--help` (a one-line
description and an example that parses), and the docs' command synopsis (complete, and every line parses)."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import pytest

import kdkit
from kdkit.cli import COMMANDS, _parser, main

ROOT = Path(__file__).resolve().parents[1]


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _subcommands():
    parser = _parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def _example_argv(line):
    """`kdkit train cfg.yaml x=1   # comment` -> ["train", "cfg.yaml", "x=1"]."""
    words = shlex.split(line, comments=True)
    assert words[0] == "kdkit", line
    return words[1:]


def test_plain_kdkit_prints_help_and_exits_0(capsys):
    code, out, _ = _run([], capsys)
    assert code == 0 and out.startswith("usage: kdkit")
    for name in _subcommands()[1]:
        assert re.search(rf"^\s+{re.escape(name)}\s", out, re.M), name


def test_version_matches_the_package_metadata(capsys):
    if sys.version_info >= (3, 11):
        import tomllib

        declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    else:  # pragma: no cover
        declared = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    code, out, _ = _run(["--version"], capsys)
    assert code == 0 and out.strip() == f"kdkit {declared}" == f"kdkit {kdkit.__version__}"


def test_every_command_is_dispatched():
    assert set(_subcommands()[1]) == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(_subcommands()[1]))
def test_every_subcommand_has_a_description_and_an_example(name, capsys):
    parser, choices = _subcommands()
    sub = choices[name]
    assert sub.description and "\n" not in sub.description.strip(), name
    assert sub.epilog and sub.epilog.startswith("example:"), name
    examples = [line.strip() for line in sub.epilog.splitlines()[1:] if line.strip()]
    assert examples, name
    for line in examples:  # each example is a real invocation of this command
        args = parser.parse_args(_example_argv(line))
        assert args.command == name, line
    code, out, _ = _run([name, "--help"], capsys)
    assert code == 0 and sub.description.strip() in out and examples[0] in out


def _readme_command_lines():
    """The synopsis of the docs' command-line page."""
    text = (ROOT / "docs" / "cli.md").read_text()
    section = text[text.index("## Synopsis"):]
    block = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("kdkit")]


def test_readme_command_list_is_complete_and_parses():
    parser, choices = _subcommands()
    listed = set()
    for line in _readme_command_lines():
        # optional parts in brackets are left out; placeholders (CONFIG, N) parse as any other word
        argv = [w for w in _example_argv(line) if not (w.startswith("[") or w.endswith("]"))]
        if argv == ["--version"]:
            continue
        args = parser.parse_args(argv)
        listed.add(args.command)
    assert listed == set(choices), f"README lists {sorted(listed)}, kdkit has {sorted(choices)}"
