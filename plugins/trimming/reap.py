"""REAP: Router-weighted Expert Activation Pruning (Lasby et al., "REAP the Experts: Why
Pruning Prevails for One-Shot MoE Compression", arXiv 2510.13999; reference
CerebrasResearch/reap, ``observer.py``).

An expert's saliency is the mean, over the calibration tokens routed to it (it is in the
token's top-k), of its gate value times the L2 norm of its output:

    S_j = 1/|X_j| * sum_{x in X_j} g_j(x) * ||f_j(x)||_2

``g_j`` is the router's score for expert ``j`` over all experts (softmax, or the
architecture's own scoring, e.g. sigmoid for DeepSeek-V3), as the reference does by
default; ``renormalize = true`` divides it by the token's top-k mass (the reference's
``renormalize_router_weights``). Each layer keeps its most salient experts; the router
rows are sliced to match, so routing renormalises over the kept experts exactly as the
architecture does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from moebench.budgets import check_keep, global_budgets, kept_count
from moebench.calibration import Statistic
from moebench.method import Context, Method
from moebench.params import param

from .keep import keep_chosen


class ReapSaliency(Statistic):
    """Per expert, the sum over routed tokens of ``gate x ||expert output||`` and the routed-token count.

    ``{layer: {"sum": [E], "sum_renorm": [E], "count": [E]}}`` (float64 sums): ``sum`` uses
    the router's full score, ``sum_renorm`` that score divided by the token's top-k mass.
    Each expert runs on exactly the tokens the router sends it, once per calibration token.
    """

    name = "reap"
    streamable = True  # per-layer hooks: a layer-by-layer pass gives the same result

    def __init__(self, model, seed=0):
        super().__init__(model, seed)
        self.sums: dict[int, dict[str, torch.Tensor]] = {}

    def attach(self) -> list:
        handles = []
        for block in self.model.blocks():
            def hook(module, args, output, block=block):
                x = args[0].detach()
                logits, _, indices = self.model.adapter.route(output)
                self._update(block, x.reshape(-1, x.shape[-1]), logits.detach(), indices.detach())

            handles.append(block.router.register_forward_hook(hook))
        return handles

    @torch.no_grad()
    def _update(self, block, x: torch.Tensor, logits: torch.Tensor, indices: torch.Tensor) -> None:
        n = block.num_experts
        probs = block.probabilities(logits).double()
        mass = probs.gather(1, indices).sum(1).clamp_min(torch.finfo(torch.float64).eps)
        entry = self.sums.setdefault(
            block.layer, {k: torch.zeros(n, dtype=torch.float64) for k in ("sum", "sum_renorm", "count")}
        )
        for e in range(n):
            tok = (indices == e).any(dim=-1).nonzero().squeeze(-1)
            if tok.numel() == 0:
                continue
            norms = block.expert_forward(e, x[tok]).double().norm(dim=-1)
            g = probs[tok, e]
            entry["sum"][e] += (g * norms).sum().item()
            entry["sum_renorm"][e] += (g / mass[tok] * norms).sum().item()
            entry["count"][e] += tok.numel()

    def result(self):
        return self.sums


def reap_scores(entry: dict[str, torch.Tensor], renormalize: bool = False) -> torch.Tensor:
    """``S_j`` per expert from the statistic's sums (0 for an expert no token was routed to)."""
    total = entry["sum_renorm" if renormalize else "sum"]
    return torch.where(entry["count"] > 0, total / entry["count"].clamp_min(1), torch.zeros_like(total))


@dataclass
class ReapParams:
    keep_ratio: float | None = param(0.5, help="fraction of each layer's routed experts kept (ignored when keep is set)")
    keep: int | None = param(None, help="experts kept per layer")
    renormalize: bool = param(False, help="gate value divided by the token's top-k score mass (the reference's renormalize_router_weights)")
    scope: Literal["layer", "global"] = param("layer", help="layer: same count per layer; global: one budget across layers by normalised saliency")
    top_k: int | None = param(None, help="new experts-per-token after pruning (default: unchanged)")

    def check(self):
        check_keep(self.keep, self.keep_ratio, "keep_ratio: set keep_ratio or keep")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


class Reap(Method):
    """REAP (Lasby et al. 2025, arXiv 2510.13999): prune the experts with the lowest mean routed gate x output norm.

    Reference: CerebrasResearch/reap. Deviation: global scope (one budget across layers)
    is a moebench option; the paper prunes the same fraction in every layer.
    """

    name = "reap"
    Params = ReapParams
    stats = ("reap",)

    def apply(self, model, params: ReapParams, ctx: Context) -> dict:
        sums = ctx.stats(model, "reap")["reap"]
        blocks = list(model.blocks())
        scores = {b.layer: reap_scores(sums[b.layer], params.renormalize) for b in blocks}
        budgets = {b.layer: kept_count(b.num_experts, params.keep, params.keep_ratio) for b in blocks}
        if params.scope == "global":
            normed = {k: s / s.sum().clamp_min(1e-30) - 1e-12 * torch.arange(s.numel()) for k, s in scores.items()}
            budgets = global_budgets(blocks, normed, sum(budgets.values()))
        keeps = {}
        for b in blocks:
            order = sorted(range(b.num_experts), key=lambda e: (-scores[b.layer][e].item(), e))
            keeps[b.layer] = sorted(order[: budgets[b.layer]])
        details = {"saliency": {layer: [round(v, 6) for v in s.tolist()] for layer, s in scores.items()}}
        return keep_chosen(model, blocks, keeps, params.top_k, ctx, details)
