"""Shared machinery of the transformer-encoder methods (``hidden_mse``, ``attention_kl``, ``tinybert``,
``minilm``, ``hidden_cosine``).

Both models are text models of kdkit's contract (``(B, L)`` token ids in, a ``pad_token_id`` attribute, the
Hugging Face model at ``.hf``, e.g. :class:`kdkit.hf.HFClassifier`). Their encoder layers are found by
module name: the longest ``nn.ModuleList`` whose blocks hold query/key/value projections (``query``/``key``/
``value`` in BERT, RoBERTa, ELECTRA and MiniLM; ``q_lin``/``k_lin``/``v_lin`` in DistilBERT; ``q_proj``/
``k_proj``/``v_proj``), e.g. ``hf.bert.encoder.layer.3`` and ``hf.bert.encoder.layer.3.attention.self.query``.
Those names are declared as ``student_layers``/``teacher_layers`` and read with forward hooks (the models are
never edited; a ``combo`` captures them in its one forward). Widths and head counts come from the wrapped
model's config (``hidden_size``/``dim``/``d_model``, ``num_attention_heads``/``n_heads``).

Every method here combines its terms the same way, reusing ``kd``'s per-sample mix of soft and hard targets
(:func:`kdkit.methods.kd.mix_with_labels`)::

    loss = [alpha · KD_T(student, teacher) + (1 - alpha) · CE(student, y)] + beta · feature_loss

(an unlabelled sample puts its whole logit weight on KD, as in ``kd``). ``alpha: 0`` gives labels plus the
feature term, ``beta: 0`` plain ``kd``. The padding mask is ``batch["x"] != pad_token_id``, cut to the length
the models actually ran (they may drop trailing all-pad columns): padded positions never contribute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import KdkitError
from ..losses import kd_loss, kd_per_sample
from ..losses_text import attention_kl_loss, masked_hidden_mse, value_relation_loss
from .base import Batch, Method, Outputs
from .kd import mix_with_labels

LayerMapSpec = Union[str, List[int], List[List[int]]]

_QKV_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q_proj", "k_proj", "v_proj"))


def layer_map(num_student: int, num_teacher: int, spec: LayerMapSpec = "uniform",
              source_layers: Optional[Sequence[int]] = None) -> List[Tuple[int, int]]:
    """Pairs ``(student layer, teacher layer)`` (0-based encoder blocks) to match.

    Args:
        num_student, num_teacher: the number of encoder layers M and N.
        spec: ``"uniform"``: student layer m (1-based) reads teacher layer ``floor(m · N / M)`` (TinyBERT's
            ``g(m) = m · N / M``, Jiao et al. 2020; 3 of 6 layers read teacher layers 2, 4, 6);
            ``"last"``: the student's M layers read the teacher's last M (``N - M + m``);
            ``"final"``: only the last layer of each (MiniLM, DistilBERT's output states);
            ``"copied"``: student layer i reads the teacher layer it was copied from, ``source_layers[i]``
            (a student of :func:`kdkit.hf.shrink` keeping teacher layers 0, 2, 4 reads 0, 2, 4);
            ``"auto"``: ``"copied"`` when ``source_layers`` is given, else ``"uniform"``;
            a list of M teacher indices (one per student layer, ``-1`` skips that student layer);
            or a list of ``[student, teacher]`` pairs.
        source_layers: the teacher layers the student's layers were copied from, one per student layer, or
            None (a student not built from this teacher's layers).

    Raises:
        ValueError: an unknown strategy, indices out of range, a list of the wrong length, or ``"copied"``
            without ``source_layers``.
    """
    m, n = num_student, num_teacher
    if m < 1 or n < 1:
        raise ValueError(f"layer_map needs at least one layer in each model; got {m} student and {n} teacher layers")
    if spec == "auto":
        spec = "uniform" if source_layers is None else "copied"
    if spec == "copied":
        if source_layers is None:
            raise ValueError("layer_map 'copied' needs a student built from the teacher's layers (kdkit.hf.shrink "
                             "with layers=..., same teacher depth); give a list of teacher layers instead")
        if len(source_layers) != m:
            raise ValueError(f"layer_map 'copied': the student has {m} layers but records {len(source_layers)} "
                             f"source layers {list(source_layers)}")
        spec = [int(t) for t in source_layers]
    if spec == "uniform":
        return [(i, max(1, ((i + 1) * n) // m) - 1) for i in range(m)]
    if spec == "last":
        if m > n:
            raise ValueError(f"layer_map 'last' needs no more student layers ({m}) than teacher layers ({n})")
        return [(i, n - m + i) for i in range(m)]
    if spec == "final":
        return [(m - 1, n - 1)]
    if isinstance(spec, str):
        raise ValueError(f"layer_map must be 'auto', 'copied', 'uniform', 'last', 'final', a list of teacher layers "
                         f"or of [student, teacher] pairs; given {spec!r}")
    spec = list(spec)
    if spec and all(isinstance(p, (list, tuple)) for p in spec):
        pairs = [tuple(int(v) for v in p) for p in spec]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"layer_map pairs must be [student, teacher]; given {spec!r}")
    else:
        if len(spec) != m:
            raise ValueError(f"layer_map lists {len(spec)} teacher layers but the student has {m} layers "
                             f"(one entry per student layer, -1 to skip one)")
        pairs = [(i, int(t)) for i, t in enumerate(spec) if int(t) != -1]
    bad = [p for p in pairs if not (0 <= p[0] < m and 0 <= p[1] < n)]
    if bad or not pairs:
        raise ValueError(f"layer_map pairs {bad or spec} out of range: student layers are 0..{m - 1}, teacher "
                         f"layers 0..{n - 1}")
    return pairs


@dataclass(frozen=True)
class EncoderLayout:
    """Where a text model's encoder layers are, by module name, and their sizes.

    Attributes:
        prefix: the ``nn.ModuleList`` of encoder blocks (``hf.bert.encoder.layer``).
        num_layers: its length.
        qkv: the query/key/value projections' names relative to a block (``attention.self.query``, ...).
        width: hidden width of a block's output; ``heads``: attention heads; ``pad_token_id``: the pad id.
    """

    prefix: str
    num_layers: int
    qkv: Tuple[str, str, str]
    width: int
    heads: int
    pad_token_id: int

    def layer(self, i: int) -> str:
        return f"{self.prefix}.{i}"

    def projections(self, i: int) -> List[str]:
        return [f"{self.prefix}.{i}.{name}" for name in self.qkv]


def _find_qkv(block: nn.Module) -> Optional[Tuple[str, str, str]]:
    names = dict(block.named_modules())
    for name in names:
        parent, _, leaf = name.rpartition(".")
        for triple in _QKV_NAMES:
            if leaf == triple[0]:
                full = tuple(f"{parent}.{n}" if parent else n for n in triple)
                if all(isinstance(names.get(f), nn.Linear) for f in full):
                    return full
    return None


def _config_int(config, keys: Sequence[str]) -> Optional[int]:
    for k in keys:
        v = getattr(config, k, None)
        if isinstance(v, int):
            return v
    return None


def encoder_layout(model: nn.Module, who: str) -> EncoderLayout:
    """Find ``model``'s encoder blocks and sizes (see the module docstring).

    Raises:
        KdkitError: the model is not a text transformer of kdkit's contract (no ``pad_token_id``, no wrapped
            config, no block list with query/key/value projections).
    """
    kind = type(model).__name__
    pad = getattr(model, "pad_token_id", None)
    if not isinstance(pad, int):
        raise KdkitError(f"{who} {kind} has no integer pad_token_id: transformer methods need a text model of "
                         f"kdkit's contract ((B, L) token ids in, e.g. kdkit.hf.HFClassifier)")
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and (best is None or len(module) > len(best[1])):
            qkv = _find_qkv(module[0])
            if qkv is not None:
                best = (name, module, qkv)
    if best is None:
        raise KdkitError(f"{who} {kind} has no encoder layers with query/key/value projections (looked for a "
                         f"ModuleList of blocks holding {', '.join('/'.join(t) for t in _QKV_NAMES)}); hidden-state "
                         f"and attention methods need a transformer {who}; use kd for other students")
    config = getattr(getattr(model, "hf", model), "config", None)
    width = _config_int(config, ("hidden_size", "dim", "d_model"))
    heads = _config_int(config, ("num_attention_heads", "n_heads", "n_head"))
    if width is None or heads is None:
        raise KdkitError(f"{who} {kind}: cannot read the hidden width and head count from its config "
                         f"(hidden_size/dim/d_model, num_attention_heads/n_heads)")
    return EncoderLayout(best[0], len(best[1]), best[2], width, heads, pad)


def source_layers(student: nn.Module, num_student: int, num_teacher: int) -> Optional[List[int]]:
    """The teacher layers ``student``'s encoder layers were copied from, when it records them and they fit.

    :func:`kdkit.hf.shrink` sets ``source_layers`` (the kept teacher layers) and ``source_num_layers`` (the
    teacher's depth) on the student it builds by copying layers. They are used only when the student still has
    one layer per recorded source and the teacher being distilled has the recorded depth; otherwise None.
    """
    layers = getattr(student, "source_layers", None)
    depth = getattr(student, "source_num_layers", None)
    if layers is None or depth != num_teacher or len(layers) != num_student:
        return None
    return [int(t) for t in layers]


def make_projection(student_width: int, teacher_width: int, projection: str, where: str) -> nn.Module:
    """TinyBERT's learned ``W_h`` (a linear map student width -> teacher width), or the identity.

    ``projection``: ``auto`` (a map only when the widths differ), ``learned`` (always), ``none`` (never; the
    widths must agree).
    """
    if projection not in ("auto", "learned", "none"):
        raise ValueError(f"projection must be auto, learned or none; given {projection!r}")
    if projection == "learned" or (projection == "auto" and student_width != teacher_width):
        return nn.Linear(student_width, teacher_width)
    if student_width != teacher_width:
        raise ValueError(f"{where}: the student's hidden width {student_width} differs from the teacher's "
                         f"{teacher_width}; use projection: auto or learned")
    return nn.Identity()


class TransformerMethod(Method):
    """Base class of the transformer-encoder methods (see the module docstring for the combined loss).

    Subclasses call :meth:`use_hidden` and/or :meth:`use_attention` in their constructor (which declares the
    layers read) and implement :meth:`feature_loss`, returning the feature term and its named parts.

    Args:
        student, teacher: text models of kdkit's contract (``teacher.model`` is hooked).
        temperature: KD temperature T.
        alpha: weight of the KD term against cross-entropy on labelled samples, in [0, 1] (as in ``kd``).
        beta: weight of the feature term.
    """

    part = "feat"

    def __init__(self, student: nn.Module, teacher, temperature: float = 4.0, alpha: float = 0.9,
                 beta: float = 1.0):
        super().__init__(student, teacher)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0; got {beta}")
        model = getattr(teacher, "model", None)
        if not isinstance(model, nn.Module):
            raise KdkitError(f"{type(self).__name__} reads teacher layers and needs a teacher with one network "
                             f"(.model); got {type(teacher).__name__}")
        self.temperature, self.alpha, self.beta = temperature, alpha, beta
        self.s_layout = encoder_layout(student, "student")
        self.t_layout = encoder_layout(model, "teacher")
        if self.s_layout.pad_token_id != self.t_layout.pad_token_id:
            raise KdkitError(f"student and teacher pad ids differ ({self.s_layout.pad_token_id} vs "
                             f"{self.t_layout.pad_token_id}): hidden-state and attention methods compare the two "
                             f"models position by position and need one tokenisation of the batch")
        self.student_layers: List[str] = []
        self.teacher_layers: List[str] = []
        self.hidden_pairs: List[Tuple[int, int]] = []
        self.attention_pairs: List[Tuple[int, int]] = []

    # ------------------------------------------------------------------ declaring what is read
    def _declare(self, student_names: Sequence[str], teacher_names: Sequence[str]) -> None:
        self.student_layers = list(dict.fromkeys([*self.student_layers, *student_names]))
        self.teacher_layers = list(dict.fromkeys([*self.teacher_layers, *teacher_names]))

    def pairs(self, spec: LayerMapSpec) -> List[Tuple[int, int]]:
        """The layer pairs of ``spec`` (:func:`layer_map`); ``auto``/``copied`` read the student's record of the
        teacher layers it was copied from (:func:`source_layers`)."""
        return layer_map(self.s_layout.num_layers, self.t_layout.num_layers, spec,
                         source_layers(self.student, self.s_layout.num_layers, self.t_layout.num_layers))

    def use_hidden(self, pairs: List[Tuple[int, int]], projection: str) -> None:
        """Read the outputs of the paired blocks; ``self.projection`` maps student to teacher width."""
        self.hidden_pairs = pairs
        self.projection = make_projection(self.s_layout.width, self.t_layout.width, projection,
                                          type(self).__name__)
        self._declare([self.s_layout.layer(s) for s, _ in pairs], [self.t_layout.layer(t) for _, t in pairs])

    def use_attention(self, pairs: List[Tuple[int, int]], relation_heads: Optional[int]) -> None:
        """Read the query/key/value projections of the paired blocks; check the heads can be compared."""
        if relation_heads is not None:
            for who, lay in (("student", self.s_layout), ("teacher", self.t_layout)):
                if relation_heads < 1 or lay.width % relation_heads:
                    raise ValueError(f"relation_heads {relation_heads} does not divide the {who}'s width {lay.width}")
        elif self.s_layout.heads != self.t_layout.heads:
            raise ValueError(f"the student has {self.s_layout.heads} attention heads and the teacher "
                             f"{self.t_layout.heads}; they must match in number, or give relation_heads "
                             f"(MiniLMv2: both models' queries/keys/values re-split into that many heads)")
        self.relation_heads = relation_heads
        self.attention_pairs = pairs
        self._declare([n for s, _ in pairs for n in self.s_layout.projections(s)],
                      [n for _, t in pairs for n in self.t_layout.projections(t)])

    # ------------------------------------------------------------------ terms
    def mask(self, batch: Batch, student_seq: torch.Tensor, teacher_seq: torch.Tensor) -> torch.Tensor:
        """``x != pad`` (B, L'), cut to the length both models ran (they drop trailing all-pad columns)."""
        length = student_seq.shape[1]
        if teacher_seq.shape[1] != length:
            raise KdkitError(f"the student ran {length} positions and the teacher {teacher_seq.shape[1]} on the same "
                             f"batch; transformer methods need both to see the same token ids")
        return (batch["x"] != self.s_layout.pad_token_id)[:, :length]

    def hidden_states(self, outputs: Outputs, s: int, t: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return (outputs.features[self.s_layout.layer(s)], outputs.teacher_features[self.t_layout.layer(t)])

    def hidden_term(self, batch: Batch, outputs: Outputs) -> torch.Tensor:
        """Σ over hidden pairs of the masked MSE between projected student and teacher states."""
        total = 0.0
        for s, t in self.hidden_pairs:
            hs, ht = self.hidden_states(outputs, s, t)  # (B, L', D_s), (B, L', D_t)
            total = total + masked_hidden_mse(self.projection(hs), ht, self.mask(batch, hs, ht))
        return total

    def qkv(self, outputs: Outputs, s: int, t: int):
        sq = [outputs.features[n] for n in self.s_layout.projections(s)]
        tq = [outputs.teacher_features[n] for n in self.t_layout.projections(t)]
        return sq, tq

    def attention_term(self, batch: Batch, outputs: Outputs, values: bool = False):
        """Σ over attention pairs of ``KL(A_t ‖ A_s)`` (and, with ``values``, of MiniLM's value relation)."""
        at, vr = 0.0, 0.0
        heads = (self.s_layout.heads, self.t_layout.heads, self.relation_heads)
        for s, t in self.attention_pairs:
            (sq, sk, sv), (tq, tk, tv) = self.qkv(outputs, s, t)
            mask = self.mask(batch, sq, tq)
            at = at + attention_kl_loss(sq, sk, tq, tk, mask, *heads)
            if values:
                vr = vr + value_relation_loss(sv, tv, mask, *heads)
        return at, vr

    def feature_loss(self, batch: Batch, outputs: Outputs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError  # pragma: no cover

    def compute_loss(self, batch: Batch, outputs: Outputs) -> Dict[str, torch.Tensor]:
        logits, t_logits = outputs.logits, outputs.teacher_logits  # (B, C) each

        def soft(per_sample: bool) -> torch.Tensor:
            if per_sample:
                return kd_per_sample(logits, t_logits, self.temperature)
            return kd_loss(logits, t_logits, self.temperature)

        out = mix_with_labels(logits, soft, batch.get("y"), self.alpha, "kd")
        feature, parts = self.feature_loss(batch, outputs)
        out["loss"] = out["loss"] + self.beta * feature
        out[self.part] = feature.detach()
        out.update({k: v.detach() for k, v in parts.items()})
        return out

    def extra_repr(self) -> str:
        return (f"hidden pairs={self.hidden_pairs}, attention pairs={self.attention_pairs}, alpha={self.alpha}, "
                f"temperature={self.temperature}, beta={self.beta}")
