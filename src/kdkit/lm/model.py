"""Causal language models as kdkit models: ``(B, L)`` token ids in, ``(B, L', V)`` next-token logits out.

:class:`HFCausalLM` wraps any Hugging Face causal LM (``transformers`` ``*ForCausalLM``) so that it follows
kdkit's text contract: the input tensor is the ids, right-padded with ``pad_token_id``; the model derives the
attention mask itself (``x != pad_token_id``) and drops the trailing columns that are padding in the whole
batch (a batch pays only for its longest sequence, so ``L' <= L``). The wrapped model is at ``.hf``, so layer
names for forward hooks read ``hf.transformer.h.1`` (GPT-2).

Builders (all local, never the hub):

- :func:`load` a local model directory (``from_pretrained`` on a path);
- :func:`tiny_gpt2` a random-config GPT-2 for tests;
- :func:`from_config` a random-init model from a config dict (``model_type`` + the config's fields), which is
  what the registered zoo entry ``causal_lm`` does for YAML configs (``model: {name: causal_lm, layers: 4, ...}``
  or ``model: {name: causal_lm, path: DIR}``).

``transformers`` is imported only inside these functions (``import kdkit`` never imports it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..data.core import trim_to_longest
from ..errors import KdkitError


def require_transformers():
    """``transformers``, or the one-line error naming the ``hf`` extra."""
    from ..hf import require_hf

    return require_hf()


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM behind kdkit's contract.

    Args:
        hf_model: a ``transformers`` causal LM (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...).
        pad_token_id: the id that right-pads ``x``; positions holding it are masked out of attention.
        trim: drop trailing columns that are padding in the whole batch (off during ONNX export, where the
            graph must not depend on the data).

    ``forward(x)``: ``x`` (B, L) int64 ids -> logits (B, L', V) float, ``L' <= L`` (the batch's longest
    sequence). Position ``t`` of the output scores the token that follows ``x[:, t]``.
    """

    def __init__(self, hf_model: nn.Module, pad_token_id: int, trim: bool = True):
        super().__init__()
        if pad_token_id is None or int(pad_token_id) < 0:
            raise KdkitError(f"HFCausalLM needs a pad token id >= 0; got {pad_token_id!r}")
        self.hf = hf_model
        self.pad_token_id = int(pad_token_id)
        self.trim = trim

    @property
    def vocab_size(self) -> int:
        """Width of the output logits (the model's embedding table)."""
        return int(self.hf.get_output_embeddings().weight.shape[0])

    @property
    def max_positions(self) -> Optional[int]:
        cfg = self.hf.config
        for key in ("n_positions", "max_position_embeddings"):
            if getattr(cfg, key, None):
                return int(getattr(cfg, key))
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.is_floating_point():
            raise KdkitError(f"HFCausalLM takes (batch, length) integer token ids; got a {x.dtype} tensor of shape "
                             f"{tuple(x.shape)}")
        if self.trim and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            x = trim_to_longest(x, self.pad_token_id)  # the same dynamic padding as HFClassifier
        mask = x != self.pad_token_id  # (B, L')
        return self.hf(input_ids=x, attention_mask=mask.long()).logits  # (B, L', V)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``hf.generate`` with the attention mask and pad id filled in (left-aligned prompts without padding
        are the simple case; for batched prompts of different lengths left-pad them and pass ``attention_mask``)."""
        kwargs.setdefault("attention_mask", (input_ids != self.pad_token_id).long())
        kwargs.setdefault("pad_token_id", self.pad_token_id)
        return self.hf.generate(input_ids=input_ids, **kwargs)


def _gpt2_config(vocab_size: int, layers: int, hidden: int, heads: int, max_positions: int,
                 pad_token_id: int, eos_token_id: Optional[int], dropout: float):
    transformers = require_transformers()
    if hidden % heads:
        raise KdkitError(f"hidden size {hidden} must be divisible by the number of heads {heads}")
    eos = pad_token_id if eos_token_id is None else eos_token_id
    return transformers.GPT2Config(vocab_size=vocab_size, n_positions=max_positions, n_embd=hidden, n_layer=layers,
                                   n_head=heads, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                   bos_token_id=eos, eos_token_id=eos, pad_token_id=pad_token_id)


def tiny_gpt2(vocab_size: int, layers: int = 2, hidden: int = 32, heads: int = 2, max_positions: int = 128,
              pad_token_id: int = 0, eos_token_id: Optional[int] = 1, dropout: float = 0.0) -> HFCausalLM:
    """A randomly initialised GPT-2 (Radford et al. 2019) wrapped in :class:`HFCausalLM`; seed torch first.

    Sized for tests and small CPU runs: ``layers`` blocks of width ``hidden`` with ``heads`` attention heads,
    ``max_positions`` learned positions, dropout off by default (``dropout`` sets embedding, attention and
    residual dropout together).
    """
    transformers = require_transformers()
    cfg = _gpt2_config(vocab_size, layers, hidden, heads, max_positions, pad_token_id, eos_token_id, dropout)
    return HFCausalLM(transformers.GPT2LMHeadModel(cfg), pad_token_id)


def from_config(config: Dict[str, Any], pad_token_id: int = 0) -> HFCausalLM:
    """A randomly initialised causal LM from a config dict (``model_type``, default ``gpt2``, plus that
    architecture's config fields, e.g. ``{model_type: llama, hidden_size: 64, ...}``)."""
    transformers = require_transformers()
    cfg = dict(config)
    model_type = cfg.pop("model_type", "gpt2")
    try:
        hf_cfg = transformers.AutoConfig.for_model(model_type, **cfg)
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise KdkitError(f"cannot build a causal LM of type {model_type!r} from the config: {e}") from None
    return HFCausalLM(model, pad_token_id)


def load(path, pad_token_id: Optional[int] = None, dtype: torch.dtype = torch.float32) -> HFCausalLM:
    """A local Hugging Face causal-LM directory (``config.json`` + weights) as an :class:`HFCausalLM`.

    No hub access: ``path`` must be a directory on disk. The pad id is, in order: ``pad_token_id``, the
    tokenizer's pad id (``tokenizer.json`` / tokenizer files in the directory), the config's ``pad_token_id``,
    its ``eos_token_id``. The tokenizer, when the directory has one, is at ``model.tokenizer``.

    Raises:
        KdkitError: a missing directory, no ``config.json``, or a model that is not a causal LM.
    """
    transformers = require_transformers()
    p = Path(path)
    if not p.is_dir():
        raise KdkitError(f"causal LM directory {p} not found (expected a local folder with config.json and weights; "
                         f"kdkit never downloads models)")
    if not (p / "config.json").is_file():
        raise KdkitError(f"{p} has no config.json; expected a Hugging Face model directory")
    from ..hf.models import check_loading_info, check_weight_files

    check_weight_files(p)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(p), local_files_only=True, dtype=dtype, use_safetensors=True, output_loading_info=True)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise KdkitError(f"cannot load a causal LM from {p}: {str(e).splitlines()[0]}") from None
    check_loading_info(p, info)
    tokenizer = _local_tokenizer(p)
    if pad_token_id is None and tokenizer is not None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
    for key in ("pad_token_id", "eos_token_id"):
        if pad_token_id is None:
            v = getattr(model.config, key, None)
            pad_token_id = v[0] if isinstance(v, (list, tuple)) else v
    if pad_token_id is None:
        raise KdkitError(f"{p}: no pad token id in the tokenizer or config; pass pad_token_id")
    lm = HFCausalLM(model.float() if dtype == torch.float32 else model, int(pad_token_id))
    lm.tokenizer = tokenizer  # a plain attribute, not a module: not saved with the weights
    return lm


def _local_tokenizer(p: Path):
    """The tokenizer saved in a model directory (a ``transformers`` fast tokenizer), or None."""
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    transformers = require_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (ValueError, OSError):
        return None


def vocab_size_of(model: nn.Module) -> Optional[int]:
    """The output vocabulary of a kdkit causal LM (``HFCausalLM``), else None."""
    return model.vocab_size if isinstance(model, HFCausalLM) else None


def check_same_vocabulary(teacher: nn.Module, student: nn.Module) -> None:
    """Teacher and student must score the same vocabulary (token-level KD compares distributions position by
    position over one tokenizer's ids).

    Raises:
        KdkitError: the vocabularies differ.
    """
    t, s = vocab_size_of(teacher), vocab_size_of(student)
    if t is not None and s is not None and t != s:
        raise KdkitError(f"teacher vocabulary has {t} tokens but the student's has {s}; token-level distillation "
                         "needs one shared tokenizer, or the teacher's own tokenizer as lm_kd's "
                         "method.teacher_tokenizer")


def causal_lm(num_classes: Optional[int] = None, input_shape: Optional[Tuple[int, ...]] = None,
              path: Optional[str] = None, config: Optional[Dict[str, Any]] = None, layers: int = 2, hidden: int = 64,
              heads: int = 2, dropout: float = 0.0, pad_token_id: int = 0, eos_token_id: int = 1) -> HFCausalLM:
    """Zoo entry ``causal_lm``: a causal LM for YAML configs.

    - ``path``: a local Hugging Face model directory (:func:`load`);
    - ``config``: a config dict (``model_type`` + fields) for a random-init model (:func:`from_config`);
    - otherwise a GPT-2 of ``layers`` x ``hidden`` with ``heads`` heads (:func:`tiny_gpt2`).

    ``num_classes`` (the dataset's vocabulary size) and ``input_shape`` (``(max_length,)``) come from the
    dataset; ``pad_token_id``/``eos_token_id`` default to kdkit's own tokenizers (``<pad>`` = 0,
    ``<|endoftext|>`` = 1).
    """
    if path is not None:
        model = load(path)
    elif config is not None:
        cfg = dict(config)
        if num_classes is not None:
            cfg.setdefault("vocab_size", num_classes)
        model = from_config(cfg, pad_token_id)
    else:
        if num_classes is None:
            raise KdkitError("causal_lm needs the vocabulary size: a dataset with a tokenizer (num_classes), or path")
        positions = max(int(input_shape[0]) if input_shape else 128, 1)
        model = tiny_gpt2(num_classes, layers, hidden, heads, positions, pad_token_id, eos_token_id, dropout)
    if num_classes is not None and model.vocab_size < num_classes:
        raise KdkitError(f"the model scores {model.vocab_size} tokens but the dataset's tokenizer has {num_classes}; "
                         f"expected a model whose vocabulary covers the tokenizer's")
    return model
