"""MC-SMoE: "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing
Policy" (Li et al., ICLR 2024, arXiv 2310.01334; reference UNITES-Lab/MC-SMoE).

M-SMoE, per layer:

1. the ``keep`` most frequently selected experts are the dominant ones;
2. every other expert joins the dominant expert whose router logits are most similar
   (cosine of the two experts' logit columns over the calibration tokens);
3. each member's intermediate neurons are permuted to match its dominant expert
   (weight matching, an exact linear assignment; :mod:`.alignment`);
4. the aligned members are averaged weighted by their routing frequency.

The router is kept: a merged expert serves all its members' router slots
(:class:`~moebench_plugins.fusion.modules.GroupedExperts`), as the reference shares one
merged expert among the group. C-SMoE, optional (``compress_rank``): each merged matrix
becomes a rank-``compress_rank`` truncated SVD plus the residual with its smallest
``sparsity`` fraction of entries zeroed. Deviation: that low-rank + sparse form is
stored densely (its product), so the bytes do not shrink; the record says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from moebench.budgets import check_keep
from moebench.params import param

from .grouping import Groups, by_frequency
from .healing import HealParams
from .merge import merged_experts
from .modules import GroupedExperts
from .variants import RouterKeepingVariant, merged_module


@dataclass
class McSmoeParams:
    keep: int | None = param(None, help="dominant (merged) experts per layer (overrides keep_ratio)")
    keep_ratio: float | None = param(0.5, help="fraction of each layer's experts kept as merged experts")
    align: bool = param(True, help="permute members' neurons to their dominant expert before merging (the paper's alignment)")
    compress_rank: int | None = param(None, help="C-SMoE: rank of each merged matrix's low-rank part (none: merge only, M-SMoE)")
    sparsity: float = param(0.9, help="C-SMoE: fraction of the low-rank residual's entries zeroed (smallest magnitude)")
    heal: HealParams = param(default_factory=HealParams, help="optional distillation healing (the paper fine-tunes; default none)")
    operator: Literal["frequency_average"] = param("frequency_average", help="members averaged by routing frequency")
    operator_args: dict = field(default_factory=dict, metadata={"help": "unused"})
    scope: Literal["layer"] = field(default="layer", metadata={"help": "the same count in every layer"})

    @property
    def grouping(self) -> str:
        return "dominant experts by frequency, members by router-logit similarity"

    def check(self):
        check_keep(self.keep, self.keep_ratio, "keep_ratio: set keep_ratio or keep")
        if self.compress_rank is not None and self.compress_rank < 1:
            raise ValueError(f"compress_rank must be >= 1, got {self.compress_rank}")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")


def router_logit_similarity(logits: torch.Tensor) -> torch.Tensor:
    """``[E, E]`` cosine similarity of the experts' router-logit columns over tokens (``logits [T, E]``)."""
    cols = F.normalize(logits.double().T, dim=-1)
    return cols @ cols.T


def low_rank_plus_sparse(w: torch.Tensor, rank: int, sparsity: float) -> torch.Tensor:
    """``L + S``: the rank-``rank`` truncated SVD of ``w`` plus the residual with its smallest ``sparsity`` share zeroed."""
    work = w.double()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    r = min(rank, s.numel())
    low = (u[:, :r] * s[:r]) @ vh[:r]
    res = work - low
    k = int(sparsity * res.numel())
    if k > 0:
        threshold = res.abs().reshape(-1).kthvalue(k).values
        res = torch.where(res.abs() > threshold, res, torch.zeros_like(res))
    return (low + res).to(w.dtype)


class McSmoe(RouterKeepingVariant):
    """MC-SMoE (Li et al., ICLR 2024, arXiv 2310.01334): merge around dominant experts grouped by router logits, neurons aligned, frequency-weighted.

    Reference: UNITES-Lab/MC-SMoE. Deviations: no fine-tuning after merging by default
    (``heal`` adds distillation); C-SMoE's low-rank + sparse experts are stored densely.
    """

    name = "mc_smoe"
    Params = McSmoeParams
    stats = ("routing_counts", "router_logits")
    routing = "original router top-k over the original experts; each member's slot runs its group's merged expert (summed weight)"

    def needs(self, params) -> tuple[str, ...]:
        return self.stats

    def group(self, block, n: int, params: McSmoeParams, stats: dict) -> Groups:
        freq = stats["routing_counts"][block.layer].double()
        return by_frequency(freq, router_logit_similarity(stats["router_logits"][block.layer]), n)

    def build(self, model, block, groups, freq, params: McSmoeParams, ctx):
        gate_up, down = merged_experts(block, groups, freq, "frequency_average", {}, params.align)
        facts = {"merged": groups.num_groups, "top_k": block.top_k, "aligned": params.align}
        if params.compress_rank is not None:
            inter = block.intermediate_size
            with torch.no_grad():
                for m in range(gate_up.shape[0]):
                    gate_up[m, :inter] = low_rank_plus_sparse(gate_up[m, :inter], params.compress_rank, params.sparsity)
                    gate_up[m, inter:] = low_rank_plus_sparse(gate_up[m, inter:], params.compress_rank, params.sparsity)
                    down[m] = low_rank_plus_sparse(down[m], params.compress_rank, params.sparsity)
            facts["compressed"] = {"rank": params.compress_rank, "sparsity": params.sparsity, "storage": "dense (L + S)"}
            ctx.note("mc_smoe: C-SMoE's low-rank + sparse experts are stored densely; their bytes do not shrink")
        experts, init = merged_module(GroupedExperts, model, block, groups, (gate_up, down))
        return experts, init, facts
