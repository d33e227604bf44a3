"""Low-rank factorisation: a Linear or Conv2d layer becomes two thinner layers via truncated SVD.

A weight ``W`` of shape (out, in) is approximated by ``U_r diag(s_r) V_r^T`` (Eckart-Young: the best rank-r
approximation in Frobenius norm); the layer becomes ``Linear(in, r, bias=False)`` with weight
``diag(sqrt(s_r)) V_r^T`` followed by ``Linear(r, out)`` with weight ``U_r diag(sqrt(s_r))`` and the original
bias, an encoder-decoder bottleneck (Denton et al. 2014, "Exploiting Linear Structure Within Convolutional
Networks for Efficient Evaluation"; Jaderberg et al. 2014).

A Conv2d weight (out, in, kh, kw) is reshaped to (out, in*kh*kw) and factorised the same way: the first
layer is a ``Conv2d(in, r, (kh, kw))`` with the original stride, padding and dilation, the second a 1x1
``Conv2d(r, out)`` carrying the bias. At full rank (``r = min(out, in*kh*kw)``) both forms reproduce the layer
exactly (up to float rounding). Grouped convolutions are not supported.

The rank is either given, or the smallest that keeps ``energy`` of the sum of squared singular values.
A layer is only factorised when the two thin layers have fewer parameters than the original.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..errors import KdkitError


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest r with ``sum(s[:r]^2) >= energy * sum(s^2)``."""
    if not 0.0 < energy <= 1.0:
        raise KdkitError(f"lowrank energy must be in (0, 1]; got {energy}")
    power = singular_values.double() ** 2
    cum = torch.cumsum(power, 0) / power.sum().clamp_min(1e-300)
    return int(min(len(power), int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12)) + 1))


def _matrix(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return layer.weight.detach()
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise KdkitError(f"lowrank: grouped/depthwise Conv2d (groups={layer.groups}) is not supported")
        if layer.padding_mode != "zeros":
            raise KdkitError(f"lowrank: Conv2d padding_mode={layer.padding_mode!r} is not supported (only zeros)")
        return layer.weight.detach().flatten(1)  # (out, in*kh*kw)
    raise KdkitError(f"lowrank: cannot factorise {type(layer).__name__}; only Linear and Conv2d layers")


def max_rank(layer: nn.Module) -> int:
    w = _matrix(layer)
    return min(w.shape)


def factorized_parameters(layer: nn.Module, rank: int) -> int:
    out, inner = _matrix(layer).shape
    return rank * (inner + out) + (out if layer.bias is not None else 0)


def _thin_layers(layer: nn.Module, rank: int) -> nn.Sequential:
    """Two empty layers of the factorised shape (no weights set)."""
    if isinstance(layer, nn.Linear):
        return nn.Sequential(nn.Linear(layer.in_features, rank, bias=False),
                             nn.Linear(rank, layer.out_features, bias=layer.bias is not None))
    return nn.Sequential(
        nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=False),
        nn.Conv2d(rank, layer.out_channels, 1, bias=layer.bias is not None))


def factorize_layer(layer: nn.Module, rank: Optional[int] = None, energy: Optional[float] = None) -> nn.Sequential:
    """Replace ``layer`` (Linear or Conv2d) by two thinner layers from its truncated SVD.

    Args:
        layer: the layer to factorise (unchanged).
        rank: number of singular values kept, 1..min(out, in*kh*kw).
        energy: alternatively, the share of sum(s^2) to keep.

    Returns:
        ``nn.Sequential(first, second)`` computing ``second(first(x))`` ~= ``layer(x)``.
    """
    w = _matrix(layer).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
    if rank is None:
        if energy is None:
            raise KdkitError("lowrank: give a rank or an energy")
        rank = rank_for_energy(s, energy)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= len(s):
        raise KdkitError(f"lowrank: rank must be an integer in 1..{len(s)} for {type(layer).__name__} with weight "
                         f"{tuple(layer.weight.shape)}; got {rank!r}")
    root = s[:rank].sqrt()
    first_w = (root[:, None] * vh[:rank])  # (r, in*kh*kw)
    second_w = u[:, :rank] * root[None, :]  # (out, r)
    thin = _thin_layers(layer, rank)
    dtype = layer.weight.dtype
    with torch.no_grad():
        thin[0].weight.copy_(first_w.reshape(thin[0].weight.shape).to(dtype))
        thin[1].weight.copy_(second_w.reshape(thin[1].weight.shape).to(dtype))
        if layer.bias is not None:
            thin[1].bias.copy_(layer.bias.detach())
    return thin.to(layer.weight.device)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def factorize(model: nn.Module, rank: Optional[int] = None, energy: Optional[float] = None,
              layers: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    """Factorise layers of ``model`` in place.

    Args:
        model: the network (modified).
        rank / energy: as in :func:`factorize_layer`; a ``rank`` above a layer's maximum is capped there.
        layers: module names to factorise; default every Linear/Conv2d where the factorised form is smaller.

    Returns:
        One record per factorised layer: ``{"module", "rank", "max_rank", "parameters_before", "parameters_after"}``
        (this list is also what :func:`apply_edits` needs to rebuild the shapes).
    """
    modules = dict(model.named_modules())
    explicit = layers is not None
    if explicit:
        missing = [n for n in layers if n not in modules]
        if missing:
            names = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))]
            raise KdkitError(f"lowrank: no module named {missing[0]!r}; Linear/Conv2d layers: {', '.join(names)}")
        names = list(layers)
    else:
        names = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d)) and n]
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise KdkitError(f"lowrank: rank must be a positive integer; got {rank!r}")
    records = []
    for name in names:
        layer = modules[name]
        full = max_rank(layer)  # raises for unsupported layers named explicitly
        r = min(rank, full) if rank is not None else None
        if r is None:
            s = torch.linalg.svdvals(_matrix(layer).double())
            r = rank_for_energy(s, energy)
        before = sum(p.numel() for p in layer.parameters())
        after = factorized_parameters(layer, r)
        if after >= before and not explicit:
            continue  # factorising would not save anything
        set_submodule(model, name, factorize_layer(layer, r))
        records.append({"module": name, "rank": r, "max_rank": full, "parameters_before": before,
                        "parameters_after": after})
    return records


def apply_edits(model: nn.Module, records: Sequence[Dict[str, object]]) -> None:
    """Give ``model`` the factorised structure described by ``records`` (weights are loaded afterwards)."""
    for rec in records:
        layer = model.get_submodule(str(rec["module"]))
        set_submodule(model, str(rec["module"]), _thin_layers(layer, int(rec["rank"])))
