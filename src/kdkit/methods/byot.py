"""Deep self-distillation ("Be Your Own Teacher"): the network's deepest output teaches auxiliary heads.

Zhang, Song, Gao, Chen, Bao & Ma, "Be Your Own Teacher: Improve the Performance of Convolutional
Neural Networks via Self Distillation", ICCV 2019.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import kd_loss, masked_cross_entropy
from .base import METHODS, Batch, Method, Outputs
from .hooks import INPUT_SUFFIX, capture, embedding_layer, feature_maps_by_resolution, trace


def self_distillation_loss(aux_logits: List[torch.Tensor], final_logits: torch.Tensor,
                           aux_features: List[torch.Tensor], final_feature: Optional[torch.Tensor],
                           labels: Optional[torch.Tensor], temperature: float = 3.0, alpha: float = 0.3,
                           feature_weight: float = 0.03) -> Dict[str, torch.Tensor]:
    """BYOT objective (Zhang et al. 2019, sec. 3.2): three sources of supervision for each shallow head.

    ``loss = CE(z_C, y) + Σ_i [(1-α)·CE(z_i, y) + α·T²·KL(p_C^T ‖ p_i^T) + λ·‖f_i − F_C‖²]``

    where ``z_C`` are the network's own (deepest) logits and ``F_C`` its deepest feature, both held
    constant (detached) as targets for the shallow heads ``i``; ``f_i`` is head i's bottleneck feature
    (same shape as ``F_C``); ``‖·‖²`` is the mean squared error.

    Args:
        aux_logits: N tensors (B, C): the auxiliary heads' logits.
        final_logits: (B, C) the network's logits.
        aux_features: N tensors (B, D): the heads' bottleneck features (ignored when ``final_feature`` is None).
        final_feature: (B, D) the deepest feature, or None to drop the feature term.
        labels: (B,) classes (-1 = unlabelled) or None.
        temperature: T of the self-distillation KL.
        alpha: weight of KL against CE for the heads, in [0, 1].
        feature_weight: λ.

    Returns:
        ``{"loss", "ce", "aux_ce", "aux_kl", "feat"}`` (scalars; the parts are summed over heads).
    """
    zero = final_logits.new_zeros(())
    ce = masked_cross_entropy(final_logits, labels) if labels is not None else zero
    target = final_logits.detach()
    aux_ce, aux_kl, feat = zero, zero, zero
    for i, z in enumerate(aux_logits):
        aux_kl = aux_kl + kd_loss(z, target, temperature)
        if labels is not None:
            aux_ce = aux_ce + masked_cross_entropy(z, labels)
        if final_feature is not None:
            feat = feat + F.mse_loss(aux_features[i], final_feature.detach())
    if labels is None:  # an unlabelled batch: the heads learn from the deepest output alone
        loss = aux_kl + feature_weight * feat
    else:
        loss = ce + (1 - alpha) * aux_ce + alpha * aux_kl + feature_weight * feat
    return {"loss": loss, "ce": ce, "aux_ce": aux_ce, "aux_kl": aux_kl, "feat": feat}


class AuxHead(nn.Module):
    """Bottleneck + classifier on an intermediate feature.

    A (B, C, H, W) map goes through a 1x1 conv to ``dim`` channels, BN, ReLU and global average pooling;
    a (B, C) vector through a linear layer and ReLU. Either way the result ``f`` (B, dim) is matched to the
    deepest feature, and a linear layer maps it to the logits.
    """

    def __init__(self, in_shape: Sequence[int], dim: int, num_classes: int):
        super().__init__()
        if len(in_shape) == 4:
            self.bottleneck = nn.Sequential(nn.Conv2d(in_shape[1], dim, 1, bias=False), nn.BatchNorm2d(dim),
                                            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        elif len(in_shape) == 2:
            self.bottleneck = nn.Sequential(nn.Linear(in_shape[1], dim), nn.ReLU())
        else:
            raise ValueError(f"an auxiliary head needs a (B, C, H, W) or (B, C) feature; got shape {tuple(in_shape)}")
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor):
        f = self.bottleneck(x)  # (B, dim)
        return f, self.classifier(f)


def default_aux_layers(student: nn.Module, x: torch.Tensor) -> List[str]:
    """Stage outputs at every spatial resolution except the deepest one (``layer1``, ``layer2`` of a ResNet)."""
    by_size = feature_maps_by_resolution(trace(student, x))
    if len(by_size) < 2:
        return []
    deepest = min(by_size, key=lambda hw: hw[0] * hw[1])
    return [name for size, name in sorted(by_size.items(), key=lambda kv: -kv[0][0] * kv[0][1]) if size != deepest]


@METHODS.register("byot")
class BYOT(Method):
    """Deep self-distillation (Be Your Own Teacher, Zhang et al. 2019): no external teacher.

    Auxiliary heads (:class:`AuxHead`) read intermediate features of the student itself, captured by
    forward hooks on the named modules (the student's code is not changed). The student's own
    final output and deepest feature teach them (:func:`self_distillation_loss`); their gradients
    also shape the student's early layers, which is the point. The heads are submodules of the
    method, so they are trained, but they are not part of ``method.student``: the saved and exported
    model is the unchanged architecture. Per-head training accuracies are logged as ``head{i}_acc``.

    Args:
        student: the network trained.
        teacher: ignored.
        layers: module names to attach heads to (default: the stage output at each spatial resolution
            except the deepest, found by a dry run).
        feature_layer: the deepest feature the heads' bottlenecks are matched to (default ``auto``: the
            input of the last linear layer, e.g. ``head:input``); ``none`` drops the feature term.
        temperature, alpha, feature_weight: see :func:`self_distillation_loss` (defaults T=3, α=0.3,
            λ=0.03 are our untuned choices in the range the paper's experiments use).
        example_batch: one batch (injected by the API) for the dry run that sizes the heads.
    """

    needs_teacher = False

    def __init__(self, student: nn.Module, teacher=None, layers: Optional[Sequence[str]] = None,
                 feature_layer: Optional[str] = "auto", temperature: float = 3.0, alpha: float = 0.3,
                 feature_weight: float = 0.03, example_batch: Optional[Batch] = None):
        super().__init__(student, None)
        if example_batch is None:
            raise ValueError("byot needs an example batch to size its heads (use kdkit.distill or a config)")
        if temperature <= 0 or not 0 <= alpha <= 1 or feature_weight < 0:
            raise ValueError(f"need temperature > 0, 0 <= alpha <= 1, feature_weight >= 0; "
                             f"got {temperature}, {alpha}, {feature_weight}")
        self.temperature, self.alpha, self.feature_weight = temperature, alpha, feature_weight
        device = next(student.parameters()).device
        x = example_batch["x"][:2].to(device)
        if feature_layer == "auto":
            feature_layer = embedding_layer(trace(student, x))
        elif feature_layer in ("none", ""):
            feature_layer = None
        self.layers = list(layers) if layers is not None else default_aux_layers(student, x)
        if not self.layers:
            raise ValueError("byot found no intermediate feature maps; give layers: [module names] "
                             "(see `kdkit inspect`)")
        self.feature_layer = feature_layer
        was = student.training
        student.eval()
        with torch.no_grad(), capture(student, self._names(), "student") as feats:
            logits = student(x)
        student.train(was)
        dim = feats[feature_layer].shape[1] if feature_layer else 64
        if feature_layer and feats[feature_layer].dim() != 2:
            raise ValueError(f"byot feature_layer {feature_layer!r} must give a (B, D) feature; got shape "
                             f"{tuple(feats[feature_layer].shape)} (e.g. use head{INPUT_SUFFIX})")
        self.heads = nn.ModuleList(AuxHead(feats[n].shape, dim, logits.shape[1]) for n in self.layers).to(device)
        self.student_layers = self._names()  # declared: captured by forward_pass (or once by a combo for all parts)

    def _names(self) -> List[str]:
        return self.layers + ([self.feature_layer] if self.feature_layer else [])

    def compute_loss(self, batch: Batch, outputs: Outputs) -> Dict[str, torch.Tensor]:
        logits, feats = outputs.logits, outputs.features  # (B, C); the declared layers by name
        aux = [head(feats[n]) for head, n in zip(self.heads, self.layers)]  # [(f_i, z_i)]
        final_feature = feats[self.feature_layer] if self.feature_layer else None
        y = batch.get("y")
        out = self_distillation_loss([z for _, z in aux], logits, [f for f, _ in aux], final_feature, y,
                                     self.temperature, self.alpha, self.feature_weight)
        result = {k: (v if k == "loss" else v.detach()) for k, v in out.items()}
        result["logits"] = logits
        if y is not None and not y.is_floating_point():
            mask = y >= 0
            for i, (_, z) in enumerate(aux):
                result[f"head{i}_acc"] = ((z.argmax(1) == y) & mask).sum() / mask.sum().clamp_min(1)
        return result
