"""Magnitude pruning: unstructured (single weights zeroed) and structured (whole channels/neurons removed).

- :func:`prune_unstructured` zeroes the smallest-magnitude weights across every Linear/Conv2d layer at once
  (global magnitude pruning, Han et al. 2015, "Learning both Weights and Connections for Efficient Neural
  Networks") with ``torch.nn.utils.prune`` and makes it permanent. The tensors keep their shapes: a dense file
  is no smaller and dense kernels are no faster; only the count of non-zero weights drops.
- :func:`prune_structured` removes whole output channels of convolutions and neurons of linear layers, ranked
  by the L2 norm of their weights (Li et al. 2017, "Pruning Filters for Efficient ConvNets"), together with
  everything that depends on them (the next layer's inputs, BatchNorm statistics, residual partners). The
  dependency graph comes from ``torch-pruning`` (Fang et al. 2023, "DepGraph: Towards Any Structural
  Pruning"). The model really gets smaller and faster. The layer that produces the model's output is never
  pruned, so the number of classes stays.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import KdkitError

PRUNABLE = (nn.Linear, nn.Conv2d)


def prunable_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every Linear and Conv2d layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE)]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def prune_unstructured(model: nn.Module, sparsity: Optional[float] = None,
                       target_parameters: Optional[int] = None, permanent: bool = True) -> Dict[str, float]:
    """Zero the smallest weights of all Linear/Conv2d layers (global L1 magnitude), in place and permanently.

    Args:
        model: the network; its weights are modified.
        sparsity: fraction of those weights to zero, in (0, 1).
        target_parameters: alternatively, how many non-zero parameters (in the whole model) should remain.
        permanent: bake the zeros into the weights now. With False the pruning masks stay (as
            ``torch.nn.utils.prune`` forward pre-hooks) so that recovery training keeps pruned weights at
            zero; call :func:`make_permanent` afterwards.

    Returns:
        ``{"sparsity": achieved fraction of zero weights in the pruned layers, "nonzero": non-zero parameters}``.
    """
    from torch.nn.utils import prune

    layers = prunable_layers(model)
    if not layers:
        raise KdkitError(f"{type(model).__name__} has no Linear or Conv2d layer to prune")
    total = sum(m.weight.numel() for _, m in layers)
    if target_parameters is not None:
        others = count_nonzero(model) - sum(int(torch.count_nonzero(m.weight.detach())) for _, m in layers)
        keep = target_parameters - others
        if keep <= 0:
            raise KdkitError(f"target_parameters={target_parameters} is below the {others} parameters outside the "
                             "prunable weights (biases, norms); choose a larger target")
        sparsity = 1.0 - keep / total
    if sparsity is None or not 0.0 < sparsity < 1.0:
        raise KdkitError(f"pruning sparsity must be in (0, 1); got {sparsity}")
    params = [(m, "weight") for _, m in layers]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=int(round(sparsity * total)))
    if permanent:
        make_permanent(model)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    return {"sparsity": zeros / total, "nonzero": count_nonzero(model)}


def make_permanent(model: nn.Module) -> None:
    """Bake every pruning mask into its weight: no ``weight_orig``/``weight_mask`` or hooks remain."""
    from torch.nn.utils import prune

    for m in model.modules():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")


def _output_layer(model: nn.Module) -> nn.Module:
    layers = prunable_layers(model)
    if not layers:
        raise KdkitError(f"{type(model).__name__} has no Linear or Conv2d layer to prune")
    return layers[-1][1]


def _tp():
    try:
        import torch_pruning
    except ImportError:  # pragma: no cover - depends on the environment
        raise KdkitError("structured pruning needs torch-pruning: pip install 'kdkit[compress]'") from None
    return torch_pruning


def _prune_channels(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    """A pruned copy of ``model`` with ``ratio`` of the channels of every prunable group removed."""
    tp = _tp()
    pruned = copy.deepcopy(model).eval()
    try:
        pruner = tp.pruner.MagnitudePruner(pruned, example, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=ratio, ignored_layers=[_output_layer(pruned)],
                                           round_to=1)
        pruner.step()
    except KdkitError:
        raise
    except Exception as e:  # torch-pruning could not trace or handle a layer
        raise KdkitError(f"structured pruning does not support {type(model).__name__}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                         "use prune with structured: false") from None
    return pruned


def prune_structured(model: nn.Module, example: torch.Tensor, sparsity: Optional[float] = None,
                     target_parameters: Optional[int] = None) -> nn.Module:
    """Remove whole channels/neurons so that the model keeps about ``1 - sparsity`` of its parameters.

    The per-layer channel ratio is found by bisection so the pruned model has at most the target number of
    parameters (the closest from below the search reaches).

    Args:
        model: the network (left unchanged).
        example: one input batch, shape (B, ...), used to trace the layer dependencies.
        sparsity: fraction of all parameters to remove, in (0, 1).
        target_parameters: alternatively, the largest parameter count to keep.

    Returns:
        A new, smaller model.

    Raises:
        KdkitError: an architecture torch-pruning cannot handle, a target nothing can reach, or no layer to prune.
    """
    before = count_parameters(model)
    if target_parameters is None:
        if sparsity is None or not 0.0 < sparsity < 1.0:
            raise KdkitError(f"pruning sparsity must be in (0, 1); got {sparsity}")
        target_parameters = int(math.floor((1.0 - sparsity) * before))
    if target_parameters >= before:
        return copy.deepcopy(model)
    if len(prunable_layers(model)) < 2:
        raise KdkitError(f"{type(model).__name__} has only its output layer among Linear/Conv2d layers; "
                         "structured pruning keeps the output layer whole, so nothing can be removed")
    example = example.detach().cpu()
    lo, hi = 0.0, 0.9  # torch-pruning leaves a layer untouched when a ratio would empty it
    best = _prune_channels(model, example, hi)
    if count_parameters(best) > target_parameters:
        raise KdkitError(f"structured pruning cannot get {type(model).__name__} below {count_parameters(best)} "
                         f"parameters (asked for {target_parameters}); the output layer is kept whole")
    for _ in range(14):
        mid = (lo + hi) / 2
        candidate = _prune_channels(model, example, mid)
        if count_parameters(candidate) <= target_parameters:
            best, hi = candidate, mid
        else:
            lo = mid
    return best
