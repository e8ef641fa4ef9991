"""Merge operators: how a group of experts' weights becomes one expert.

An operator takes a stack of same-shaped weight matrices (one per member expert) and the
members' weights (their routing frequencies, normalised to sum to 1) and returns one
matrix. Fusion methods apply it to each projection of the packed experts separately
(gate, up, down), so an operator never needs to know about experts or architectures.

Built in: ``average`` (uniform mean), ``frequency_average`` (mean weighted by how often
each member was routed to), ``slerp`` (spherical barycentre of the members' directions,
norms averaged; exact SLERP for two members) and ``sce`` (FuseChat's select, calculate,
erase, on task vectors taken against the most-used member, as mergekit runs it).

Plugins add operators with the ``register_merge_operators`` hook (declared in
:mod:`moebench.hookspecs`), returning
``{name: fn(stack, weights, **options) -> tensor}``; methods look them up by name through
:func:`operators`, so a suite can name a third-party operator like a built-in one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from moebench.errors import MoebenchError, did_you_mean

#: ``fn(stack [n, *shape], weights [n], **options) -> merged [*shape]``
MergeOperator = Callable[..., torch.Tensor]

_BUILTIN: dict[str, MergeOperator] = {}


def builtin(name: str):
    """Register a built-in operator under ``name``."""

    def wrap(fn: MergeOperator) -> MergeOperator:
        _BUILTIN[name] = fn
        return fn

    return wrap


def operators() -> dict[str, MergeOperator]:
    """Every merge operator: the built-ins, then those plugins provide (a plugin may override one)."""
    from moebench.plugins import host

    found = dict(_BUILTIN)
    for group in host().pm.hook.register_merge_operators():
        found.update(group or {})
    return found


def operator(name: str) -> MergeOperator:
    table = operators()
    if name not in table:
        raise MoebenchError(f"unknown merge operator {name!r}{did_you_mean(name, table)}; known: {', '.join(sorted(table))}")
    return table[name]


def settings(name: str, options: dict) -> dict:
    """The options operator ``name`` runs with: its keyword defaults overlaid with ``options`` (for the record,
    so a run says e.g. which SCE variant and select fraction it used even when the suite named none)."""
    try:
        params = list(inspect.signature(operator(name)).parameters.values())[2:]  # after (stack, weights)
    except (TypeError, ValueError):  # a callable without a readable signature: only what was given
        params = []
    defaults = {p.name: p.default for p in params if isinstance(p.default, (str, int, float, bool, type(None)))}
    return {**defaults, **options}


def merge(stack: torch.Tensor, weights: torch.Tensor | None = None, name: str = "average", **options) -> torch.Tensor:
    """Merge ``stack [n, *shape]`` into one tensor with operator ``name`` (computed in float32 or wider).

    ``weights`` default to uniform; they are normalised to sum to 1.
    """
    n = stack.shape[0]
    if n == 0:
        raise ValueError("cannot merge an empty group")
    w = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64).cpu()
    if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {n} non-negative numbers with a positive sum")
    w = w / w.sum()
    work = stack.to(torch.float64 if stack.dtype == torch.float64 else torch.float32)
    if n == 1:
        return stack[0].clone()
    return operator(name)(work, w.to(work.device), **options).to(stack.dtype)


# -- built-in operators -----------------------------------------------------------------
@builtin("average")
def average(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Uniform mean of the members (the members' frequencies are ignored)."""
    return stack.mean(0)


@builtin("frequency_average")
def frequency_average(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean weighted by the members' routing frequencies: busy experts dominate the merge."""
    return torch.einsum("n,n...->...", weights.to(stack.dtype), stack)


@builtin("slerp")
def slerp(stack: torch.Tensor, weights: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Spherical interpolation: the weighted geodesic mean of the members' directions, at their mean norm.

    Each member is flattened and split into norm and direction. For two members this is
    exact SLERP (``weights = (1 - t, t)``); for more it is the weighted Karcher mean on
    the unit sphere, found by a few steps of averaging in the tangent space. The result
    takes the weighted mean of the members' norms.

    The mean direction always lies in the span of the members, so everything is done on
    their float64 Gram matrix (accumulated in chunks) and the result is one weighted sum
    of the members: no float64 copy of the stack, and the iterations cost ``O(n^2)``.
    """
    n = stack.shape[0]
    flat = stack.reshape(n, -1)
    gram = _gram64(flat)
    norms = gram.diagonal().clamp_min(0).sqrt()
    w = weights.double().cpu()
    if (norms == 0).any():  # a zero member has no direction: fall back to the weighted average
        return frequency_average(stack, weights)
    cosines = (gram / (norms[:, None] * norms[None, :])).clamp(-1.0, 1.0)
    cosines.fill_diagonal_(1.0)
    if n == 2:
        coef = _slerp2(cosines[0, 1], w[1].item())
    else:
        coef = _karcher_mean(cosines, w, iterations)
    scale = (coef / norms) * (w @ norms)  # direction coefficients -> member coefficients
    return torch.einsum("n,nd->d", scale.to(flat.dtype).to(flat.device), flat).reshape(stack.shape[1:]).to(stack.dtype)


def _gram64(flat: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """``flat @ flat.T`` accumulated in float64, ``chunk`` columns at a time."""
    if flat.dtype == torch.float64:
        return (flat @ flat.T).cpu()
    gram = torch.zeros(flat.shape[0], flat.shape[0], dtype=torch.float64, device=flat.device)
    for start in range(0, flat.shape[1], chunk):
        part = flat[:, start : start + chunk].double()
        gram += part @ part.T
    return gram.cpu()


def _slerp2(cos: torch.Tensor, t: float) -> torch.Tensor:
    """Coefficients of SLERP between two unit directions at angle ``arccos(cos)``."""
    omega = torch.arccos(cos)
    if omega.item() < 1e-7:
        return torch.tensor([1.0, 0.0] if t == 0 else [1 - t, t], dtype=torch.float64)
    s = torch.sin(omega)
    return torch.stack([torch.sin((1 - t) * omega) / s, torch.sin(t * omega) / s])


def _karcher_mean(cosines: torch.Tensor, w: torch.Tensor, iterations: int) -> torch.Tensor:
    """The weighted Karcher mean of unit directions with Gram matrix ``cosines``, as coefficients over them."""
    def norm(c):
        return (c @ cosines @ c).clamp_min(0).sqrt()

    mean = w.clone()
    if norm(mean) < 1e-12:  # antipodal members cancel: start from the heaviest one
        mean = torch.zeros_like(w)
        mean[int(w.argmax())] = 1.0
    mean = mean / norm(mean)
    for _ in range(iterations):
        cos = (cosines @ mean).clamp(-1.0, 1.0)
        theta = torch.arccos(cos)
        scale = torch.where(theta > 1e-9, theta / torch.sin(theta).clamp_min(1e-12), torch.ones_like(theta))
        a = w * scale
        tangent = a - (a @ cos) * mean  # log map, averaged: sum_i a_i (d_i - cos_i * mean)
        step = norm(tangent)
        if step < 1e-10:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * tangent / step  # exp map
        mean = mean / norm(mean)
    return mean


@builtin("sce")
def sce(stack: torch.Tensor, weights: torch.Tensor, select: float = 0.2, variant: str = "reference") -> torch.Tensor:
    """FuseChat's SCE (Wan et al., arXiv 2408.07990) on task vectors against a pivot, the most-used member.

    As mergekit's ``sce`` (which moe-pruner calls): the pivot is the base and is left out of
    every step. Select: keep the ``select`` fraction (of the elements whose variance is not
    zero) with the largest variance of the other members' task vectors. Calculate: weight
    each member by its task vector's mean square. Erase: per element, keep members whose
    sign agrees with the sign of the plain sum of task vectors, then average those with
    their weights. The pivot plus that merged task vector is the result. The default
    ``select = 0.2`` sits in the 0.15-0.3 range moe-pruner uses (mergekit's default is 1).
    ``variant = "moebench"`` is moebench's earlier rule: the pivot's zero task vector takes
    part in the variance and the weights, and the sign vote is weighted.
    """
    if not 0 < select <= 1:
        raise ValueError(f"sce select must be in (0, 1], got {select}")
    if variant not in ("reference", "moebench"):
        raise ValueError(f"sce variant must be 'reference' or 'moebench', got {variant!r}")
    p = int(weights.argmax())
    pivot = stack[p]
    if variant == "moebench":
        return _sce_moebench(stack - pivot, pivot, select)
    tau = torch.cat([stack[:p], stack[p + 1 :]]) - pivot
    if tau.shape[0] == 0:
        return pivot.clone()
    if select < 1:
        var = tau.var(dim=0, unbiased=False).reshape(-1)
        k = int(int(torch.count_nonzero(var)) * select)
        keep = torch.zeros_like(var, dtype=torch.bool)
        if k > 0:
            keep[var.topk(k).indices] = True
        tau = tau * keep.reshape(tau.shape[1:]).to(tau.dtype)
    energy = tau.reshape(tau.shape[0], -1).pow(2).mean(1)
    coef = energy / energy.sum() if energy.sum().abs() >= 1e-6 else torch.full_like(energy, 1.0 / energy.numel())
    coef = coef.to(tau.dtype).reshape(-1, *([1] * (tau.dim() - 1)))
    sign = torch.where(tau.sum(0) >= 0, 1.0, -1.0).to(tau.dtype)
    agree = (tau.sign() == sign.unsqueeze(0)).to(tau.dtype)
    erased = coef * agree
    return pivot + (tau * erased).sum(0) / erased.sum(0).clamp_min(1e-6)


def _sce_moebench(tau: torch.Tensor, pivot: torch.Tensor, select: float) -> torch.Tensor:
    """moebench's earlier SCE: the pivot's zero task vector in the variance and weights, a weighted sign vote."""
    if select < 1:
        var = tau.var(dim=0, unbiased=False).reshape(-1)
        k = max(1, round(select * var.numel()))
        threshold = var.kthvalue(var.numel() - k + 1).values
        tau = tau * (var >= threshold).reshape(tau.shape[1:]).to(tau.dtype)
    energy = tau.reshape(tau.shape[0], -1).pow(2).sum(1)
    if energy.sum() <= 0:
        return pivot.clone()
    coef = (energy / energy.sum()).to(tau.dtype)
    weighted = torch.einsum("n,n...->n...", coef, tau)
    sign = weighted.sum(0).sign()
    agree = (tau.sign() == sign.unsqueeze(0)) & (tau != 0)
    mass = torch.einsum("n,n...->...", coef, agree.to(tau.dtype))
    merged = (weighted * agree).sum(0) / mass.clamp_min(1e-12)
    return pivot + torch.where(mass > 0, merged, torch.zeros_like(merged))
