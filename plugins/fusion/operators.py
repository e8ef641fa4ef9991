"""Merge operators: how a group of experts' weights becomes one expert.

An operator takes a stack of same-shaped weight matrices (one per member expert) and the
members' weights (their routing frequencies, normalised to sum to 1) and returns one
matrix. Fusion methods apply it to each projection of the packed experts separately
(gate, up, down), so an operator never needs to know about experts or architectures.

Built in: ``average`` (uniform mean), ``frequency_average`` (mean weighted by how often
each member was routed to), ``slerp`` (spherical barycentre of the members' directions,
norms averaged; exact SLERP for two members) and ``sce`` (FuseChat's select, calculate,
erase, on task vectors taken against the most-used member).

Plugins add operators with the ``register_merge_operators`` hook (declared in
:mod:`moebench.hookspecs`), returning
``{name: fn(stack, weights, **options) -> tensor}``; methods look them up by name through
:func:`operators`, so a suite can name a third-party operator like a built-in one.
"""

from __future__ import annotations

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
    """
    flat = stack.reshape(stack.shape[0], -1).double()
    norms = flat.norm(dim=1)
    w = weights.double()
    if (norms == 0).any():  # a zero member has no direction: fall back to the weighted average
        return frequency_average(stack, weights)
    dirs = flat / norms[:, None]
    if stack.shape[0] == 2:
        mean_dir = _slerp2(dirs[0], dirs[1], w[1].item())
    else:
        mean_dir = _karcher_mean(dirs, w, iterations)
    return (mean_dir * (w @ norms)).reshape(stack.shape[1:]).to(stack.dtype)


def _slerp2(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    cos = (a @ b).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    if omega.item() < 1e-7:
        return a if t == 0 else (1 - t) * a + t * b
    s = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / s) * a + (torch.sin(t * omega) / s) * b


def _karcher_mean(dirs: torch.Tensor, w: torch.Tensor, iterations: int) -> torch.Tensor:
    mean = w @ dirs
    if mean.norm() < 1e-12:  # antipodal members cancel: start from the heaviest one
        mean = dirs[int(w.argmax())].clone()
    mean = mean / mean.norm()
    for _ in range(iterations):
        cos = (dirs @ mean).clamp(-1.0, 1.0)
        theta = torch.arccos(cos)
        scale = torch.where(theta > 1e-9, theta / torch.sin(theta).clamp_min(1e-12), torch.ones_like(theta))
        tangent = (w * scale) @ (dirs - cos[:, None] * mean[None, :])  # log map, averaged
        step = tangent.norm()
        if step < 1e-10:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * tangent / step  # exp map
        mean = mean / mean.norm()
    return mean


@builtin("sce")
def sce(stack: torch.Tensor, weights: torch.Tensor, select: float = 0.1) -> torch.Tensor:
    """FuseChat's SCE on task vectors against the pivot (the most-used member).

    Select: keep the ``select`` fraction of elements whose task vectors vary most across
    members. Calculate: weight each member by its task vector's squared norm. Erase:
    per element, drop members whose sign disagrees with the weighted sum, then average
    the rest with their weights. The pivot plus that merged task vector is the result.
    """
    if not 0 < select <= 1:
        raise ValueError(f"sce select must be in (0, 1], got {select}")
    pivot = stack[int(weights.argmax())]
    tau = stack - pivot
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
