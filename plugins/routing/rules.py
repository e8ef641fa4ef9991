"""Routing rules: which of a token's selected experts run (installed on routers through the adapter)."""

from __future__ import annotations

import torch

from moebench.adapter import RoutingRule

#: class paths written into ``config.moebench`` so a saved model rebuilds its rules
TOP_P_CLASS = "moebench_plugins.routing.rules:TopP"
SKIP_CLASS = "moebench_plugins.routing.rules:SkipBelow"


def _selected(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The router scores of the selected experts ``[T, k]`` (indices out of range score 0)."""
    valid = indices < probs.shape[-1]
    return torch.where(valid, probs.gather(1, indices.clamp(max=probs.shape[-1] - 1)), torch.zeros((), dtype=probs.dtype))


class TopP(RoutingRule):
    """Keep the fewest selected experts, highest score first, whose score mass reaches ``p``.

    A slot runs when the mass of the slots ranked above it is still below ``p``; the
    token's top-k bounds the set. ``p >= 1`` keeps every selected expert (the original model).
    """

    def __init__(self, p: float, renormalize: bool = True):
        super().__init__()
        self.p = float(p)
        self.renormalize = bool(renormalize)

    def keep(self, probs, weights, indices):
        if self.p >= 1:
            return torch.ones_like(indices, dtype=torch.bool)
        scores = _selected(probs.float(), indices)
        order = scores.argsort(dim=-1, descending=True, stable=True)
        ranked = scores.gather(1, order)
        before = ranked.cumsum(-1) - ranked
        keep_ranked = before < self.p
        return torch.zeros_like(keep_ranked).scatter(1, order, keep_ranked)

    def extra_repr(self) -> str:
        return f"p={self.p}, renormalize={self.renormalize}"


class SkipBelow(RoutingRule):
    """Skip a selected expert whose score is below ``beta`` times the token's top selected score (NAEE)."""

    def __init__(self, beta: float, renormalize: bool = True):
        super().__init__()
        self.beta = float(beta)
        self.renormalize = bool(renormalize)

    def keep(self, probs, weights, indices):
        scores = _selected(probs.float(), indices)
        return scores >= self.beta * scores.max(dim=-1, keepdim=True).values

    def extra_repr(self) -> str:
        return f"beta={self.beta}, renormalize={self.renormalize}"
