"""kdkit: distil a large teacher into a small, fast student, measure it, ship it.

Public API (everything a user needs; the rest is importable from submodules):

- :func:`distill`, :func:`train`, :func:`evaluate` — train and measure models.
- :func:`load_config`, :func:`run_config` — config-driven runs (what the CLI calls).
- :func:`create_model`, :func:`list_models`, :func:`register_model` — the model zoo.
- :data:`METHODS`, :func:`register_method`, :class:`Method` — distillation methods.
- :class:`Teacher` — the frozen teacher wrapper.
- :func:`sweep` — search a run's settings with Optuna (``kdkit sweep``).
- :class:`KdkitError` — every expected error.
- :mod:`kdkit.hf` — Hugging Face text classifiers: ``kdkit.hf.load``, ``kdkit.hf.shrink``, ``kdkit.hf.tokenize``.
"""

from . import hf  # noqa: I001  (light: transformers is imported only when a text feature is used)
from . import lm  # noqa: F401,I001  (registers the language-model datasets and the causal_lm model)
from .api import Run, distill, evaluate_run, run_config, train
from .config import RunConfig, load_config
from .data import DATASETS, ArrayData
from .errors import KdkitError
from .tasks import evaluate
from .methods import METHODS, Method, list_methods, register_method
from .models import create_model, list_models, register_model
from .recipes.sweep import sweep
from .teacher import Teacher
from .version import __version__

__all__ = ["ArrayData", "DATASETS", "KdkitError", "METHODS", "Method", "Run", "RunConfig", "Teacher", "create_model",
           "distill", "evaluate", "evaluate_run", "hf", "list_methods", "list_models", "load_config", "register_method",
           "register_model", "run_config", "sweep", "train", "__version__"]
