"""NAEE expert pruning ("Not All Experts are Equal: Efficient Expert Pruning and Skipping
for Mixture-of-Experts Large Language Models", Lu et al., ACL 2024, arXiv 2402.14800;
reference Lucky-Lance/Expert_Sparsity, ``method/expert_pruning.py``).

Per MoE layer, the kept experts are the combination whose block output on calibration
tokens is closest to the full block's (sum of squared differences), routing renormalised
over the kept experts exactly as the architecture does. Every combination is tried when
there are at most ``max_combinations`` of them (the paper enumerates, e.g. C(8, 6) = 28
for Mixtral); beyond that the search falls back to greedy removal (drop, one at a time,
the expert whose removal changes the output least), which is recorded.

This is the reference's ``layerwise_pruning``: every layer's inputs and target outputs
come from one pass of the unpruned model. Its ``progressive_pruning`` (a layer's inputs
re-collected after the earlier layers were pruned, targets still from the unpruned
model) is not offered.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from moebench.adapter import MoEBlock, experts_subset
from moebench.budgets import check_keep, kept_count
from moebench.method import Context, Method
from moebench.params import param

from .keep import keep_chosen


@dataclass
class NaeeParams:
    keep_ratio: float | None = param(0.5, help="fraction of each layer's routed experts kept (ignored when keep is set)")
    keep: int | None = param(None, help="experts kept per layer")
    max_combinations: int = param(5000, help="largest number of combinations searched exhaustively per layer (more: greedy removal)")
    top_k: int | None = param(None, help="new experts-per-token after pruning (default: unchanged)")

    def check(self):
        check_keep(self.keep, self.keep_ratio, "keep_ratio: set keep_ratio or keep")
        if self.max_combinations < 1:
            raise ValueError(f"max_combinations must be >= 1, got {self.max_combinations}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


class RoutedOutputs:
    """Every expert's output on the calibration tokens, computed once; a subset's routed output then costs one router call.

    The block output is ``routed + rest`` (shared experts and their gates do not depend on
    which routed experts exist), so the reconstruction loss of a subset is the squared
    distance between its routed output and the full set's.
    """

    def __init__(self, block: MoEBlock, x: torch.Tensor):
        self.block, self.x = block, x
        self.outputs = torch.stack([block.expert_forward(e, x).float() for e in range(block.num_experts)])  # [E, N, H]
        self.full = self.routed(list(range(block.num_experts)))

    @torch.no_grad()
    def routed(self, keep: list[int]) -> torch.Tensor:
        """``sum_slots weight * expert output`` with only experts ``keep``, routed as the architecture does."""
        with experts_subset(self.block, keep):
            _, weights, indices = self.block.adapter.route(self.block.router.forward(self.x))
        chosen = torch.as_tensor(keep, device=indices.device)[indices]  # original expert ids [N, k]
        tokens = torch.arange(self.x.shape[0], device=indices.device)[:, None]
        return (weights.float()[..., None] * self.outputs[chosen, tokens]).sum(1)

    def loss(self, keep: list[int]) -> float:
        return ((self.routed(keep) - self.full) ** 2).sum().item()


@torch.no_grad()
def best_combination(block: MoEBlock, io: dict, budget: int, max_combinations: int) -> tuple[list[int], float, bool]:
    """``(kept experts, loss, exhaustive)``: the best ``budget`` experts by reconstruction loss."""
    x = io["input"].to(block.gate_up_proj.device, block.gate_up_proj.dtype)
    cache = RoutedOutputs(block, x)
    n = block.num_experts
    if math.comb(n, budget) <= max_combinations:
        best, best_loss = None, math.inf
        for combo in itertools.combinations(range(n), budget):
            loss = cache.loss(list(combo))
            if loss < best_loss:
                best, best_loss = list(combo), loss
        return best, best_loss, True
    keep = list(range(n))
    while len(keep) > budget:
        losses = [cache.loss([k for k in keep if k != e]) for e in keep]
        keep.remove(keep[min(range(len(losses)), key=losses.__getitem__)])
    return keep, cache.loss(keep), False


class Naee(Method):
    """NAEE expert pruning (Lu et al. 2024, arXiv 2402.14800): keep the expert combination that best reconstructs each layer's output.

    Reference: Lucky-Lance/Expert_Sparsity. Exhaustive over combinations up to
    ``max_combinations`` per layer; deviation: larger layers (e.g. 64 experts) use greedy
    removal, since enumeration is intractable there (the paper covers Mixtral's 8).
    """

    name = "naee"
    Params = NaeeParams
    stats = ("moe_io",)

    def apply(self, model, params: NaeeParams, ctx: Context) -> dict:
        io = ctx.stats(model, "moe_io")["moe_io"]
        blocks = list(model.blocks())
        keeps, losses, search = {}, {}, {}
        for b in blocks:
            budget = kept_count(b.num_experts, params.keep, params.keep_ratio)
            keeps[b.layer], losses[b.layer], exhaustive = best_combination(b, io[b.layer], budget, params.max_combinations)
            search[b.layer] = "exhaustive" if exhaustive else "greedy"
        if any(s == "greedy" for s in search.values()):
            ctx.note(f"naee: more than {params.max_combinations} combinations in some layers: greedy removal there (see changes.search)")
        details = {"reconstruction_loss": {layer: round(v, 6) for layer, v in losses.items()}, "search": search}
        return keep_chosen(model, blocks, keeps, params.top_k, ctx, details)
