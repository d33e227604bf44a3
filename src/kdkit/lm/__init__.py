"""Causal language models: distil a large causal LM into a small one, token by token.

Importing this package never imports ``transformers`` (models load it when built). It registers the
language-model datasets (``fortunes_lm``, ``text_lm``, ``jsonl_lm``, ``hf_dataset_lm``) and the zoo entry
``causal_lm``; the ``lm_kd`` method lives in :mod:`kdkit.methods.lm_kd`.

- :class:`HFCausalLM`, :func:`load`, :func:`tiny_gpt2`, :func:`from_config` (:mod:`kdkit.lm.model`)
- :func:`train_tokenizer`, :func:`load_tokenizer` (:mod:`kdkit.lm.tokenizer`)
- :class:`TokenData` and the corpus readers (:mod:`kdkit.lm.data`)
- :func:`evaluate_lm` perplexity, agreement, generation speed (:mod:`kdkit.lm.evaluate`)
- :func:`lm_distill_loss` and the token-level divergences, masked and chunked (:mod:`kdkit.lm.losses`)
- :func:`topk_targets`, :func:`sparse_distill_loss`: the top-k record and its loss (:mod:`kdkit.lm.topk`)
- :func:`build_store`, :class:`TeacherStore`: the teacher's distributions written once (``topk``, ``sampled``,
  ``full``) and read by any number of students (:mod:`kdkit.lm.store`)
"""

from __future__ import annotations

from ..models.zoo import MODELS
from . import data  # noqa: F401  (registers the datasets)
from .data import TokenData, is_token_data
from .losses import DIVERGENCES, LMLoss, lm_distill_loss, lm_kd_loss, next_token_cross_entropy
from .model import HFCausalLM, causal_lm, from_config, load, tiny_gpt2
from .store import TeacherStore, build_store, store_distill_loss
from .tokenizer import load_tokenizer, train_tokenizer
from .topk import SparseTargets, sparse_distill_loss, storage_bytes, topk_targets, truncation_kl

MODELS.register("causal_lm")(causal_lm)


def evaluate_lm(*args, **kwargs):
    """See :func:`kdkit.lm.evaluate.evaluate_lm`."""
    from .evaluate import evaluate_lm as _evaluate_lm

    return _evaluate_lm(*args, **kwargs)


__all__ = ["DIVERGENCES", "HFCausalLM", "LMLoss", "SparseTargets", "TeacherStore", "TokenData", "build_store",
           "evaluate_lm", "from_config", "is_token_data", "lm_distill_loss", "lm_kd_loss", "load", "load_tokenizer",
           "next_token_cross_entropy", "sparse_distill_loss", "storage_bytes", "store_distill_loss", "tiny_gpt2",
           "topk_targets", "train_tokenizer", "truncation_kl"]
