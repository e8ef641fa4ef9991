"""``merge`` and ``progressive_merge``: fewer experts of the architecture's own classes, with their shared steps."""


from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from moebench.adapter import MoEBlock, MoEModel
from moebench.budgets import check_keep, global_budgets, kept_count
from moebench.method import Context, Method
from moebench.params import param
from torch import nn

from .analysis import (
    coactivation_affinity,
    weight_similarity,
)
from . import alignment
from .grouping import Groups, by_frequency, cluster, spectral
from .healing import HealParams, enabled, heal, lora_heal, resolved, teacher_for
from .operators import merge, operators, settings


# == parameters ===========================================================================
@dataclass
class GroupParams:
    """How each layer's experts are grouped and merged (shared by every fusion method)."""

    keep: int | None = param(None, help="merged experts per layer (layer scope) or on average (global scope); overrides keep_ratio")
    keep_ratio: float | None = param(0.5, help="fraction of each layer's experts kept as merged experts")
    grouping: Literal["act_cl", "state_cl", "frequency"] = param(
        "frequency",
        help="frequency: most-used experts are centres, the rest join the most similar centre; "
        "act_cl: cluster by co-activation; state_cl: cluster by output similarity",
    )
    clustering: Literal["spectral", "greedy"] = param(
        "spectral",
        help="act_cl/state_cl clustering: spectral: scikit-learn spectral clustering on co-activation counts or on "
        "the experts' output cosine over all sampled tokens (min-max scaled), as moe-pruner does; greedy: "
        "moebench's variant on the Jaccard co-activation or routed-token cosine (see balanced)",
    )
    balanced: bool = param(True, help="greedy clustering: clusters of equal size (busiest experts seed them); false: average-linkage clusters of any size")
    align: bool = param(
        True,
        help="permute each member's intermediate neurons to match the group's most-used member before merging "
        "(linear assignment, as the merging literature does); false: neuron i merges with neuron i",
    )
    similarity: Literal["output", "weight"] = param("output", help="what the frequency grouping measures closeness by")
    operator: str = param("slerp", help="merge operator: average | frequency_average | slerp | sce | any a plugin registers")
    operator_args: dict = param(default_factory=dict, help="options passed to the operator, e.g. {select = 0.2} for sce")
    scope: Literal["layer", "global"] = param(
        "layer", help="layer: same count per layer; global: one budget spread by routing frequency (each layer keeps at least its top-k)"
    )
    heal: HealParams = param(default_factory=HealParams, help="distillation healing, e.g. {steps = 100, loss = 'kl'} (steps = 0: none)")

    def check(self):
        check_keep(self.keep, self.keep_ratio)
        known = operators()
        if self.operator not in known:
            raise ValueError(f"operator must be one of {', '.join(sorted(known))}, got {self.operator!r}")


@dataclass
class MergeParams(GroupParams):
    router: Literal["sum_prob", "row_average"] = param(
        "sum_prob",
        help="sum_prob: router rows fitted so merged logits are the log of the members' summed probabilities "
        "(calibration inputs); row_average: mean of the members' rows",
    )
    top_k: int | None = param(None, help="experts per token after merging (default: unchanged, capped at the new count)")

    def check(self):
        super().check()
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.heal.train == "adapters":
            raise ValueError("heal.train = 'adapters' does not apply: merging adds no adapters (use 'experts' or 'lora')")


@dataclass
class ProgressiveParams(MergeParams):
    grouping: Literal["act_cl", "state_cl", "frequency"] = param("state_cl", help="grouping at each halving step (pairs)")
    clustering: Literal["spectral", "greedy"] = param(
        "greedy", help="greedy pairs the most similar experts first (moe-pruner's pair_items_by_affinity); spectral need not give pairs"
    )
    operator: str = param("sce", help="merge operator at each halving step")


@dataclass
class VariantParams(GroupParams):
    def check(self):
        super().check()
        if self.heal.train == "lora":
            raise ValueError("heal.train = 'lora' applies to merge and progressive_merge; this method trains its own adapters")


@dataclass
class FusedLoRAParams(VariantParams):
    adapters: Literal["members", "latent"] = param(
        "members",
        help="members: one SVD-initialised adapter per original expert, mixed by routing weight, with an input bias "
        "from the members' weights (moe-pruner's FusedLinear); latent: one LoRA per merged expert reading [x ; z], "
        "z a latent projection of the routing weights (moebench's variant)",
    )
    rank: int = param(8, help="adapter rank")
    latent: int = param(8, help="adapters = 'latent': size of the latent projection of the routing weights")

    def check(self):
        super().check()
        if self.rank < 1 or self.latent < 1:
            raise ValueError(f"rank and latent must be >= 1, got {self.rank} and {self.latent}")


@dataclass
class MixtureOfLoRAParams(VariantParams):
    keep: int | None = param(None, help="shared core experts per layer, each expert's residual taken against its group's core (default: 1)")
    keep_ratio: float | None = param(None, help="cores as a fraction of the experts (when keep is not set)")
    operator: str = param("frequency_average", help="how a group's core is merged (the weighted mean leaves the least residual energy)")
    rank: int = param(8, help="rank of each expert's residual (>= min(hidden, intermediate) reproduces the layer exactly)")
    align: bool = param(False, help="must stay false: each expert's residual is taken against its core in the expert's own neuron order")

    def check(self):
        if self.keep is None and self.keep_ratio is None:
            self.keep = 1
        super().check()
        if self.align:
            raise ValueError("align does not apply to mixture_of_lora: a shared core cannot match every member's neuron order")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")


# == shared steps =========================================================================
def stats_needed(params: GroupParams, router: str | None = None) -> tuple[str, ...]:
    needs = ["routing_counts"]
    if params.grouping == "act_cl":
        needs.append("coactivation")
    if params.grouping == "state_cl" or (params.grouping == "frequency" and params.similarity == "output"):
        needs.append("output_similarity")
    if router == "sum_prob":
        needs.append("moe_io")
    return tuple(needs)


def layer_budgets(model: MoEModel, blocks: list[MoEBlock], params: GroupParams, stats: dict) -> dict[int, int]:
    """Merged experts per layer: the same count everywhere, or one budget spread by normalised routing frequency."""
    budgets = {b.layer: kept_count(b.num_experts, params.keep, params.keep_ratio) for b in blocks}
    if params.scope == "global":
        counts = stats["routing_counts"]
        scores = {b.layer: counts[b.layer].double() / counts[b.layer].sum().clamp_min(1) - 1e-12 * torch.arange(b.num_experts) for b in blocks}
        budgets = global_budgets(blocks, scores, sum(budgets.values()))
    return budgets


def group_layer(block: MoEBlock, n: int, params: GroupParams, stats: dict) -> Groups:
    freq = stats["routing_counts"][block.layer].double()
    if params.grouping in ("act_cl", "state_cl") and params.clustering == "spectral":
        if params.grouping == "act_cl":
            affinity = stats["coactivation"][block.layer].double()
        else:
            cos = stats["output_similarity"][block.layer]["all"].double()
            affinity = (cos - cos.min()) / (cos.max() - cos.min()).clamp_min(1e-12)
        groups = spectral(affinity, n, freq)
    elif params.grouping == "act_cl":
        groups = cluster(coactivation_affinity(stats["coactivation"][block.layer]), n, freq, params.balanced)
    elif params.grouping == "state_cl":
        groups = cluster(stats["output_similarity"][block.layer]["routed"], n, freq, params.balanced)
    else:
        if params.similarity == "output":
            sim = stats["output_similarity"][block.layer]["routed"]
        else:
            sim = weight_similarity(block.gate_up_proj, block.down_proj)
        groups = by_frequency(freq, sim, n)
    groups.check(block.num_experts)
    return groups


def _member_weights(freq: torch.Tensor, members: list[int]) -> torch.Tensor:
    w = freq[members].double()
    return w if w.sum() > 0 else torch.ones(len(members), dtype=torch.float64)


@torch.no_grad()
def member_stacks(block: MoEBlock, groups: Groups, freq: torch.Tensor, align: bool = False) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Per group, what a merge operator receives: ``(weights [n], {"gate", "up", "down": stack [n, ...]})``.

    With ``align``, members' neurons are first permuted to match the group's most-used
    member (:mod:`.alignment`).
    """
    inter = block.intermediate_size
    for members in groups.members:
        idx = torch.tensor(members, device=block.gate_up_proj.device)
        w = _member_weights(freq, members)
        gu, dn = block.gate_up_proj.data[idx], block.down_proj.data[idx]
        if align and len(members) > 1:
            gu, dn = alignment.align(gu, dn, int(w.argmax()))
        yield w, {"gate": gu[:, :inter], "up": gu[:, inter:], "down": dn}


@torch.no_grad()
def merged_experts(block: MoEBlock, groups: Groups, freq: torch.Tensor, operator: str, options: dict, align: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's gate, up and down merged separately: ``(gate_up [M, 2I, H], down [M, H, I])``.

    With ``align``, members' neurons are first permuted to match the group's most-used
    member (:mod:`.alignment`).
    """
    gate_up, down = [], []
    for w, stacks in member_stacks(block, groups, freq, align):
        gate = merge(stacks["gate"], w, operator, **options)
        up = merge(stacks["up"], w, operator, **options)
        gate_up.append(torch.cat([gate, up], dim=0))
        down.append(merge(stacks["down"], w, operator, **options))
    return torch.stack(gate_up), torch.stack(down)


@torch.no_grad()
def router_rows(block: MoEBlock, groups: Groups, mode: str, inputs: torch.Tensor | None = None, ridge: float = 1e-3) -> torch.Tensor:
    """Router rows ``[M, H]`` for the merged experts.

    ``row_average``: the mean of the members' rows. ``sum_prob``: least squares on
    calibration ``inputs [N, H]`` so that each merged logit is the log of its members'
    summed router probabilities (softmax routers; centred per token, since softmax ignores
    a shared shift) or the logit of that sum (sigmoid routers), ridge-regularised towards
    the row average.
    """
    weight = block.router_weight.data
    avg = torch.stack([weight[m].float().mean(0) for m in groups.members])
    if mode == "row_average":
        return avg
    if inputs is None:
        raise ValueError("sum_prob router rows need calibration inputs (the moe_io statistic)")
    x = inputs.to(weight.device).double()
    probs = block.probabilities(x @ weight.double().T).double()
    summed = torch.zeros(x.shape[0], groups.num_groups, dtype=torch.float64, device=x.device)
    summed.index_add_(1, torch.tensor(groups.assign, device=x.device), probs)
    if torch.allclose(probs.sum(1), torch.ones_like(probs[:, 0]), atol=1e-3):  # softmax scores
        target = summed.clamp_min(1e-12).log()
        target = target - target.mean(1, keepdim=True)
    else:  # independent (sigmoid) scores
        target = torch.logit(summed.clamp(1e-6, 1 - 1e-6))
    gram = x.T @ x
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=x.device)
    rows = torch.linalg.solve(gram + lam * eye, x.T @ target + lam * avg.double().T.to(x.device)).T
    return rows.float()


def router_buffers(model: MoEModel, block: MoEBlock, groups: Groups) -> dict[str, torch.Tensor]:
    """Per-expert router buffers (e.g. DeepSeek-V3's score-correction bias) averaged over each group."""
    out = {}
    for name in model.adapter.expert_buffers:
        value = getattr(block.router, name)
        out[name] = torch.stack([value[m].float().mean() for m in groups.members])
    return out


def digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def module_path(model: MoEModel, module: nn.Module) -> str:
    for name, m in model.model.named_modules():
        if m is module:
            return name
    raise ValueError("module is not part of the model")


def _reload(model: MoEModel) -> str:
    return "moebench" if model.needs_moebench_loader() else "transformers"


def params_summary(params) -> dict:
    return {k: v for k, v in asdict(params).items() if k != "heal"}


# == methods ==============================================================================
def _merge_layer(model: MoEModel, block: MoEBlock, n: int, params: MergeParams, stats: dict) -> tuple[Groups, list[str]]:
    groups = group_layer(block, n, params, stats)
    freq = stats["routing_counts"][block.layer]
    gate_up, down = merged_experts(block, groups, freq, params.operator, params.operator_args, params.align)
    inputs = stats["moe_io"][block.layer]["input"] if params.router == "sum_prob" else None
    rows = router_rows(block, groups, params.router, inputs)
    notes = model.replace_experts(block.layer, gate_up, down, rows, router_buffers(model, block, groups))
    if params.top_k is not None:
        model.set_top_k(block.layer, min(params.top_k, groups.num_groups))
    return groups, notes


def _heal_merged(model: MoEModel, spec: HealParams, ctx: Context, teacher=None) -> dict:
    """Heal a plain merge: the merged experts and router rows, or a peft LoRA on the experts merged back."""
    blocks = list(model.blocks())
    if spec.train == "lora":
        names = {id(p): n for n, p in model.model.named_parameters()}
        targets = [names[id(p)] for b in blocks for p in (b.experts.gate_up_proj, b.experts.down_proj)]
        return lora_heal(model, spec, ctx, targets)
    params = [p for b in blocks for p in (b.experts.gate_up_proj, b.experts.down_proj, b.router.weight)]
    return heal(model, params, resolved(replace(spec, train="experts"), "experts"), ctx, teacher=teacher)


class Merge(Method):
    """Merge each layer's experts into fewer: grouping + merge operator + router update (a standard architecture)."""

    name = "merge"
    Params = MergeParams
    stats = ("routing_counts", "output_similarity", "moe_io")  # for the defaults; needs() follows the params

    def needs(self, params: MergeParams) -> tuple[str, ...]:
        return stats_needed(params, params.router)

    def apply(self, model: MoEModel, params: MergeParams, ctx: Context) -> dict:
        blocks = list(model.blocks())
        stats = ctx.stats(model, *self.needs(params))
        budgets = layer_budgets(model, blocks, params, stats)
        before = {b.layer: b.num_experts for b in blocks}
        groups = {}
        for b in blocks:
            groups[b.layer], notes = _merge_layer(model, b, budgets[b.layer], params, stats)
            for note in notes:
                ctx.note(f"layer {b.layer}: {note}")
        model.record_edit(f"merge({digest([params_summary(params), {k: g.members for k, g in groups.items()}])})")
        changes = fusion_summary(model, before, groups, params)
        changes["router"] = params.router
        if enabled(params.heal):
            changes["healing"] = _heal_merged(model, params.heal, ctx)
        changes["reload"] = _reload(model)
        return changes


class ProgressiveMerge(Method):
    """Halve each layer's expert count step by step (pairs by output similarity, SCE merge), healing between steps."""

    name = "progressive_merge"
    Params = ProgressiveParams
    stats = ("routing_counts", "output_similarity", "moe_io")

    def needs(self, params: ProgressiveParams) -> tuple[str, ...]:
        return stats_needed(params, params.router)

    def apply(self, model: MoEModel, params: ProgressiveParams, ctx: Context) -> dict:
        blocks = list(model.blocks())
        before = {b.layer: b.num_experts for b in blocks}
        targets = layer_budgets(model, blocks, params, ctx.stats(model, *self.needs(params)))
        members = {layer: [[e] for e in range(n)] for layer, n in before.items()}  # original experts per current expert
        steps, curve = [], []
        teacher = None
        try:
            while any(model.block(layer).num_experts > targets[layer] for layer in before):
                stats = ctx.stats(model, *self.needs(params))  # recalibrated on the model as merged so far
                for layer in before:
                    block = model.block(layer)
                    n = block.num_experts
                    if n <= targets[layer]:
                        continue
                    groups, notes = _merge_layer(model, block, max(targets[layer], math.ceil(n / 2)), params, stats)
                    members[layer] = [[x for e in g for x in members[layer][e]] for g in groups.members]
                    for note in notes:
                        ctx.note(f"layer {layer}: {note}")
                model.record_edit(f"progressive_merge({digest([params_summary(params), members, len(steps)])})")
                step = {"experts": sum(model.expert_counts().values())}
                if enabled(params.heal):
                    if teacher is None and params.heal.train != "lora":
                        teacher, _ = teacher_for(model, ctx)
                    step["healing"] = _heal_merged(model, params.heal, ctx, teacher=teacher)
                    curve.extend(step["healing"]["loss_curve"])
                steps.append(step)
        finally:
            del teacher
        changes = fusion_summary(model, before, {layer: Groups(m) for layer, m in members.items()}, params)
        changes["router"] = params.router
        changes["steps"] = steps
        if enabled(params.heal):
            changes["healing"] = {
                "loss_curve": curve,
                "loss_before": steps[0]["healing"]["loss_before"],
                "loss_after": steps[-1]["healing"]["loss_after"],
                "steps_per_stage": params.heal.steps,
                "stages": len(steps),
            }
        changes["reload"] = _reload(model)
        return changes


def fusion_summary(model: MoEModel, before: dict[int, int], groups: dict[int, Groups], params, after: dict[int, int] | None = None) -> dict:
    after = after or model.expert_counts()
    return {
        "groups": {layer: g.members for layer, g in groups.items()},
        "experts_before": sum(before.values()),
        "experts_after": sum(after.values()),
        "experts_per_layer": dict(after),
        "grouping": params.grouping,
        **({"clustering": params.clustering} if params.grouping in ("act_cl", "state_cl") else {}),
        "align": params.align,
        "operator": params.operator,
        **({"operator_args": settings(params.operator, params.operator_args)} if hasattr(params, "operator_args") else {}),
        "top_k": {layer: b.top_k for layer, b in ((b.layer, b) for b in model.blocks())},
    }
