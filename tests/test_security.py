"""Configs and run directories never run code the user did not choose (issue 8, item 13).

Before plugins, any ``package.module:function`` model name was imported and called with the
section's other keys: ``os:system`` ran a shell command and ``shutil:rmtree`` deleted a directory,
from a config or from a received run directory's ``config.yaml``. Now only plugins the user names
(``--plugin``, ``KDKIT_PLUGINS``, ``kdkit.models.load_plugin``) turn names into code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import kdkit
from kdkit.models import MODELS, create_model, load_plugin, resolve_factory
from kdkit.models import plugins as plugins_mod

from .conftest import tiny_config

PLUGIN_SOURCE = '''
import math

from torch import nn
import kdkit
from os import system  # reachable through the plugin, but not the plugin's own code


@kdkit.register_model("{name}")
def make(num_classes, input_shape, hidden=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))
'''


@pytest.fixture(autouse=True)
def _isolated_plugins(monkeypatch):
    """Each test starts with no plugins and leaves the model registry as it found it."""
    monkeypatch.setattr(plugins_mod, "_PLUGINS", {})
    monkeypatch.setattr(plugins_mod, "_BY_PATH", {})
    monkeypatch.setattr(plugins_mod, "_ENV_SEEN", None)
    monkeypatch.delenv("KDKIT_PLUGINS", raising=False)
    models = dict(MODELS._items)
    modules = set(sys.modules)
    yield
    MODELS._items.clear()
    MODELS._items.update(models)
    for name in set(sys.modules) - modules:  # plugins imported here must not leak into other tests
        if name.startswith("kdsec_"):
            del sys.modules[name]


def _write_plugin(directory: Path, module: str, model_name: str) -> Path:
    path = directory / f"{module}.py"
    path.write_text(PLUGIN_SOURCE.format(name=model_name))
    return path


def _config_file(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(args, cwd: Path, env_extra=None):
    """``python -m kdkit ARGS`` in ``cwd``, with no PYTHONPATH (the user's shell, not the test's)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KDKIT_PLUGINS")}
    env.update({"OMP_NUM_THREADS": "1", **(env_extra or {})})
    return subprocess.run([sys.executable, "-m", "kdkit", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def _one_error_line(stderr: str, *needles: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- attacks: nothing runs, nothing is deleted, one clear error --------------------------------------


def test_config_naming_os_system_runs_nothing(tmp_path):
    marker = tmp_path / "MARKER"
    cfg = tiny_config(tmp_path / "run", model={"name": "os:system", "command": f"touch {marker}"})
    with pytest.raises(kdkit.KdkitError, match="not a loaded plugin.*--plugin os"):
        kdkit.run_config(kdkit.load_config(cfg), "train")
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_config_naming_shutil_rmtree_deletes_nothing(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    cfg = tiny_config(tmp_path / "run", model={"name": "shutil:rmtree", "path": str(victim)})
    with pytest.raises(kdkit.KdkitError, match="not a loaded plugin"):
        kdkit.run_config(kdkit.load_config(cfg), "train")
    assert (victim / "keep.txt").read_text() == "precious"


def test_import_string_imports_nothing(tmp_path, monkeypatch):
    # Importing alone is running code: a module with side effects at import must not be imported.
    marker = tmp_path / "IMPORTED"
    (tmp_path / "kdsec_sidefx.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef net(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(kdkit.KdkitError, match="kdsec_sidefx.*not a loaded plugin"):
        resolve_factory("kdsec_sidefx:net")
    assert not marker.exists()
    assert "kdsec_sidefx" not in sys.modules


@pytest.mark.parametrize("name", ["os;x:system", "__import__('os'):system", "os:system()", "os: system", ":f",
                                  "a..b:f"])
def test_malformed_import_strings_are_refused(name):
    with pytest.raises(kdkit.KdkitError, match="not a (module|Python) name"):
        resolve_factory(name)


def test_teacher_checkpoint_run_dir_with_os_system_runs_nothing(tmp_path):
    marker = tmp_path / "MARKER"
    received = tmp_path / "received"
    received.mkdir()
    _config_file(received / "config.yaml", {"model": {"name": "os:system", "command": f"touch {marker}"}})
    cfg = tiny_config(tmp_path / "run", student={"name": "mlp"}, teacher={"checkpoint": str(received)})
    with pytest.raises(kdkit.KdkitError, match="not a loaded plugin"):
        kdkit.run_config(kdkit.load_config(cfg), "distill")
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_export_of_a_run_dir_with_os_system_runs_nothing(tmp_path):
    from kdkit.cli import run

    marker = tmp_path / "MARKER"
    received = tmp_path / "received"
    received.mkdir()
    _config_file(received / "config.yaml", {"model": {"name": "os:system", "command": f"touch {marker}"}})
    with pytest.raises(kdkit.KdkitError, match="not a loaded plugin"):
        run(["export", str(received), "--format", "torchscript"])
    assert not marker.exists()


def test_cli_evaluate_of_a_run_dir_with_os_system_runs_nothing(tmp_path):
    marker = tmp_path / "MARKER"
    received = tmp_path / "received"
    received.mkdir()
    (received / "config.yaml").write_text(f'model: {{name: "os:system", command: "touch {marker}"}}\n')
    result = _cli(["evaluate", "received"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    _one_error_line(result.stderr, "'os:system'", "not a loaded plugin", "--plugin os")
    assert not marker.exists()


def test_api_object_names_say_what_they_are():
    # config.yaml of a run trained from Python objects says "python:Net": no plugin could rebuild it.
    with pytest.raises(kdkit.KdkitError, match="model object given to the Python API"):
        resolve_factory("python:Sequential")


def test_plugin_cannot_lend_out_code_it_did_not_define(tmp_path):
    plugin = _write_plugin(tmp_path, "kdsec_lender", "kdsec_lender_net")
    load_plugin(str(plugin))
    with pytest.raises(kdkit.KdkitError, match="defined in 'posix'|defined in 'nt'"):
        resolve_factory("kdsec_lender:system")
    assert resolve_factory("kdsec_lender:make").__name__ == "make"  # its own factory is fine


# --- users' own models stay easy -----------------------------------------------------------------------


def test_load_plugin_uses_the_current_directory_without_pythonpath(tmp_path, monkeypatch):
    _write_plugin(tmp_path, "kdsec_cwd", "kdsec_cwd_net")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    load_plugin("kdsec_cwd")
    model = create_model("kdsec_cwd_net", num_classes=3, input_shape=(5,), hidden=4)
    assert model[-1].out_features == 3 and model[1].out_features == 4
    assert create_model("kdsec_cwd:make", num_classes=2, input_shape=(5,))[-1].out_features == 2
    assert str(tmp_path) not in sys.path  # the directory was on the path only for the import


def test_plugin_failures_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kdsec_broken.py").write_text("x = 1 / 0\n")
    (tmp_path / "kdsec_syntax.py").write_text("def f(:\n")
    with pytest.raises(kdkit.KdkitError, match="'kdsec_missing' not found") as e:
        load_plugin("kdsec_missing")
    with pytest.raises(kdkit.KdkitError, match="ZeroDivisionError: division by zero"):
        load_plugin("./kdsec_broken.py")
    with pytest.raises(kdkit.KdkitError, match="SyntaxError.*line 1"):
        load_plugin("kdsec_syntax")
    with pytest.raises(kdkit.KdkitError, match="not found"):
        load_plugin("./kdsec_nowhere.py")
    assert "\n" not in str(e.value)


def test_path_import_string_needs_the_file_loaded_as_a_plugin(tmp_path, monkeypatch):
    # `./m.py:factory` was a raw traceback; now it names the fix, and works once the file is a plugin.
    monkeypatch.chdir(tmp_path)
    _write_plugin(tmp_path, "kdsec_path", "kdsec_path_net")
    with pytest.raises(kdkit.KdkitError, match=r"--plugin \./kdsec_path\.py"):
        resolve_factory("./kdsec_path.py:make")
    load_plugin("./kdsec_path.py")
    assert create_model("./kdsec_path.py:make", num_classes=4, input_shape=(6,))[-1].out_features == 4


def test_cli_plugin_option_trains_a_registered_model(tmp_path):
    _write_plugin(tmp_path, "my_models", "mynet")
    cfg = tiny_config("run", model={"name": "mynet", "hidden": 8},
                      data={"name": "digits", "batch_size": 64, "train_subset": 64},
                      train={"epochs": 1, "lr": 0.01, "progress": False})
    _config_file(tmp_path / "cfg.yaml", cfg)
    result = _cli(["train", "cfg.yaml"], cwd=tmp_path)  # without the plugin: refused
    assert result.returncode == 2
    _one_error_line(result.stderr, "'mynet'")
    result = _cli(["--plugin", "my_models", "train", "cfg.yaml"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "checkpoints" / "best.safetensors").is_file()


def test_cli_plugins_from_environment_and_from_a_path(tmp_path):
    _write_plugin(tmp_path, "env_models", "envnet")
    _write_plugin(tmp_path, "file_models", "filenet")
    result = _cli(["ls"], cwd=tmp_path, env_extra={"KDKIT_PLUGINS": "env_models"})
    assert result.returncode == 0, result.stderr
    assert "envnet" in result.stdout and "filenet" not in result.stdout
    result = _cli(["--plugin", "./file_models.py", "inspect", "./file_models.py:make", "--input-shape", "6"],
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Linear" in result.stdout or "(B, 8)" in result.stdout


def test_cli_plugin_option_also_after_the_command(tmp_path, monkeypatch, capsys):
    from kdkit.cli import run

    monkeypatch.chdir(tmp_path)
    _write_plugin(tmp_path, "kdsec_after", "kdsec_after_net")
    assert run(["inspect", "kdsec_after:make", "--input-shape", "6", "--plugin", "./kdsec_after.py"]) == 0
    assert "kdsec_after:make on inputs (B, 6)" in capsys.readouterr().out
