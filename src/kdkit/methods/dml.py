"""Deep mutual learning: several students teach each other, no pretrained teacher."""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..losses import kd_loss, masked_cross_entropy
from .base import METHODS, Batch, Method

PeerSpec = Union[int, Sequence[Union[str, Dict[str, Any], nn.Module]]]


def reinitialise(model: nn.Module) -> nn.Module:
    """Fresh random weights for every submodule that defines ``reset_parameters`` (in place)."""
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model


def mutual_loss(logits: List[torch.Tensor], labels: Optional[torch.Tensor], temperature: float = 1.0,
                kl_weight: float = 1.0) -> Dict[str, Any]:
    """Deep mutual learning objective (Zhang, Xiang, Hospedales & Lu, CVPR 2018, eq. 10-11).

    For each of K peers: ``L_k = CE(z_k, y) + kl_weight / (K-1) · Σ_{l≠k} T²·KL(p_l^T ‖ p_k^T)``,
    the other peers' distributions being constants (detached) for peer k, so one backward pass of
    ``Σ_k L_k`` gives every peer exactly the gradient of its own objective (the paper alternates
    updates; the simultaneous update is the common implementation).

    Args:
        logits: K tensors of shape (B, C).
        labels: (B,) classes (-1 = unlabelled) or None for an unlabelled batch.
        temperature: softening temperature (the paper uses 1).
        kl_weight: weight of the mimicry term.

    Returns:
        ``{"loss": scalar, "ce": [K scalars] or None, "kl": [K scalars]}``.
    """
    k = len(logits)
    if k < 2:
        raise ValueError("mutual learning needs at least two peers")
    kls, ces, total = [], [], 0.0
    for i, z in enumerate(logits):
        kl = sum(kd_loss(z, other.detach(), temperature) for j, other in enumerate(logits) if j != i) / (k - 1)
        loss_i = kl_weight * kl
        kls.append(kl)
        if labels is not None:
            ce = masked_cross_entropy(z, labels)
            ces.append(ce)
            loss_i = loss_i + ce
        total = total + loss_i
    return {"loss": total, "ce": ces or None, "kl": kls}


@METHODS.register("dml")
class DML(Method):
    """Deep mutual learning (Zhang et al. 2018): two or more students trained together from scratch.

    The peers are submodules of the method, so the one optimiser trains all of them;
    ``method.student`` (the model that is evaluated, saved and exported) is the first peer. Each
    peer's cross-entropy, mimicry loss and training accuracy are logged as ``peer{k}_ce``,
    ``peer{k}_kl``, ``peer{k}_acc``; :meth:`evaluate_peers` measures every peer on a dataset.

    Args:
        student: the first peer (the one kept).
        teacher: ignored (mutual learning needs no pretrained teacher).
        peers: the other peers: a number of fresh copies of the student's architecture (re-initialised),
            or a list of models, zoo names, or ``{name: ..., **options}`` specs (built with the student's
            number of classes and the input shape of ``example_batch``).
        temperature: softening temperature of the mimicry term.
        kl_weight: weight of the mimicry term against the cross-entropy.
        example_batch: one batch (injected by the API), needed to build peers given by name.
    """

    needs_teacher = False

    def __init__(self, student: nn.Module, teacher=None, peers: PeerSpec = 1, temperature: float = 1.0,
                 kl_weight: float = 1.0, example_batch: Optional[Batch] = None):
        super().__init__(student, None)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0; got {kl_weight}")
        self.temperature, self.kl_weight = temperature, kl_weight
        self.peers = nn.ModuleList(self._build_peers(peers, example_batch))
        if len(self.peers) < 1:
            raise ValueError("dml needs at least one peer besides the student (peers >= 1)")

    def _build_peers(self, peers: PeerSpec, example_batch: Optional[Batch]) -> List[nn.Module]:
        if isinstance(peers, int):
            return [reinitialise(copy.deepcopy(self.student)) for _ in range(peers)]
        built = []
        for spec in peers:
            if isinstance(spec, nn.Module):
                built.append(spec)
                continue
            if example_batch is None:
                raise ValueError("peers given by name need an example batch (use kdkit.distill or a config)")
            from ..models import create_model

            options = {"name": spec} if isinstance(spec, str) else dict(spec)
            name = options.pop("name", None)
            if name is None:
                raise ValueError(f"peer spec {spec!r} has no name")
            x = example_batch["x"][:1]
            with torch.no_grad():
                was = self.student.training
                self.student.eval()
                num_classes = self.student(x.to(next(self.student.parameters()).device)).shape[1]
                self.student.train(was)
            built.append(create_model(name, num_classes=num_classes, input_shape=tuple(x.shape[1:]), **options))
        return built

    @property
    def models(self) -> List[nn.Module]:
        """All peers, the student first."""
        return [self.student, *self.peers]

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        logits = [m(batch["x"]) for m in self.models]  # K x (B, C)
        y = batch.get("y")
        out = mutual_loss(logits, y, self.temperature, self.kl_weight)
        result: Dict[str, torch.Tensor] = {"loss": out["loss"], "logits": logits[0]}
        result["kl"] = torch.stack(out["kl"]).mean().detach()
        if out["ce"] is not None:
            result["ce"] = torch.stack(out["ce"]).mean().detach()
        for k, z in enumerate(logits):
            result[f"peer{k}_kl"] = out["kl"][k].detach()
            if out["ce"] is not None:
                result[f"peer{k}_ce"] = out["ce"][k].detach()
                mask = y >= 0
                result[f"peer{k}_acc"] = ((z.argmax(1) == y) & mask).sum() / mask.sum().clamp_min(1)
        return result

    def evaluate_peers(self, data, batch_size: int = 512) -> List[Dict[str, float]]:
        """Accuracy (and NLL, ECE) of every peer on ``data``, the student first."""
        from ..evaluation.metrics import predict, quality

        return [quality(**{"outputs": p["outputs"], "y": p.get("y")})
                for p in (predict(m, data, batch_size) for m in self.models)]
