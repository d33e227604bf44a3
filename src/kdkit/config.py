"""Typed experiment configs: YAML in, validated objects out, resolved YAML written to the run directory.

A config is data, never code. Every key is checked before any work starts:
an unknown key, a wrong type or a bad value is a one-line :class:`KdkitError`
naming the key path, what was given and what is allowed. Sections that name a
registered thing (``data``, ``model``/``student``/``teacher``, ``method``) take
that thing's own options beside ``name``; those are checked against the
factory's signature.

Example::

    seed: 0
    out_dir: runs/digits-kd
    data: {name: digits, batch_size: 64}
    teacher: {checkpoint: runs/digits-teacher}
    student: {name: mlp, hidden: [32]}
    method: {name: kd, temperature: 4.0, alpha: 0.9}
    train: {epochs: 30, optimizer: adam, lr: 0.003}
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import KdkitError


class _Strict(BaseModel):
    # inf/NaN are never a meaningful setting (lr=.inf, warmup_epochs=.inf): reject them with the rest.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class _Named(BaseModel):
    """A section that names a registered thing; extra keys are that thing's own options."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)

    def options(self) -> Dict[str, Any]:
        """The thing's own options (everything but the section's declared fields)."""
        return dict(self.model_extra or {})


class DataConfig(_Named):
    """``data:`` which dataset, how it is batched, how many labels are kept."""

    name: str = Field("digits", description="a registered dataset (see the registries) or a plugin's")
    batch_size: int = Field(128, gt=0, description="training batch (the global batch under torchrun)")
    eval_batch_size: int = Field(512, gt=0, description="batch for validation and evaluation")
    labelled_fraction: float = Field(1.0, gt=0.0, le=1.0,
                                     description="keep labels for this fraction of training samples")
    labelled_seed: int = Field(0, ge=0, description="draws which training samples keep their label "
                                                    "(its own seed, not the run's: every run sees the same subset)")
    unlabelled: bool = Field(False, description="drop every label: distil from an unlabelled transfer set")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    augment: Optional[Literal["crop_flip"]] = Field(
        None, description="random crop (zero padding) + horizontal flip of training images, replayable per view")
    augment_pad: int = Field(2, ge=0, description="crop_flip: shift of up to this many pixels")
    augment_views: int = Field(8, gt=0, description="crop_flip: distinct views per image (teacher cache rows)")
    mixup: float = Field(0.0, ge=0, description="mixup of training images, Beta(a, a) weights; 0: off (function "
                                                "matching: 1.0 with crop_flip; labels dropped, teacher runs live)")
    cutmix: float = Field(0.0, ge=0, description="CutMix of training images, Beta(a, a) areas; 0: off (with mixup: "
                                                 "half the samples each)")


class ModelConfig(_Named):
    """``model:``/``student:``/``teacher:`` a zoo name or ``pkg.mod:factory``, its options, optional weights.

    ``checkpoint`` is a ``.safetensors`` file or a run directory; with a run
    directory and no ``name``, the architecture is read from that run's config.
    """

    name: Optional[str] = Field(None, description="a zoo name, a plugin's name or package.module:factory")
    checkpoint: Optional[str] = Field(None, description="weights: a .safetensors file or a run directory")


class MethodConfig(_Named):
    """``method:`` a registered method name and its options (e.g. ``temperature``, ``alpha``)."""

    name: str = Field("kd", description="a registered method (see Methods)")


class TrainConfig(_Strict):
    """``train:`` the optimisation loop."""

    epochs: int = Field(10, gt=0)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["constant", "cosine", "step"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    step_size: int = Field(30, gt=0, description="epochs between decays for schedule=step")
    gamma: float = Field(0.1, gt=0, le=1, description="decay factor for schedule=step")
    grad_clip: Optional[float] = Field(None, gt=0, description="max global gradient norm")
    eval_every: int = Field(1, gt=0, description="evaluate on the validation split every N epochs")
    keep: Literal["best", "last"] = Field(
        "best", description="weights kept in best.safetensors: best validation score "
                            "(ties: lower NLL, then the later epoch) or the last epoch")
    progress: bool = Field(True, description="a progress bar during each epoch, shown only when stderr is a terminal")
    quiet: bool = Field(False, description="no per-epoch lines: only results, warnings and errors")
    threads: Union[int, Literal["auto"]] = Field(
        "auto", description="torch's CPU threads: an integer >= 1, or auto (see kdkit.training.threads)")
    # speed (see kdkit.training.loop and kdkit.teacher.cache)
    grad_accum_steps: int = Field(1, gt=0, description="micro-batches per optimiser step")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: autocast forward passes (CPU and CUDA)")
    channels_last: bool = Field(False, description="NHWC memory format for 4-D inputs and the models")
    compile: bool = Field(False, description="torch.compile the student (and the live teacher)")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp (a full copy per process) or fsdp (FSDP2: parameters, gradients "
                           "and optimiser state sharded over the processes, teacher too)")
    activation_checkpointing: bool = Field(
        False, description="recompute a Hugging Face student's blocks in the backward pass (less memory)")
    sync_every: int = Field(50, gt=0, description="steps between host syncs (non-finite loss check, progress bar)")
    teacher_cache: Literal["auto", "memory", "disk", "off"] = Field(
        "auto", description="reuse the teacher's outputs across epochs; auto: cache when correct, in memory if it fits")
    cache_dtype: Literal["float32", "float16"] = "float32"
    cache_feature_dtype: Literal["float16", "float32"] = Field(
        "float16", description="storage of the teacher's intermediate layers when a feature method's cache holds them")
    cache_topk: Optional[int] = Field(None, gt=0, description="store only the k largest teacher logits per sample")
    cache_dir: Optional[str] = Field(
        None, description="folder of disk caches (default $KDKIT_CACHE_DIR or ~/.cache/kdkit/teacher)")
    cache_memory_mb: int = Field(2048, ge=0, description="auto: largest cache kept in memory; bigger ones go to disk")

    @field_validator("threads", mode="before")
    @classmethod
    def _check_threads(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("expected an integer >= 1 or 'auto'")


class EnsembleConfig(_Strict):
    """``ensemble:`` how the ``teachers:`` list is combined (see :class:`kdkit.teacher.TeacherEnsemble`)."""

    weights: Optional[List[float]] = Field(None, description="fixed weight per teacher (default: equal)")
    weighting: Literal["fixed", "entropy", "max_prob"] = "fixed"
    combine: Literal["probs", "logits"] = "probs"
    temperature: Optional[float] = Field(None, gt=0, description="soft-target temperature (default: the method's)")


class _Step(_Strict):
    """One step of ``kdkit compress`` (see :mod:`kdkit.compress`). ``epochs`` > 0 adds that many epochs of
    distillation from the teacher after the step (the ``method`` and ``train`` sections' settings) to recover
    accuracy."""

    epochs: int = Field(0, ge=0, description="recovery distillation epochs after this step")
    lr: Optional[float] = Field(None, gt=0, description="learning rate of the recovery epochs (default: train.lr)")

    def describe(self) -> str:
        """The step as the ladder table names it, e.g. ``prune structured 50%``."""
        return str(getattr(self, "step"))

    def problem(self, last: bool) -> Optional[str]:
        """What is wrong with this combination of settings (None: nothing); ``last``: it ends the ladder."""
        return None


class DistillStep(_Step):
    """Distil the teacher into the current model (``epochs`` > 0 required)."""

    step: Literal["distill"]
    epochs: int = Field(..., gt=0)

    def describe(self) -> str:
        return f"distill {self.epochs} ep"


class TransferStep(_Step):
    """Initialise the current model from the teacher's weights where shapes allow (:mod:`kdkit.compress.transfer`)."""

    step: Literal["transfer"]
    layers: Literal["every_other", "first", "last"] = "every_other"

    def describe(self) -> str:
        return f"transfer {self.layers}"


class PruneStep(_Step):
    """Magnitude pruning: ``structured`` removes whole channels/neurons, otherwise single weights are zeroed."""

    step: Literal["prune"]
    structured: bool = True
    sparsity: Optional[float] = Field(None, gt=0, lt=1, description="fraction of the prunable parameters to remove")
    target_parameters: Optional[int] = Field(None, gt=0, description="prune until at most this many parameters remain")
    iterations: int = Field(1, ge=1, description="reach the target in this many rounds, each followed by `epochs`")

    def describe(self) -> str:
        kind = "structured" if self.structured else "unstructured"
        amount = f"{self.sparsity:.0%}" if self.sparsity is not None else f"to {self.target_parameters:,}"
        return f"prune {kind} {amount}"

    def problem(self, last: bool) -> Optional[str]:
        if (self.sparsity is None) == (self.target_parameters is None):
            return "give exactly one of sparsity (0..1) or target_parameters"
        return None


class LowRankStep(_Step):
    """Truncated-SVD factorisation of Linear/Conv2d layers into two thinner ones (:mod:`kdkit.compress.lowrank`)."""

    step: Literal["lowrank"]
    rank: Optional[int] = Field(None, gt=0, description="keep this many singular values per layer")
    energy: Optional[float] = Field(
        None, gt=0, le=1, description="keep the fewest singular values holding this share of sum(s^2)")
    layers: Optional[List[str]] = Field(
        None, description="module names to factorise (default: every Linear/Conv2d where it saves parameters)")

    def describe(self) -> str:
        return f"lowrank rank {self.rank}" if self.rank is not None else f"lowrank energy {self.energy:g}"

    def problem(self, last: bool) -> Optional[str]:
        if (self.rank is None) == (self.energy is None):
            return "give exactly one of rank (an integer >= 1) or energy (0..1]"
        return None


class QuantizeStep(_Step):
    """int8 quantisation on the CPU: ``dynamic``, ``static`` (calibrated) or ``qat`` (``epochs`` of KD with fake
    quantisation)."""

    step: Literal["quantize"]
    mode: Literal["dynamic", "static", "qat"] = "static"
    calibration_samples: int = Field(
        1024, gt=0, description="training samples run through the model to calibrate (static)")
    backend: Literal["x86", "fbgemm", "qnnpack"] = "x86"

    def describe(self) -> str:
        return f"quantize int8 {self.mode}"

    def problem(self, last: bool) -> Optional[str]:
        if self.mode == "qat" and self.epochs == 0:
            return "mode qat trains with fake quantisation; set epochs >= 1"
        if not last:
            return "quantisation must be the last step (an int8 model is not trained further)"
        return None


COMPRESS_STEPS = {"distill": DistillStep, "transfer": TransferStep, "prune": PruneStep, "lowrank": LowRankStep,
                  "quantize": QuantizeStep}


def parse_compress_steps(raw: Sequence[Any]) -> List[_Step]:
    """Validate ``compress:`` entries into step objects; a bad step is a one-line :class:`KdkitError`."""
    steps: List[_Step] = []
    for i, entry in enumerate(raw):
        where = f"compress[{i}]"
        if isinstance(entry, _Step):
            steps.append(entry)
            continue
        if not isinstance(entry, dict) or "step" not in entry:
            raise KdkitError(f"{where}: each step is a mapping with a `step` key, one of {', '.join(COMPRESS_STEPS)}; "
                             f"given {entry!r}")
        cls = COMPRESS_STEPS.get(entry["step"])
        if cls is None:
            raise KdkitError(f"{where}: unknown step {entry['step']!r}; known steps: {', '.join(COMPRESS_STEPS)}")
        try:
            step = cls.model_validate(entry)
        except ValidationError as e:
            raise KdkitError(validation_message(e, f"{where} ({entry['step']})", cls)) from None
        problem = step.problem(last=i == len(raw) - 1)
        if problem is not None:
            raise KdkitError(f"{where} ({entry['step']}): {problem}")
        steps.append(step)
    return steps


TRACKING_BACKENDS = ("auto", "tensorboard", "mlflow", "none")


class TrackingConfig(_Strict):
    """``tracking:`` where per-epoch metrics go (see :mod:`kdkit.training.tracking`).

    Written as a backend name (``tracking: mlflow``), a list (``tracking: [tensorboard, mlflow]``) or a
    section (``tracking: {backend: mlflow, uri: ..., experiment: ...}``).
    """

    backend: Union[str, List[str]] = Field(
        "auto", description="auto (TensorBoard scalars when the tensorboard package is installed, else nothing), "
                            "tensorboard (an error without the package), mlflow, none, or a list")
    uri: Optional[str] = Field(None, description="MLflow tracking URI (default: sqlite:///<run's parent>/mlflow.db)")
    experiment: str = Field("kdkit", min_length=1, description="MLflow experiment name")
    run_name: Optional[str] = Field(None, description="MLflow run name (default: the run directory's name)")
    artifact_location: Optional[str] = Field(None, description="artifact root of a new MLflow experiment")
    parent_run_id: Optional[str] = Field(None, description="MLflow run this run is a child of (sweeps)")
    tags: Dict[str, str] = Field(default_factory=dict, description="MLflow tags of the run")

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, value: Any) -> Any:
        names = [value] if isinstance(value, str) else value
        bad = [n for n in names if n not in TRACKING_BACKENDS]
        if bad or not names:
            raise ValueError(f"expected one of {', '.join(TRACKING_BACKENDS)} or a list of them")
        return value

    def backends(self) -> List[str]:
        """The backends asked for, without ``none``."""
        names = [self.backend] if isinstance(self.backend, str) else list(self.backend)
        return [n for n in dict.fromkeys(names) if n != "none"]


class RunConfig(_Strict):
    """The whole experiment."""

    seed: int = Field(0, ge=0, lt=2**63,
                      description="the one source of randomness of the run (torch takes 64-bit seeds)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$",
                        description="auto (a GPU when there is one), cpu, cuda, cuda:N or mps")
    out_dir: Optional[str] = Field(None, description="the run directory: must not exist yet (or be empty)")
    data: DataConfig = Field(default_factory=DataConfig)
    model: Optional[ModelConfig] = None
    teacher: Optional[ModelConfig] = None
    teachers: Optional[List[ModelConfig]] = Field(None, description="several teachers, combined per `ensemble`")
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)
    student: Optional[ModelConfig] = None
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    compress: List[Dict[str, Any]] = Field(default_factory=list, description="`kdkit compress` steps, in order")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("tracking", mode="before")
    @classmethod
    def _tracking_shorthand(cls, value: Any) -> Any:
        # `tracking: mlflow` / `tracking: [tensorboard, mlflow]` stand for {backend: ...}
        return {"backend": value} if isinstance(value, (str, list)) else value

    @field_validator("compress")
    @classmethod
    def _check_compress(cls, value: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        # KdkitError is not a ValueError, so it leaves pydantic untouched with its one-line message.
        return [s.model_dump() for s in parse_compress_steps(value)]


# --- reading YAML: data only, read as written -------------------------------------------------------------

#: Longest piece of a user's input quoted in an error message: errors stay one short line.
QUOTE_CHARS = 80
#: Values that YAML aliases may add beyond what is written out: enough for any real config, far below a
#: "billion laughs" document (400 bytes of nested aliases expand to millions of values).
ALIAS_BUDGET = 10_000


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, on one line (for quoting user input in errors)."""
    text = repr(value).replace("\\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the surprises of YAML 1.1 removed.

    - Booleans are only ``true``/``false`` (any case, as in YAML 1.2): ``off``, ``on``, ``yes``, ``no``
      stay strings, so ``teacher_cache: off`` means the string the README lists (YAML 1.1 reads it as false).
    - A key given twice in one mapping is an error naming the key and both lines (silently keeping the
      last one hides typos).
    - Aliases may expand to at most :data:`ALIAS_BUDGET` values beyond the written ones.
    - Tags that build Python objects (``!!python/object``) are refused, as by every safe loader.
    """

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            # Keys brought in by a merge (<<: *base) may be overridden; only a key written twice is an error.
            own = {id(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"}
            self.flatten_mapping(node)
            seen: Dict[Any, int] = {}
            for key_node, _ in node.value:
                if id(key_node) in own and isinstance(key_node, yaml.ScalarNode):
                    key, line = key_node.value, key_node.start_mark.line + 1
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None,
                            f"duplicate key {quote(key)} (lines {seen[key]} and {line}); give each key once")
                    seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def get_single_node(self) -> Optional[yaml.Node]:
        node = super().get_single_node()
        if node is not None:
            _check_alias_budget(node)
        return node


    def refuse_tag(self, node: yaml.Node) -> None:
        raise yaml.constructor.ConstructorError(None, None, f"the tag {quote(node.tag)} is not allowed (a config is "
                                                f"data, never code)", node.start_mark)


ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
# YAML 1.2 floats without a dot (1e-3, 5E4): YAML 1.1 reads them as strings. Added after the int resolver, so
# plain integers stay integers.
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                   list("-+0123456789"))
ConfigLoader.add_constructor(None, ConfigLoader.refuse_tag)


class _ConfigDumper(yaml.SafeDumper):
    """Quotes every string that :class:`ConfigLoader` or a YAML 1.1 reader would not read back as a string."""


_ConfigDumper.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


def _check_alias_budget(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand to far more values than it writes out (an alias bomb)."""
    sizes: Dict[int, Optional[int]] = {}
    stack = [(root, False)]
    while stack:  # iterative post-order walk: deep documents must not overflow Python's stack
        node, children_done = stack.pop()
        if children_done:
            kids = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
            sizes[id(node)] = 1 + sum(sizes[id(k)] or 0 for k in kids)
            continue
        if id(node) in sizes:
            if sizes[id(node)] is None:
                raise yaml.constructor.ConstructorError(None, None, "an alias refers to a node that contains it "
                                                        "(a recursive structure); write the values out",
                                                        node.start_mark)
            continue
        if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
            sizes[id(node)] = None  # in progress
            stack.append((node, True))
            kids = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
            stack.extend((k, False) for k in kids)
        else:
            sizes[id(node)] = 1
    if sizes[id(root)] > len(sizes) + ALIAS_BUDGET:
        raise yaml.constructor.ConstructorError(
            None, None, f"aliases expand to {sizes[id(root)]} values from {len(sizes)} written ones (over the "
            f"budget of {ALIAS_BUDGET}); write the values out", root.start_mark)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One short line from a PyYAML error: what is wrong and where."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "not valid YAML"
        problem = re.sub(r"\s+", " ", str(problem)).strip()
        if len(problem) > 160:
            problem = problem[:157] + "..."
        return f"line {mark.line + 1}: {problem}" if mark is not None else problem
    return quote(str(e), 160).strip("'\"")


def parse_yaml(text: str, source: str) -> Any:
    """Parse one YAML document with :class:`ConfigLoader`; any failure is a one-line :class:`KdkitError`."""
    try:
        return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - ConfigLoader is a SafeLoader
    except yaml.YAMLError as e:
        raise KdkitError(f"{source}: not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:
        raise KdkitError(f"{source}: not valid YAML: nested too deeply") from None


def _section_model(model: Any, key: str) -> Any:
    """The pydantic section class behind ``model.key``; None when ``key`` holds a plain value (or a list)."""
    field = model.model_fields.get(key)
    if field is None:
        return None
    ann = field.annotation
    return next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)


def validation_message(err: ValidationError, source: str, model: Any = None, prefix: str = "") -> str:
    """One line from pydantic's first error: the key path, what is expected, what was given (cut short).

    ``model`` is the validated class (default :class:`RunConfig`), read to list the keys allowed where an
    unknown one was given; ``prefix`` is put before the key path (``"sweep."`` for a ``sweep:`` block).
    Every typed block of a config (run, compress steps, sweeps) words its errors here.
    """
    e = err.errors()[0]
    path = prefix + (".".join(str(p) for p in e["loc"]) or "(top level)")
    if e["type"] == "extra_forbidden":
        section: Any = model or RunConfig
        for part in e["loc"][:-1]:
            if isinstance(part, str) and isinstance(section, type) and issubclass(section, BaseModel):
                section = _section_model(section, part) or section
        allowed = ", ".join(section.model_fields)
        return f"{source}: unknown key {path!r}; allowed here: {allowed}"
    msg = re.sub(r"\s+", " ", e["msg"]).replace("Value error, ", "").replace("Input should be", "expected")
    if e["type"] == "missing":
        return f"{source}: {path}: a value is required"
    return f"{source}: {path}: {msg}; given {quote(e.get('input'))}"


def parse_override(text: str) -> tuple:
    """``"method.temperature=2"`` -> ``(["method", "temperature"], 2)``; the value is parsed as YAML.

    The value is read by the same :class:`ConfigLoader` as files (``off`` stays a string); a value that is
    not valid YAML on its own (``a: b: c``) is taken as the literal string.
    """
    key, sep, value = text.partition("=")
    keys = key.split(".")
    if not sep or not key or not all(keys):
        raise KdkitError(f"override {quote(text)} must look like key.path=value (e.g. train.epochs=3)")
    if value == "":
        return keys, None
    try:
        parsed = yaml.load(value, Loader=ConfigLoader)  # noqa: S506 - ConfigLoader is a SafeLoader
    except yaml.YAMLError:
        parsed = value
    except RecursionError:
        raise KdkitError(f"override {quote(text)}: value nested too deeply") from None
    return keys, parsed


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Set each ``key.path=value`` in ``raw`` (in place; sections are created as needed).

    A path through a setting that is not a section (``train.epochs.x=1``) is an error naming it.
    """
    for text in overrides:
        keys, value = parse_override(text)
        node, model = raw, RunConfig
        for depth, k in enumerate(keys[:-1]):
            where = ".".join(keys[: depth + 1])
            if model is not None and k in model.model_fields and _section_model(model, k) is None:
                kind = "a list" if "List[" in str(model.model_fields[k].annotation) else "a setting, not a section"
                raise KdkitError(f"override {quote(text)}: {where} is {kind}; set it whole with {where}=VALUE")
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise KdkitError(f"override {quote(text)}: {where} is {quote(node[k])}, not a section")
            node = node[k]
            model = _section_model(model, k) if model is not None else None
        node[keys[-1]] = value
    return raw


def load_config(source: Union[str, Path, Dict[str, Any], None] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML file (or a dict), apply ``key.path=value`` overrides, validate.

    Files are read with :class:`ConfigLoader` (booleans only true/false, no duplicate keys, no alias bombs,
    no Python tags); this is also how run directories' ``config.yaml`` files are read.

    Raises:
        KdkitError: on a missing or unreadable file, bad YAML, or an invalid key or value (one line).
    """
    name = "config"
    if source is None:
        raw: Dict[str, Any] = {}
    elif isinstance(source, dict):
        raw = copy.deepcopy(source)  # overrides must not change the caller's nested sections
    else:
        name = str(source)
        path = Path(source)
        if not path.is_file():
            raise KdkitError(f"config file {path} not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise KdkitError(f"{path}: not a YAML config (not UTF-8 text)") from None
        except OSError as e:
            raise KdkitError(f"{path}: cannot read the config: {e.strerror or e}") from None
        raw = parse_yaml(text, str(path))
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise KdkitError(f"{path}: expected a mapping of sections at the top level (seed, data, train, ...); "
                             f"found a {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise KdkitError(validation_message(e, name)) from None


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (every default filled in)."""
    return yaml.dump(cfg.model_dump(mode="json"), Dumper=_ConfigDumper, sort_keys=False)


def flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    """A nested dict (a config's ``model_dump``) as one level of dotted keys: ``{"train": {"lr": 0.1}}`` ->
    ``{"train.lr": 0.1}``. Used to compare configs (resume, sweeps, ``kdkit compare``) and to log them (MLflow)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
