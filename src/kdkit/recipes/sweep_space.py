"""The search space of ``kdkit sweep`` and its ``sweep:`` config block.

A dimension is a dotted config key and a spec, written the same way in a config's ``sweep.space`` mapping
and on the command line (``key=SPEC``):

=====================  ==========================================================================
``[A,B,C]``            a choice (each value read as YAML: ``[kd,dist]``, ``[0.5,0.9]``, ``[[32],[64]]``);
                       a list of one value fixes the setting (``student.hidden=[[64,32]]``)
``LO..HI``             a range of floats (``0..1``)
``LO..HI:log``         the same, sampled on a log scale (both ends > 0)
``LO..HI:int``         a range of integers (``1..4:int``, ``16..256:log:int``)
``LO..HI/N``           N evenly spaced points (log-spaced with ``:log``): a choice among them, and what
                       the grid sampler needs for a range (``0..1/5`` is 0, 0.25, 0.5, 0.75, 1)
=====================  ==========================================================================

In a config file a choice is a YAML list and a range a string (``method.temperature: "1..8:log"``).
A malformed spec is a one-line :class:`~kdkit.errors.KdkitError` naming the spec and this grammar.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import ConfigLoader, _ConfigDumper, quote, validation_message
from ..errors import KdkitError

GRAMMAR = ("expected KEY=[A,B,...] (a choice) or KEY=LO..HI (a range of floats), optionally followed by /N "
           "(N evenly spaced points), :log (log scale) and :int (integers), e.g. method.temperature=1..8:log")

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RANGE = re.compile(rf"^\s*(?P<lo>{_NUM})\s*\.\.\s*(?P<hi>{_NUM})\s*(?:/\s*(?P<n>\d+))?\s*"
                    r"(?P<log>:\s*log)?\s*(?P<int>:\s*int)?\s*$")
_LOOKS_LIKE_RANGE = re.compile(rf"^\s*{_NUM}\s*\.\.")
_INT = re.compile(r"^\s*[-+]?\d+\s*$")


@dataclass(frozen=True)
class Dimension:
    """One searched setting: a choice (``choices``) or a range (``low``..``high``, maybe ``log``)."""

    key: str  # dotted config path, e.g. "method.temperature"
    choices: Optional[Tuple[Any, ...]] = None
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    integer: bool = False

    @property
    def is_choice(self) -> bool:
        return self.choices is not None

    def describe(self) -> str:
        if self.is_choice:
            return "[" + ", ".join(_plain(c) for c in self.choices) + "]"
        if self.integer:
            return f"{int(self.low)}..{int(self.high)}" + (":log" if self.log else "") + ":int"
        return f"{self.low:g}..{self.high:g}" + (":log" if self.log else "")

    def labels(self) -> List[Any]:
        """Choices as Optuna stores them: scalars as they are, anything else (lists) as YAML text."""
        return [c if _scalar(c) else _plain(c) for c in self.choices]

    def value_of(self, label: Any) -> Any:
        """The config value of a stored choice label (the inverse of :meth:`labels`); a range's value as is."""
        if not self.is_choice:
            return label
        for choice, lab in zip(self.choices, self.labels()):
            if lab == label:
                return choice
        return label

    def corners(self) -> List[Any]:
        """Values that exercise the dimension's extremes: every choice, or both ends of a range."""
        if self.is_choice:
            return list(self.choices)
        lo, hi = (int(self.low), int(self.high)) if self.integer else (self.low, self.high)
        return [lo, hi]


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _plain(v: Any) -> str:
    if isinstance(v, str):
        return v
    return yaml.dump(v, Dumper=_ConfigDumper, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _bad(key: str, spec: Any, why: str = "") -> KdkitError:
    what = f"search space {key}={quote(spec) if not isinstance(spec, str) else spec!r}"
    return KdkitError(f"{what}: {why + '; ' if why else ''}{GRAMMAR}")


def _check_key(key: str, spec: Any) -> None:
    parts = key.split(".")
    if not key or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
        raise _bad(key, spec, "the key must be a dotted config path")


def parse_dimension(key: str, spec: Any) -> Dimension:
    """One dimension from its key and spec (a YAML list, or the range text ``LO..HI[/N][:log]``).

    Raises:
        KdkitError: a malformed spec (one line naming it and the grammar).
    """
    _check_key(key, spec)
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise _bad(key, spec, "a choice needs at least one value")
        labels = [c if _scalar(c) else _plain(c) for c in spec]
        if len(set(map(repr, labels))) != len(labels):
            raise _bad(key, spec, "a choice lists a value twice")
        return Dimension(key, choices=tuple(spec))
    if not isinstance(spec, str):
        raise _bad(key, spec, "a spec is a list (a choice) or a range string")
    m = _RANGE.match(spec)
    if m is None:
        raise _bad(key, spec)
    lo_text, hi_text = m.group("lo"), m.group("hi")
    integer = m.group("int") is not None
    if integer and not (_INT.match(lo_text) and _INT.match(hi_text)):
        raise _bad(key, spec, ":int needs integer ends")
    lo, hi = float(lo_text), float(hi_text)
    log = m.group("log") is not None
    if not lo < hi:
        raise _bad(key, spec, f"the range is empty (LO {lo_text} must be below HI {hi_text})")
    if log and lo <= 0:
        raise _bad(key, spec, "a log-scale range needs LO > 0")
    dim = Dimension(key, low=lo, high=hi, log=log, integer=integer)
    if m.group("n") is None:
        return dim
    n = int(m.group("n"))
    if n < 2:
        raise _bad(key, spec, "/N needs N >= 2 points")
    points = _points(lo, hi, n, log)
    if integer:
        points = list(dict.fromkeys(int(round(p)) for p in points))
    return Dimension(key, choices=tuple(points))


def _points(lo: float, hi: float, n: int, log: bool) -> List[float]:
    if log:
        a, b = math.log(lo), math.log(hi)
        pts = [math.exp(a + (b - a) * i / (n - 1)) for i in range(n)]
        pts[0], pts[-1] = lo, hi
    else:
        pts = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    return [float(f"{p:.6g}") for p in pts]  # readable grid values (6 significant digits)


def is_space_arg(text: str) -> bool:
    """Whether a command-line ``key=value`` is a search dimension (``[..]`` or ``LO..``) rather than an override."""
    _, sep, value = text.partition("=")
    value = value.strip()
    return bool(sep) and ((value.startswith("[") and value.endswith("]")) or bool(_LOOKS_LIKE_RANGE.match(value)))


def parse_space_arg(text: str) -> Tuple[str, Any]:
    """``"method.name=[kd,dist]"`` -> ``("method.name", ["kd", "dist"])``; ranges stay text."""
    key, _, value = text.partition("=")
    value = value.strip()
    if value.startswith("["):
        try:
            parsed = yaml.load(value, Loader=ConfigLoader)  # noqa: S506 - ConfigLoader is a SafeLoader
        except yaml.YAMLError:
            raise _bad(key, value, "the list is not valid YAML") from None
        if not isinstance(parsed, list):
            raise _bad(key, value)
        return key, parsed
    return key, value


def parse_space(specs: Dict[str, Any]) -> List[Dimension]:
    """Every dimension of a ``{key: spec}`` mapping (one-value choices included: they fix a setting)."""
    return [parse_dimension(k, v) for k, v in specs.items()]


# ----------------------------------------------------------------------------- the sweep: block

class SweepConfig(BaseModel):
    """``sweep:`` how to search (every key is checked; an unknown one is an error).

    Example::

        sweep:
          trials: 20
          sampler: tpe            # tpe (default, seeded from the config's seed), random or grid
          pruner: median          # stop trials whose validation score trails the median at the same epoch
          space:
            method.name: [kd, dist, dkd]
            method.temperature: "1..8:log"
            method.alpha: "0..1"
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    trials: int = Field(20, gt=0, description="finished trials (complete or pruned) the study should reach")
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "none"] = "median"
    startup_trials: int = Field(5, ge=0, description="trials before pruning starts (and TPE's random start)")
    warmup_epochs: int = Field(1, ge=0, description="epochs of each trial never pruned")
    metric: str = Field("val_accuracy", pattern=r"^val_\w+$",
                        description="per-epoch validation metric scored (its value at the kept epoch)")
    direction: Literal["auto", "maximize", "minimize"] = Field(
        "auto", description="auto: maximize accuracy/agreement, minimize the rest (nll, mse, loss)")
    storage: Optional[str] = Field(None, description="SQLAlchemy URL (default sqlite:///SWEEP_DIR/study.db)")
    study: str = Field("kdkit-sweep", min_length=1, description="study name inside the storage")
    heartbeat_seconds: int = Field(10, gt=0, description="a running trial's heartbeat; one silent for 3x this "
                                                         "is marked failed and retried")
    retries: int = Field(2, ge=0, description="times an interrupted or crashed trial is retried")
    space: Dict[str, Union[List[Any], str]] = Field(default_factory=dict, description="KEY: [A,B] or 'LO..HI[:log]'")

    def resolved_direction(self) -> str:
        if self.direction != "auto":
            return self.direction
        return "maximize" if self.metric in ("val_accuracy", "val_agreement") else "minimize"


def parse_sweep_block(raw: Any, source: str) -> SweepConfig:
    """Validate a ``sweep:`` block; a bad key or value is one line naming ``source``, the key and what is allowed."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise KdkitError(f"{source}: sweep must be a mapping (trials, sampler, space, ...); given {quote(raw)}")
    try:
        cfg = SweepConfig.model_validate(raw)
    except ValidationError as e:
        raise KdkitError(validation_message(e, source, SweepConfig, prefix="sweep.")) from None
    parse_space(cfg.space)  # a malformed spec fails now
    return cfg


def split_args(args: Sequence[str]) -> Tuple[Dict[str, Any], List[str]]:
    """Command-line ``key=value`` items: search dimensions (``{key: spec}``) and plain overrides."""
    space: Dict[str, Any] = {}
    overrides: List[str] = []
    for text in args:
        if is_space_arg(text):
            key, spec = parse_space_arg(text)
            parse_dimension(key, spec)
            space[key] = spec
        else:
            overrides.append(text)
    return space, overrides
