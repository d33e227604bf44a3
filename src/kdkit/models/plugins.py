"""Plugins: the only way a config's model name reaches code outside kdkit.

A config, an override or a run directory's ``config.yaml`` is data written by
anyone; ``kdkit evaluate`` and ``teacher.checkpoint=DIR`` read ones received
from others. If a model name such as ``os:system`` were imported and called,
opening a run directory would run its author's choice of code. So code outside
kdkit runs only when the user names it, visibly, as a *plugin* (the same idea
as Hugging Face's ``trust_remote_code``):

    kdkit --plugin my_models train cfg.yaml         # repeatable; a module name or a path
    KDKIT_PLUGINS=my_models,./extra.py kdkit train cfg.yaml
    kdkit.models.load_plugin("my_models")           # from Python

Importing a plugin may register models (``@kdkit.register_model("mynet")``),
methods or datasets; configs then use those names. An import string
``pkg.mod:factory`` is accepted only when ``pkg.mod`` is a loaded plugin or
lies inside one, and only for callables the plugin itself defines
(:func:`trusted_factory`), so ``os:system`` reached through a plugin's
namespace is still refused.
"""

from __future__ import annotations

import importlib
import importlib.util
import keyword
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, List, Optional

from ..errors import KdkitError

ENV_VAR = "KDKIT_PLUGINS"

_PLUGINS: Dict[str, ModuleType] = {}  # module name -> module, in load order
_BY_PATH: Dict[str, str] = {}  # resolved file of a plugin given as a path -> its module name
_ENV_SEEN: Optional[str] = None  # the KDKIT_PLUGINS value already loaded

# How kdkit.api records an nn.Module handed to kdkit.train/distill in config.yaml ("python:Net"; api.PYTHON).
_API_OBJECT = "python"

_HOW = ("--plugin {0} on the command line, KDKIT_PLUGINS={0} in the environment, "
        "or kdkit.models.load_plugin({0!r}) in Python")


def _is_dotted_name(text: str) -> bool:
    return bool(text) and all(p.isidentifier() and not keyword.iskeyword(p) for p in text.split("."))


def _is_path(text: str) -> bool:
    return text.endswith(".py") or "/" in text or os.sep in text


def _first_line(e: BaseException) -> str:
    """``Type: message`` on one line (a plugin's exception may span many)."""
    text = str(e).strip().splitlines()
    where = ""
    if isinstance(e, SyntaxError) and e.filename:
        where = f" ({e.filename}, line {e.lineno})"
    return f"{type(e).__name__}: {text[0] if text else ''}{where}"


def _base_exception(what: str, e: BaseException) -> KdkitError:
    """The one-line error for a plugin that ends the import with a non-``Exception`` (``sys.exit()``, ``Ctrl-C``,
    a ``BaseException`` of its own): never kdkit's exit code or a silent stop."""
    if isinstance(e, SystemExit):
        return KdkitError(f"plugin {what!r} called sys.exit({e.code!r}) while importing; a plugin should define and "
                          f"register models, not end the program")
    if isinstance(e, KeyboardInterrupt):
        return KdkitError(f"plugin {what!r} was interrupted while importing")
    return KdkitError(f"plugin {what!r} failed while importing: {_first_line(e)}")


def _import_name(name: str) -> ModuleType:
    """Import ``name`` with the current directory on ``sys.path`` (so ``PYTHONPATH=.`` is not needed)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:  # only for this import: later imports must not pick up stray files from the directory
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise KdkitError(f"plugin {name!r} not found (looked in the current directory {cwd} and on sys.path); "
                             f"give a module name or a path such as ./my_models.py") from None
        raise KdkitError(f"plugin {name!r} failed while importing: {_first_line(e)}") from None
    except KdkitError as e:
        raise KdkitError(f"plugin {name!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any failure of the user's module is reported on one line
        raise KdkitError(f"plugin {name!r} failed while importing: {_first_line(e)}") from None
    except BaseException as e:  # noqa: BLE001 - sys.exit() and the like inside the user's module, also one line
        raise _base_exception(name, e) from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import_path(text: str) -> ModuleType:
    """Import a plugin file ``m.py`` (or a package directory) as module ``m``."""
    path = Path(text).expanduser()
    if path.is_dir():
        init = path / "__init__.py"
        if not init.is_file():
            raise KdkitError(f"plugin {text!r} is a directory without __init__.py; give a .py file or a package")
        file, search = init, [str(path.resolve())]
    elif path.is_file():
        if path.suffix != ".py":
            raise KdkitError(f"plugin {text!r} is not a .py file")
        file, search = path, None
    else:
        raise KdkitError(f"plugin file {text!r} not found (from the current directory {os.getcwd()})")
    file = file.resolve()
    name = (path.resolve().name if search else path.stem)
    if not _is_dotted_name(name) or "." in name:
        raise KdkitError(f"plugin {text!r}: {name!r} is not a valid module name (use letters, digits and _)")
    key = str(file)
    if key in _BY_PATH:
        return _PLUGINS[_BY_PATH[key]]
    loaded = sys.modules.get(name)
    if loaded is not None:
        if getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == file:
            _BY_PATH[key] = name  # the same file imported earlier by name (--plugin m, then ./m.py)
            return loaded
        raise KdkitError(f"plugin {text!r}: a different module named {name!r} is already imported "
                         f"({getattr(loaded, '__file__', None) or 'built in'}); rename the file")
    spec = importlib.util.spec_from_file_location(name, file, submodule_search_locations=search)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has a loader
        raise KdkitError(f"plugin {text!r} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered first, as `import` does, so the plugin can import itself
    try:
        spec.loader.exec_module(module)
    except KdkitError as e:
        del sys.modules[name]
        raise KdkitError(f"plugin {text!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any failure of the user's module is reported on one line
        del sys.modules[name]
        raise KdkitError(f"plugin {text!r} failed while importing: {_first_line(e)}") from None
    except BaseException as e:  # noqa: BLE001 - sys.exit() and the like inside the user's module, also one line
        sys.modules.pop(name, None)
        raise _base_exception(text, e) from None
    _BY_PATH[key] = name
    return module


def load_plugin(name: str) -> ModuleType:
    """Import a plugin the user chose and trust its factories; idempotent.

    Args:
        name: a module name (``my_models``, ``pkg.models``; found in the current directory or on
            ``sys.path``) or a path to a ``.py`` file or package directory (``./my_models.py``).

    Returns:
        The imported module. Models it registers are usable by name in configs; its callables
        are usable as ``module:factory``.

    Raises:
        KdkitError: the module is missing or fails while importing (one line).
    """
    text = str(name).strip()
    if not text:
        raise KdkitError("plugin name is empty; give a module name (my_models) or a path (./my_models.py)")
    if _is_path(text):
        module = _import_path(text)
    elif _is_dotted_name(text):
        module = _import_name(text)
    else:
        raise KdkitError(f"plugin {text!r} is neither a module name (my_models, pkg.models) "
                         f"nor a path (./my_models.py)")
    _PLUGINS.setdefault(module.__name__, module)
    return module


def load_env_plugins() -> List[ModuleType]:
    """Load the plugins named in ``KDKIT_PLUGINS`` (comma-separated); re-reads only when the value changed."""
    global _ENV_SEEN
    value = os.environ.get(ENV_VAR, "")
    if value == _ENV_SEEN:
        return []
    modules = [load_plugin(v) for v in value.split(",") if v.strip()]
    _ENV_SEEN = value  # after success: a failed load is reported again next time, not silently skipped
    return modules


def loaded_plugins() -> List[str]:
    """Module names of the plugins loaded so far, in load order."""
    return list(_PLUGINS)


def _owner(module: str) -> Optional[str]:
    """The loaded plugin that ``module`` is, or lies inside (``pkg`` owns ``pkg.models``)."""
    for plugin in _PLUGINS:
        if module == plugin or module.startswith(plugin + "."):
            return plugin
    return None


def trusted_factory(name: str) -> Callable:
    """The callable an import string ``pkg.mod:factory`` (or ``./m.py:factory``) names, if a plugin allows it.

    Nothing is imported unless ``pkg.mod`` is a loaded plugin or inside one, and the callable must
    be defined by that plugin (its ``__module__``), not merely reachable through it.

    Raises:
        KdkitError: the string is malformed, its module is not a loaded plugin, or the attribute is
            missing, not callable, or defined elsewhere.
    """
    load_env_plugins()
    module, _, attr = name.rpartition(":")
    if not attr.isidentifier() or keyword.iskeyword(attr):
        raise KdkitError(f"model {name!r}: {attr!r} is not a Python name; "
                         f"expected a registered model or module:factory")
    if _is_path(module):
        key = str(Path(module).expanduser().resolve())
        if key not in _BY_PATH:
            raise KdkitError(f"model {name!r} names code in {module}, which is not a loaded plugin: configs and run "
                             f"directories never run code by themselves; if you trust the file, pass "
                             + _HOW.format(module))
        module = _BY_PATH[key]
    elif not _is_dotted_name(module):
        raise KdkitError(f"model {name!r}: {module!r} is not a module name; "
                         f"expected a registered model or module:factory")
    plugin = _owner(module)
    if plugin is None and module == _API_OBJECT:
        raise KdkitError(f"model {name!r} stands for a model object given to the Python API: its architecture cannot "
                         f"be rebuilt from a config; build it in Python, or name a registered model")
    if plugin is None:
        raise KdkitError(f"model {name!r} is an import string but {module!r} is not a loaded plugin: configs and run "
                         f"directories never run code by themselves; if you trust it, pass " + _HOW.format(module))
    mod = _PLUGINS[plugin] if module == plugin else _import_name(module)
    obj = getattr(mod, attr, None)
    if obj is None:
        raise KdkitError(f"model {name!r}: plugin module {module!r} has no attribute {attr!r}")
    defined_in = getattr(obj, "__module__", None) or ""
    if not callable(obj):
        raise KdkitError(f"model {name!r}: {module}.{attr} is a {type(obj).__name__}, not a callable model factory")
    if not (defined_in == plugin or defined_in.startswith(plugin + ".")):
        raise KdkitError(f"model {name!r}: {attr!r} is defined in {defined_in or 'an unknown module'!r}, not by plugin "
                         f"{plugin!r}; only factories a plugin defines itself can be named")
    return obj
