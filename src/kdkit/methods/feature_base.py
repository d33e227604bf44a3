"""Shared machinery of the methods that read intermediate features.

A :class:`FeatureMethod` picks (or is given) layer names of the student and of the
teacher, checks them with one dry-run forward of the ``example_batch`` that
:func:`kdkit.api.build_method` supplies, records the feature shapes (so
subclasses can size connectors), and on every step runs both networks with
forward hooks (:mod:`kdkit.methods.hooks`) and returns the student's logits, the
student's features, the teacher's logits and the teacher's features.

Every feature method combines its loss the same documented way::

    loss = ce_weight · CE(student, y) + kd_weight · KD_T(student, teacher) + beta · feature_loss

(``ce_weight = 1``, ``kd_weight = 0`` by default, as in the papers, which add
their term to the cross-entropy). On an unlabelled transfer set give
``kd_weight > 0``, or the classifier head gets no signal. Every part is returned
under its own name for logging.

Default layers (``student_layer`` / ``teacher_layer`` left empty):

- ``map`` methods (AT, NST, attention-weighted): the last feature map before
  pooling, i.e. the last module to return a (B, C, H, W) output with H·W > 1
  (``features`` in the zoo's CNNs, ``layer3`` in ``resnet_small``); AT takes one
  pair per spatial size the two networks share.
- ``embedding`` methods (SP, PKT, RKD, CC, CRD): the input of the last
  ``nn.Linear`` (``head:input``), the embedding the classifier reads.
- ``any`` (FitNets): the last feature maps when both networks have them, else
  the embeddings.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import KdkitError
from ..losses import kd_loss
from .base import Batch, Method, Outputs
from .hooks import LayerRecord, embedding_layer, feature_maps_by_resolution, get_module, last_feature_map, trace

LayerSpec = Union[str, Sequence[str], None]


def _as_list(spec: LayerSpec) -> Optional[List[str]]:
    if spec is None:
        return None
    if isinstance(spec, str):
        return [spec]
    return [str(s) for s in spec]


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _shape(records: Dict[str, LayerRecord], spec: str, who: str, model: nn.Module) -> Tuple[int, ...]:
    base, _, suffix = spec.partition(":")
    get_module(model, spec, who)  # an unknown name fails here, listing the existing ones
    rec = records.get(base)
    if rec is None:
        raise KdkitError(f"{who} layer {base!r} exists but never ran during a dry-run forward pass (an unused or "
                         f"skipped branch); pick a layer that forward() calls (see `kdkit inspect`)")
    shape = rec.input_shape if suffix == "input" else rec.shape
    if shape is None:
        raise KdkitError(f"{who} layer {spec!r} ({rec.type}) has no tensor {'input' if suffix else 'output'}")
    return shape


class FeatureMethod(Method):
    """Base class of feature-reading methods (see the module docstring for defaults and the combined loss).

    Subclasses set ``feature_kind`` (``"map"``, ``"embedding"`` or ``"any"``), ``part`` (the name of their
    loss in the output dict) and implement :meth:`feature_loss`. A subclass takes its own options and forwards
    the rest (``**kwargs``) here; option checking follows that chain, so every option below stays checked.
    The layers found are declared as ``student_layers`` / ``teacher_layers`` (so a teacher cache for the method
    holds those layers too, and ``combo`` captures them in its one forward).

    Args:
        student, teacher: as for every method (``teacher.model`` is hooked).
        student_layer, teacher_layer: module names (or lists of equal length, paired in order); empty picks
            the defaults described above. Suffix ``:input`` reads a module's input (``head:input``).
        example_batch: one training batch for the dry run (supplied by ``kdkit.api.build_method``).
        beta: weight of the feature loss.
        ce_weight: weight of the cross-entropy on labelled samples.
        kd_weight: weight of Hinton's KD term (0 = off).
        temperature: KD temperature.
    """

    feature_kind = "any"
    per_resolution = False
    part = "feat"

    def __init__(self, student: nn.Module, teacher, student_layer: LayerSpec = None,
                 teacher_layer: LayerSpec = None, example_batch: Optional[Batch] = None, beta: float = 1.0,
                 ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0):
        super().__init__(student, teacher)
        name = type(self).__name__
        if example_batch is None or "x" not in example_batch:
            raise KdkitError(f"{name} needs example_batch (one training batch dict with 'x') to find layers and size "
                             f"connectors; kdkit.api.build_method / distill supply it")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        if min(beta, ce_weight, kd_weight) < 0:
            raise ValueError("beta, ce_weight and kd_weight must be >= 0")
        if not isinstance(getattr(teacher, "model", None), nn.Module):
            raise KdkitError(f"{name} reads teacher features and needs a teacher with one network (.model); "
                             f"got {type(teacher).__name__}")
        self.beta, self.ce_weight, self.kd_weight, self.temperature = beta, ce_weight, kd_weight, temperature
        x = example_batch["x"]
        s_rec = {r.name: r for r in trace(student, x.to(_device_of(student)))}
        t_rec = {r.name: r for r in trace(self.teacher_model, x.to(_device_of(self.teacher_model)))}
        s_layers, t_layers = self._resolve_layers(_as_list(student_layer), _as_list(teacher_layer), s_rec, t_rec)
        self.student_layers: List[str] = s_layers
        self.teacher_layers: List[str] = t_layers
        self.student_shapes = [_shape(s_rec, n, "student", student) for n in s_layers]
        self.teacher_shapes = [_shape(t_rec, n, "teacher", self.teacher_model) for n in t_layers]
        if self.feature_kind == "map":
            for who, layers, shapes in (("student", s_layers, self.student_shapes),
                                        ("teacher", t_layers, self.teacher_shapes)):
                for n, shp in zip(layers, shapes):
                    if len(shp) != 4:
                        raise KdkitError(f"{name} needs (B, C, H, W) feature maps; {who} layer {n!r} gives "
                                         f"{tuple(shp)}; pick conv layers (see `kdkit inspect`)")

    @property
    def teacher_model(self) -> nn.Module:
        # A property, not an attribute: assigning a Module would register the teacher as a submodule
        # (trained, saved and switched to train mode with the method).
        return self.teacher.model

    # ------------------------------------------------------------------ layers
    def _resolve_layers(self, s: Optional[List[str]], t: Optional[List[str]], s_rec: Dict[str, LayerRecord],
                        t_rec: Dict[str, LayerRecord]) -> Tuple[List[str], List[str]]:
        name = type(self).__name__
        if s is not None or t is not None:
            if s is None or t is None:
                raise KdkitError(f"{name}: give both student_layer and teacher_layer (or neither, for the defaults)")
            if len(s) != len(t) or not s:
                raise KdkitError(f"{name}: student_layer has {len(s)} names but teacher_layer has {len(t)}; "
                                 f"they are paired in order")
            return s, t
        srs, trs = list(s_rec.values()), list(t_rec.values())
        kind = self.feature_kind
        if kind in ("map", "any"):
            s_map, t_map = last_feature_map(srs), last_feature_map(trs)
            if s_map and t_map:
                if self.per_resolution:
                    s_by, t_by = feature_maps_by_resolution(srs), feature_maps_by_resolution(trs)
                    shared = sorted(set(s_by) & set(t_by), key=lambda hw: -hw[0] * hw[1])
                    if shared:
                        return [s_by[k] for k in shared], [t_by[k] for k in shared]
                return [s_map], [t_map]
            if kind == "map":
                who, model = ("student", self.student) if not s_map else ("teacher", self.teacher_model)
                raise KdkitError(f"{name} needs (B, C, H, W) feature maps but the {who} ({type(model).__name__}) "
                                 f"produces none; give student_layer and teacher_layer (see `kdkit inspect`), "
                                 f"or use an embedding method (sp, pkt, rkd, cc, crd)")
        s_emb, t_emb = embedding_layer(srs), embedding_layer(trs)
        if not s_emb or not t_emb:
            who, model = ("student", self.student) if not s_emb else ("teacher", self.teacher_model)
            raise KdkitError(f"{name}: no default layer for the {who} ({type(model).__name__}): it has no nn.Linear "
                             f"head; give student_layer and teacher_layer (see `kdkit inspect`)")
        return [s_emb], [t_emb]

    # ------------------------------------------------------------------ forward pieces
    def run(self, batch: Batch) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor, List[torch.Tensor]]:
        """Student and teacher forward passes with hooks: ``(logits, features, teacher_logits, teacher_features)``,
        the features in the order of ``student_layers`` / ``teacher_layers``.

        The teacher runs under inference mode; only its captured features and outputs are copied out of it.
        """
        out = self.forward_pass(batch)
        return out.logits, *self.paired(out)

    def paired(self, outputs: Outputs) -> Tuple[List[torch.Tensor], torch.Tensor, List[torch.Tensor]]:
        """``(features, teacher_logits, teacher_features)`` of this method's layer pairs, in order."""
        return ([outputs.features[n] for n in self.student_layers], outputs.teacher_logits,
                [outputs.teacher_features[n] for n in self.teacher_layers])

    def combine(self, batch: Batch, logits: torch.Tensor, t_logits: torch.Tensor,
                feature_loss: torch.Tensor, parts: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """``ce_weight · CE + kd_weight · KD + beta · feature_loss`` and every part, detached, for logging."""
        out: Dict[str, torch.Tensor] = {self.part: feature_loss.detach()}
        loss = self.beta * feature_loss
        if self.kd_weight > 0:
            kd = kd_loss(logits, t_logits, self.temperature)
            loss = loss + self.kd_weight * kd
            out["kd"] = kd.detach()
        loss = self.add_ce(loss, out, logits, batch, self.ce_weight)
        out.update({k: v.detach() for k, v in (parts or {}).items()})
        out["loss"] = loss
        out["logits"] = logits
        return out

    def feature_loss(self, student_features: List[torch.Tensor], teacher_features: List[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def compute_loss(self, batch: Batch, outputs: Outputs) -> Dict[str, torch.Tensor]:
        feats, t_logits, t_feats = self.paired(outputs)
        return self.combine(batch, outputs.logits, t_logits, self.feature_loss(feats, t_feats))

    def extra_repr(self) -> str:
        pairs = ", ".join(f"{s}->{t}" for s, t in zip(self.student_layers, self.teacher_layers))
        return f"layers=[{pairs}], beta={self.beta}, ce_weight={self.ce_weight}, kd_weight={self.kd_weight}"
