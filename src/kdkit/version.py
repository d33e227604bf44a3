"""kdkit's version (the same as pyproject.toml's: tests/test_cli_help.py checks it)."""

__version__ = "0.1.0"
