"""HC-SMoE: retraining-free expert merging by hierarchical clustering of expert outputs
(Chen et al., "Retraining-Free Merging of Sparse MoE via Hierarchical Clustering",
ICML 2025, arXiv 2410.08589; reference wazenmai/HC-SMoE).

Per layer: every expert's mean output over all calibration tokens (statistic
``expert_mean_output``) is its representation; agglomerative clustering (average
linkage, Euclidean distance by default, scipy) cuts the experts into ``keep`` clusters;
each cluster's weights are merged by routing-frequency-weighted averaging. As in the
reference, the router is left unchanged: a merged expert serves every member's router
slot (a token routed to two members runs it once with their summed weight), through
:class:`~moebench_plugins.fusion.modules.GroupedExperts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moebench.budgets import check_keep
from moebench.params import param

from .grouping import Groups, hierarchical
from .healing import HealParams
from .merge import merged_experts
from .modules import GroupedExperts
from .operators import operators
from .variants import RouterKeepingVariant, merged_module


@dataclass
class HcSmoeParams:
    keep: int | None = param(None, help="merged experts per layer (overrides keep_ratio)")
    keep_ratio: float | None = param(0.5, help="fraction of each layer's experts kept as merged experts")
    linkage: Literal["average", "single", "complete", "ward"] = param("average", help="cluster linkage (the paper's default: average)")
    metric: Literal["euclidean", "cosine"] = param("euclidean", help="distance between experts' mean outputs (ward needs euclidean)")
    operator: str = param("frequency_average", help="how a cluster's weights merge (the paper: frequency-weighted average)")
    operator_args: dict = param(default_factory=dict, help="options passed to the operator")
    align: bool = param(False, help="permute members' neurons to the most-used member before merging (not in the paper)")
    heal: HealParams = param(default_factory=HealParams, help="optional distillation healing (the paper: none)")
    scope: Literal["layer"] = field(default="layer", metadata={"help": "the same count in every layer"})

    @property
    def grouping(self) -> str:
        return f"hierarchical({self.linkage},{self.metric})"

    def check(self):
        check_keep(self.keep, self.keep_ratio, "keep_ratio: set keep_ratio or keep")
        if self.linkage == "ward" and self.metric != "euclidean":
            raise ValueError("linkage: ward needs metric = 'euclidean'")
        if self.operator not in operators():
            raise ValueError(f"operator must be one of {', '.join(sorted(operators()))}, got {self.operator!r}")


class HcSmoe(RouterKeepingVariant):
    """HC-SMoE (Chen et al. 2024, arXiv 2410.08589): hierarchical clustering of experts on mean outputs, frequency-weighted merge.

    Reference: wazenmai/HC-SMoE. The router and top-k are unchanged (members share their
    merged expert); no retraining. Deviation: the paper's Qwen/Mixtral scripts also offer
    other representations (router logits, weights); moebench implements its default,
    expert outputs.
    """

    name = "hc_smoe"
    Params = HcSmoeParams
    stats = ("routing_counts", "expert_mean_output")
    routing = "original router top-k over the original experts; each member's slot runs its cluster's merged expert (summed weight)"

    def needs(self, params) -> tuple[str, ...]:
        return self.stats

    def group(self, block, n: int, params: HcSmoeParams, stats: dict) -> Groups:
        freq = stats["routing_counts"][block.layer].double()
        return hierarchical(stats["expert_mean_output"][block.layer]["mean"], n, params.linkage, params.metric, freq)

    def build(self, model, block, groups, freq, params, ctx):
        merged = merged_experts(block, groups, freq, params.operator, params.operator_args, params.align)
        experts, init = merged_module(GroupedExperts, model, block, groups, merged)
        return experts, init, {"merged": groups.num_groups, "top_k": block.top_k}
