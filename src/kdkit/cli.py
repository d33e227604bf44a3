"""The ``kdkit`` command: a thin layer over the Python API.

    kdkit demo                                  # the main job on embedded digits
    kdkit train CONFIG [key.path=value ...]     # supervised training (teachers, baselines)
    kdkit distill CONFIG [key.path=value ...]   # distillation
    kdkit evaluate RUN_DIR [--split test|val]
    kdkit cache CONFIG [key.path=value ...]     # precompute the teacher's outputs for distill
    torchrun --nproc_per_node N -m kdkit distill CONFIG   # data-parallel (DDP)
    kdkit ls                                    # registered models, methods, datasets
    kdkit compress CONFIG [key.path=value ...]  # prune / low-rank / quantise with recovery distillation: the ladder
    kdkit export RUN_DIR --format onnx|torchscript [--int8]   # export with a parity check on real inputs
    kdkit inspect MODEL [--input-shape 1,28,28 | --dataset digits]   # module names + output shapes
    kdkit born-again CONFIG --generations N     # born-again networks, one run directory per generation
    kdkit compare RUN_DIR RUN_DIR ... [--out compare.html] [--force]   # runs side by side: table + HTML page
    kdkit --plugin my_models train CONFIG       # your own models: import a plugin first (or KDKIT_PLUGINS)

Global options (before or after the command): ``--quiet`` (no per-epoch lines: results and errors only),
``--no-progress`` (epoch lines, no progress bar), ``--threads N`` (torch's CPU threads, ``train.threads``),
``--version``. Plain ``kdkit`` prints this help and exits with status 0.

Expected failures print ``error: <one line>`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

from .errors import KdkitError
from .version import __version__

#: Commands that read a config and take ``key.path=value`` overrides (the global options become overrides).
CONFIG_COMMANDS = ("train", "distill", "cache", "compress", "born-again", "sweep")
#: What the running command is working on, for the message after Ctrl-C (set by :func:`run`).
_RUNNING: Dict[str, Optional[str]] = {}


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r:.80}")
    return n


def _global_options(parser: argparse.ArgumentParser, in_command: bool) -> None:
    """``--quiet``, ``--no-progress``, ``--threads``: accepted before the command and after it.

    In a command's own parser the defaults are suppressed, so that an option given before the command is not
    reset by the command's parser (argparse's sub-parsers otherwise write their defaults over it).
    """
    g = parser.add_argument_group("output and threads")
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS if in_command else False,
                   help="no per-epoch lines or bars: only results, warnings and errors")
    g.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS if in_command else False,
                   help="one line per epoch, no progress bar (there is never a bar when stderr is not a terminal)")
    g.add_argument("--threads", type=_threads, metavar="N", default=argparse.SUPPRESS if in_command else None,
                   help="torch CPU threads (overrides train.threads; default auto, see the README)")


def _command(sub, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` starts with a one-line description and ends with an example."""
    return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                          epilog="example:\n  " + example.replace("\n", "\n  "),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdkit", description="Knowledge distillation: teacher -> small student, measured.",
                                epilog="`kdkit COMMAND --help` describes a command, with an example.")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import your own code first (a module name or ./file.py; repeatable): the models it "
                        "registers and its module:factory names become usable in configs (nothing else is imported)")
    p.add_argument("--version", action="version", version=f"kdkit {__version__}")
    _global_options(p, in_command=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    _run_commands(sub)
    _other_commands(sub)
    for command_parser in sub.choices.values():
        _global_options(command_parser, in_command=True)
        # --plugin after the command too; a separate dest, because a command's parser starts an empty list
        command_parser.add_argument("--plugin", action="append", dest="plugin_after", default=argparse.SUPPRESS,
                                    metavar="MODULE", help="import your own code first (see kdkit --help)")
    return p


def _run_commands(sub) -> None:
    """The commands that train, cache, evaluate or compress: demo, train, distill, cache, evaluate, ls, compress."""
    d = _command(sub, "demo", "teacher, scratch student and distilled student on embedded digits",
                 "kdkit demo --epochs 10 --out runs/demo")
    d.add_argument("--out", default=None, help="run directory (default: runs/demo, or runs/demo-N if taken)")
    d.add_argument("--epochs", type=int, default=30)
    d.add_argument("--seed", type=int, default=0)

    for name, text, example in (
            ("train", "train a model on labels (teachers, baselines)",
             "kdkit train configs/digits_teacher.yaml train.epochs=5\nkdkit train --resume runs/digits-teacher"),
            ("distill", "distil a teacher into a student",
             "kdkit distill configs/digits_kd.yaml method.temperature=2 out_dir=runs/kd-t2\n"
             "kdkit distill configs/digits_kd.yaml tracking=mlflow   # also log to MLflow")):
        c = _command(sub, name, text, example)
        c.add_argument("config", nargs="?", help="YAML config (omit with --resume)")
        c.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.temperature=2 train.epochs=3")
        c.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")

    k = _command(sub, "cache", "precompute a distillation config's teacher outputs (resumable)",
                 "kdkit cache configs/fashion_mnist_kd.yaml train.cache_dtype=float16")
    k.add_argument("config", help="the distillation YAML config")
    k.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.cache_dtype=float16")

    e = _command(sub, "evaluate", "re-evaluate a run directory's kept checkpoint on the test or validation split",
                 "kdkit evaluate runs/digits-kd --split val --json")
    e.add_argument("run_dir")
    e.add_argument("--split", default="test", choices=["test", "val"])
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")

    _command(sub, "ls", "list registered models, methods and datasets", "kdkit ls")

    cp = _command(sub, "compress", "chain compression steps with recovery distillation; write the ladder report",
                  "kdkit compress configs/digits_compress.yaml out_dir=runs/c2")
    cp.add_argument("config", help="YAML config with teacher, compress steps (and optionally student, method, train)")
    cp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=0.001 out_dir=runs/c2")


def _other_commands(sub) -> None:
    """The commands that export, inspect or run a recipe: export, inspect, born-again, compare, sweep."""
    ex = _command(sub, "export", "export a run's model to ONNX or TorchScript and check it against PyTorch",
                  "kdkit export runs/digits-kd --format onnx --int8")
    ex.add_argument("run_dir")
    ex.add_argument("--format", default="onnx", help="onnx or torchscript")
    ex.add_argument("--int8", action="store_true", help="ONNX only: int8 quantisation with onnxruntime (static and "
                    "calibrated for arrays; dynamic for text models and language models)")
    ex.add_argument("--int8-max-drop", type=float, default=1.0, metavar="POINTS",
                    help="text classifiers: refuse an int8 file whose test accuracy is more than POINTS below the "
                    "float model's (default 1.0); language models: its test perplexity more than POINTS %% above")
    ex.add_argument("--keep-int8", action="store_true",
                    help="keep an int8 file beyond --int8-max-drop anyway (its model card says so)")
    ex.add_argument("--out", default=None, help="output file (default RUN_DIR/export/model[-int8].onnx or model.pt)")
    ex.add_argument("--samples", type=int, default=256, help="test inputs used for the parity check")

    i = _command(sub, "inspect", "print a model's module names with output shapes (to pick feature layers)",
                 "kdkit inspect cnn_small --dataset digits")
    i.add_argument("model", help="registered model name or package.module:factory")
    i.add_argument("--input-shape", help="one sample's shape, e.g. 1,28,28 (default: the dataset's)")
    i.add_argument("--dataset", default=None, help="take input shape and classes from this dataset (e.g. digits)")
    i.add_argument("--num-classes", type=int, default=None, help="outputs of the model (default: the dataset's, or 10)")

    b = _command(sub, "born-again", "born-again networks: N generations, each distilled from the previous",
                 "kdkit born-again configs/digits_scratch.yaml out_dir=runs/ban --generations 3")
    b.add_argument("config", help="YAML config (teacher.checkpoint = generation 0, or a student section to train it)")
    b.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3")
    b.add_argument("--generations", type=int, default=2)

    cm = _command(sub, "compare", "compare run directories: a table of metrics, and one HTML page with the "
                  "configs that differ and the curves overlaid",
                  "kdkit compare runs/digits-kd runs/digits-scratch --out kd-vs-scratch.html")
    cm.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each holds config.yaml)")
    cm.add_argument("--out", default="compare.html", help="the HTML page to write (default: compare.html here)")
    cm.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    sw = _command(sub, "sweep", "search a config's settings with Optuna, every trial a run, one teacher cache for all",
                  "kdkit sweep configs/digits_kd.yaml method.name=[kd,dist,dkd] method.temperature=1..8:log "
                  "method.alpha=0..1 --trials 20")
    sw.add_argument("config", help="YAML config (out_dir is the sweep directory; an optional sweep: block)")
    sw.add_argument("overrides", nargs="*", metavar="KEY=SPEC|KEY=VALUE",
                    help="search dimensions KEY=[A,B,...] or KEY=LO..HI[/N][:log], and overrides KEY=VALUE")
    sw.add_argument("--trials", type=int, help="finished trials to reach (default sweep.trials, 20)")
    sw.add_argument("--sampler", choices=["tpe", "random", "grid"], help="default tpe, seeded from the config's seed")
    sw.add_argument("--pruner", choices=["median", "none"], help="default median")
    sw.add_argument("--storage", help="SQLAlchemy URL of the study (default sqlite:///SWEEP_DIR/study.db)")
    sw.add_argument("--study", help="study name in the storage (default kdkit-sweep)")
    sw.add_argument("--resume", action="store_true", help="continue (or join from another process) the study")


def _demo_dir(out: Optional[str]) -> Path:
    if out is not None:
        p = Path(out)
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            free = next(f"{p}-{n}" for n in range(2, 10_000) if not Path(f"{p}-{n}").exists())
            raise KdkitError(f"{p} already exists and is not empty; the demo writes a fresh folder: choose another "
                             f"with --out (e.g. --out {free}), or leave --out out to get a free runs/demo-N")
        return p
    base = Path("runs/demo")
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = Path(f"{base}-{n}")
    return candidate


def _inspect(args: argparse.Namespace) -> str:
    """``kdkit inspect``: one dry-run forward of a zero batch with hooks on every module."""
    import torch

    from .methods.hooks import format_trace, trace
    from .models import create_model

    shape, classes = None, args.num_classes
    if args.dataset:
        from .data import DATASETS

        splits = DATASETS.get(args.dataset)()
        shape, classes = tuple(splits.input_shape), classes or splits.num_classes
    if args.input_shape:
        try:
            shape = tuple(int(v) for v in args.input_shape.replace("x", ",").split(",") if v.strip())
        except ValueError:
            raise KdkitError(f"--input-shape must be integers like 1,28,28; got {args.input_shape!r}") from None
    if not shape:
        raise KdkitError("kdkit inspect: give --input-shape (e.g. 1,28,28) or --dataset (e.g. digits)")
    model = create_model(args.model, num_classes=classes or 10, input_shape=shape)
    try:
        records = trace(model, torch.zeros((2, *shape)))
    except (RuntimeError, ValueError) as e:
        raise KdkitError(f"model {args.model!r} fails on inputs of shape {shape}: {str(e).splitlines()[0]}") from None
    return (f"{args.model} on inputs (B, {', '.join(map(str, shape))}); names usable as student_layer / "
            f"teacher_layer (append :input for a module's input)\n" + format_trace(records))


def _apply_global_options(args: argparse.Namespace) -> None:
    """Map ``--quiet``/``--no-progress``/``--threads`` onto the run: overrides of config commands, and the
    process-wide defaults of :mod:`kdkit.training.progress` and ``OMP_NUM_THREADS`` for every command."""
    from .training.progress import configure
    from .training.threads import apply_threads

    configure(quiet=args.quiet, bar=not (args.quiet or args.no_progress))
    extra = []
    if args.quiet or args.no_progress:
        extra.append("train.progress=false")  # also silences the bar of the teacher cache's first pass
    if args.threads is not None:
        # An explicit count wins over a config's train.threads; the environment carries it to "auto" in runs
        # assembled without overrides (kdkit demo) and to data-loading worker processes.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        apply_threads(args.threads)
        extra.append(f"train.threads={args.threads}")
    if args.command in CONFIG_COMMANDS:
        args.overrides = list(args.overrides) + extra


def _interrupted_message() -> str:
    """After Ctrl-C: how to continue, with the real run directory."""
    command, out_dir = _RUNNING.get("command"), _RUNNING.get("out_dir")
    if not out_dir:
        return "interrupted" + (" (no out_dir: nothing was saved)" if command in ("train", "distill") else "")
    if command in ("train", "distill"):
        if Path(out_dir, "config.yaml").is_file():
            return f"interrupted; continue with: kdkit {command} --resume {out_dir}"
        return f"interrupted before {out_dir} was set up; start the run again"
    if command == "cache":
        return "interrupted; run the same command again to continue filling the cache"
    if command == "sweep":
        return "interrupted; continue the same study with the same command and --resume"
    return f"interrupted ({command}: {out_dir})"


def _cmd_inspect(args: argparse.Namespace) -> int:
    print(_inspect(args))
    return 0


def _cmd_ls(args: argparse.Namespace) -> int:
    from .data import DATASETS
    from .methods import METHODS
    from .models import MODELS

    for title, reg in (("models", MODELS), ("methods", METHODS), ("datasets", DATASETS)):
        print(f"{title}: {', '.join(reg.names())}")
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from .compress import run_compress
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    _RUNNING["out_dir"] = cfg.out_dir
    ladder = run_compress(cfg)
    print(f"run directory: {ladder.dir}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    result = export_run(args.run_dir, args.format, int8=args.int8, out=args.out, samples=args.samples,
                        int8_max_drop=args.int8_max_drop, keep_int8=args.keep_int8)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .recipes.demo import run_demo

    out = _demo_dir(args.out)
    _RUNNING["out_dir"] = str(out)
    run_demo(out, epochs=args.epochs, seed=args.seed, progress=not (args.quiet or args.no_progress))
    return 0


def _run_config_of(args: argparse.Namespace):
    """The config of `kdkit train|distill`: the file plus overrides, or a run directory's own with --resume."""
    from .config import load_config

    if not args.resume:
        if not args.config:
            raise KdkitError(f"kdkit {args.command}: a CONFIG file is required (or --resume RUN_DIR)")
        return load_config(args.config, args.overrides)
    if args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.config)
        args.config = None
    if not Path(args.resume, "config.yaml").is_file():
        raise KdkitError(f"cannot resume: {args.resume} is not a kdkit run directory (no config.yaml)")
    source = args.config or Path(args.resume) / "config.yaml"
    return load_config(source, args.overrides + [f"out_dir={args.resume}"])


def _cmd_train_or_distill(args: argparse.Namespace) -> int:
    from . import api
    from .evaluation.report import format_table

    cfg = _run_config_of(args)
    _RUNNING["out_dir"] = cfg.out_dir
    result = api.run_config(cfg, args.command, resume=bool(args.resume))
    if result.dir is None:  # a torchrun worker other than rank 0: rank 0 reports
        return 0
    shown = result.metrics
    if args.command == "train":  # kdkit train trains one model (often a teacher): it is not a student
        shown = {("model" if k == "student" else k): v for k, v in result.metrics.items()}
    print(format_table(shown))
    print(f"run directory: {result.dir}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from . import api
    from .config import load_config

    info = api.cache_config(load_config(args.config, args.overrides), log=lambda m: print(m, file=sys.stderr))
    print(f"teacher {'store' if 'store' in info['description'] else 'cache'}: {info['description']}")
    return 0


def _cmd_born_again(args: argparse.Namespace) -> int:
    from .config import load_config
    from .recipes.born_again import born_again_config

    result = born_again_config(load_config(args.config, args.overrides), args.generations)
    print(f"generations in: {result.dir} (summary.json)")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .evaluation.compare import compare_runs

    result = compare_runs(args.run_dirs, out=args.out, force=args.force)
    print(result.table)
    if result.differing:
        print(f"config keys that differ: {', '.join(result.differing)}")
    print(f"wrote {result.html_path}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .recipes.sweep import sweep_cli

    _RUNNING["out_dir"] = args.config
    result = sweep_cli(args.config, args.overrides, trials=args.trials, storage=args.storage, sampler=args.sampler,
                       pruner=args.pruner, study=args.study, resume=args.resume, quiet=args.quiet)
    if result.best_trial is not None:
        print(f"best: trial {result.best_trial}, {result.metric} {result.best_value:.4f}: {result.best_params}")
    print(f"sweep directory: {result.dir} (best.yaml, report.html, sweep.json)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from . import api
    from .evaluation.report import format_table

    metrics = api.evaluate_run(args.run_dir, args.split)
    print(json.dumps(metrics, indent=2) if args.json else format_table(metrics))
    return 0


COMMANDS = {"inspect": _cmd_inspect, "ls": _cmd_ls, "compress": _cmd_compress, "export": _cmd_export,
            "demo": _cmd_demo, "train": _cmd_train_or_distill, "distill": _cmd_train_or_distill,
            "cache": _cmd_cache, "born-again": _cmd_born_again, "evaluate": _cmd_evaluate, "compare": _cmd_compare,
            "sweep": _cmd_sweep}


def _parse(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> argparse.Namespace:
    """Parse the command line; dotted overrides (``KEY=VALUE``) may also come after an option
    (``kdkit distill cfg.yaml -q out_dir=runs/x``), where argparse alone would stop collecting them."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    return args


def run(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = _parse(parser, argv)
    if args.command is None:  # plain `kdkit`: say what it can do
        parser.print_help()
        return 0
    _apply_global_options(args)
    _RUNNING.clear()
    _RUNNING["command"] = args.command
    from .models import load_env_plugins, load_plugin

    # the user's explicit choice; configs never import code
    for plugin in args.plugin + getattr(args, "plugin_after", []):
        load_plugin(plugin)
    load_env_plugins()
    return COMMANDS[args.command](args)


def main(argv: Optional[List[str]] = None) -> None:
    try:
        code = run(argv)
    except KdkitError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(_interrupted_message(), file=sys.stderr)
        code = 130
    if "torch.distributed" in sys.modules:  # under torchrun: leave the process group cleanly
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
