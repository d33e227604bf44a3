"""Several frozen teachers acting as one: per-sample weighting and the ensemble's soft targets."""

from __future__ import annotations

import torch
from torch import nn

from .teacher import Teacher


def ensemble_weights(logits: "list[torch.Tensor]", prior: torch.Tensor, weighting: str = "fixed") -> torch.Tensor:
    """Per-sample weights of K teachers, shape (B, K), each row summing to 1.

    - ``fixed``: ``a_k = w_k`` (the prior, normalised), the same for every sample.
    - ``entropy``: ``a_k(x) ∝ w_k · exp(-H(p_k(x)))`` with ``H`` the entropy (nats) of teacher k's
      softmax: confident (low-entropy) teachers count more on that sample. This follows the idea of
      entropy-based adaptive teacher weighting (Kwon et al. 2020, "Adaptive knowledge distillation
      based on entropy", ICASSP), with a softmax over ``-H`` as the normaliser.
    - ``max_prob``: ``a_k(x) ∝ w_k · max_c p_k(c|x)``: weight proportional to teacher k's top-class
      probability (confidence-aware weighting in the spirit of Zhang et al. 2022, CA-MKD, which uses
      label-based confidence; this variant needs no labels).

    Args:
        logits: K tensors of shape (B, C), one per teacher.
        prior: (K,) non-negative fixed weights (normalised here).
        weighting: ``fixed``, ``entropy`` or ``max_prob``.
    """
    prior = prior / prior.sum()
    k, b = len(logits), logits[0].shape[0]
    if weighting == "fixed":
        return prior.to(logits[0].dtype).expand(b, k)
    log_p = torch.stack([z.float().log_softmax(dim=-1) for z in logits], dim=1)  # (B, K, C)
    if weighting == "entropy":
        entropy = -(log_p.exp() * log_p).sum(dim=-1)  # (B, K)
        score = torch.log(prior).to(entropy) - entropy
        return score.softmax(dim=1)
    if weighting == "max_prob":
        conf = log_p.exp().amax(dim=-1) * prior.to(log_p)  # (B, K)
        return conf / conf.sum(dim=1, keepdim=True)
    raise ValueError(f"unknown ensemble weighting {weighting!r}; use fixed, entropy or max_prob")


class EnsembleModel(nn.Module):
    """K teacher networks behind one forward: returns the logits of their weighted ensemble.

    With ``combine="probs"`` (default) the soft targets are averaged, not the logits: the output is
    ``T · log Σ_k a_k softmax(z_k / T)``, chosen so that ``softmax(output / T)`` equals the weighted
    average of the teachers' soft targets at temperature ``T`` exactly (use the distillation method's
    temperature). ``combine="logits"`` returns ``Σ_k a_k z_k``. Members may have different
    architectures; they must output the same number of classes. Submodules are named
    ``members.0``, ``members.1``, ... (for feature hooks).
    """

    def __init__(self, members: "list[nn.Module]", weights=None, weighting: str = "fixed",
                 temperature: float = 1.0, combine: str = "probs"):
        super().__init__()
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one teacher")
        if weights is None:
            weights = [1.0] * len(members)
        if len(weights) != len(members):
            raise ValueError(f"{len(weights)} teacher weights given for {len(members)} teachers")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"teacher weights must be >= 0 with a positive sum; got {list(weights)}")
        if weighting not in ("fixed", "entropy", "max_prob"):
            raise ValueError(f"unknown ensemble weighting {weighting!r}; use fixed, entropy or max_prob")
        if combine not in ("probs", "logits"):
            raise ValueError(f"unknown ensemble combine {combine!r}; use probs or logits")
        if temperature <= 0:
            raise ValueError(f"ensemble temperature must be > 0; got {temperature}")
        self.members = nn.ModuleList(members)
        self.register_buffer("prior", torch.tensor([float(w) for w in weights]))
        self.weighting, self.temperature, self.combine = weighting, float(temperature), combine

    def member_logits(self, x: torch.Tensor) -> "list[torch.Tensor]":
        return [m(x) for m in self.members]

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K) per-sample teacher weights for inputs ``x``."""
        return ensemble_weights(self.member_logits(x), self.prior, self.weighting)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zs = self.member_logits(x)  # K x (B, C)
        a = ensemble_weights(zs, self.prior, self.weighting)  # (B, K)
        if self.combine == "logits":
            return torch.einsum("bk,kbc->bc", a.to(zs[0].dtype), torch.stack(zs))
        t = self.temperature
        log_p = torch.stack([(z.float() / t).log_softmax(dim=-1) for z in zs], dim=1)  # (B, K, C)
        # log Σ_k a_k p_k computed in log space, so tiny probabilities never become log(0).
        return t * torch.logsumexp(log_p + torch.log(a.float()).unsqueeze(-1), dim=1)


class TeacherEnsemble(Teacher):
    """Several frozen teachers (any architectures, any checkpoints) acting as one :class:`Teacher`.

    ``ensemble(batch)`` returns the ensemble's logits (see :class:`EnsembleModel`), so every
    logit-based method works unchanged; ``ensemble.model`` is the :class:`EnsembleModel`, so
    evaluation (accuracy, agreement) measures the ensemble; ``ensemble.members`` are the networks.

    Args:
        teachers: trained models or :class:`Teacher` objects.
        weights: fixed prior weights, one per teacher (default: equal).
        weighting: ``fixed``, ``entropy`` or ``max_prob`` (per-sample confidence weights, see
            :func:`ensemble_weights`).
        temperature: the temperature whose soft targets are averaged (set it to the method's).
        combine: ``probs`` (average soft targets) or ``logits`` (average logits).
    """

    def __init__(self, teachers, weights=None, weighting: str = "fixed", temperature: float = 1.0,
                 combine: str = "probs"):
        members = [t.model if isinstance(t, Teacher) else t for t in teachers]
        for m in members:
            if not isinstance(m, nn.Module):
                raise TypeError(f"each teacher must be a torch.nn.Module or kdkit.Teacher; got {type(m).__name__}")
        super().__init__(EnsembleModel(members, weights, weighting, temperature, combine))

    @property
    def members(self) -> "list[nn.Module]":
        return list(self.model.members)
