"""The variants that keep the original router and wrap the block in :class:`FusedMoE`: multiplexage, fused LoRA, mixture of LoRA."""


from __future__ import annotations

import math
from dataclasses import replace

import torch
from moebench.adapter import MoEBlock, MoEModel
from moebench.method import Context, Method
from torch import nn

from . import alignment
from .grouping import Groups
from .healing import enabled, heal, resolved
from .merge import (
    FusedLoRAParams,
    MixtureOfLoRAParams,
    VariantParams,
    digest,
    fusion_summary,
    group_layer,
    layer_budgets,
    merged_experts,
    module_path,
    params_summary,
    stats_needed,
)
from .modules import (
    CLASS_PATH,
    FusedLoRAExperts,
    MemberAdapterExperts,
    FusedMoE,
    MixtureOfLoRAExperts,
    MultiplexExperts,
    block_spec,
)


class RouterKeepingVariant(Method):
    """Shared flow of the variants that keep the original router and wrap the block in :class:`FusedMoE`."""

    Params = VariantParams
    stats = ("routing_counts", "output_similarity")  # for the defaults; needs() follows the params
    #: how tokens reach the fused experts (for the record)
    routing = "original router top-k over the original experts; a merged expert runs with the summed weight of its selected members"

    def needs(self, params) -> tuple[str, ...]:
        return stats_needed(params)

    def group(self, block: MoEBlock, n: int, params, stats: dict) -> Groups:
        """How one layer's experts are grouped into ``n`` (the shared grouping by default)."""
        return group_layer(block, n, params, stats)

    def build(self, model: MoEModel, block: MoEBlock, groups: Groups, freq: torch.Tensor, params, ctx: Context) -> tuple[nn.Module, dict, dict]:
        """The experts module for one layer, its init kwargs, and per-layer facts for the record."""
        raise NotImplementedError

    def apply(self, model: MoEModel, params, ctx: Context) -> dict:
        blocks = list(model.blocks())
        stats = ctx.stats(model, *self.needs(params))
        budgets = layer_budgets(model, blocks, params, stats)
        before = {b.layer: b.num_experts for b in blocks}
        groups, facts = {}, {}
        fused: list[FusedMoE] = []
        for b in blocks:
            groups[b.layer] = g = self.group(b, budgets[b.layer], params, stats)
            experts, init, facts[b.layer] = self.build(model, b, g, stats["routing_counts"][b.layer], params, ctx)
            ref = b.gate_up_proj
            fused.append(install_fused(model, b, experts.to(device=ref.device, dtype=ref.dtype), init))
        model.record_edit(f"{self.name}({digest([params_summary(params), {k: g.members for k, g in groups.items()}])})")
        ctx.note(f"{self.name}: fused layers are opaque to the MoEModel view (later steps and the experts count skip them; params.active counts all their weights)")
        changes = fusion_summary(model, before, groups, params, after={layer: g.num_groups for layer, g in groups.items()})
        changes["routing"] = self.routing
        changes["layers"] = facts
        changes["top_k"] = {layer: f["top_k"] for layer, f in facts.items()}
        if enabled(params.heal):
            train = params.heal.train
            trains = "adapters" if train == "auto" and any(w.fusion.adapter_parameters() for w in fused) else train
            trains = "experts" if trains == "auto" else trains
            spec = resolved(replace(params.heal, train=trains), trains)
            changes["healing"] = heal(model, _variant_parameters(fused, trains), spec, ctx)
        changes["reload"] = "moebench"
        changes["module_class"] = CLASS_PATH
        return changes


def _variant_parameters(fused: list[FusedMoE], train: str) -> list[nn.Parameter]:
    """What healing trains in the fused layers: ``adapters``, ``experts`` (merged weights or cores) or ``all``."""
    out = []
    for w in fused:
        if train in ("adapters", "all"):
            out += w.fusion.adapter_parameters()
        if train in ("experts", "all"):
            out += w.fusion.merged_parameters()
    return out


class Multiplexage(RouterKeepingVariant):
    """Merged experts behind the original router, with a learned bias from the members' routing share (moe-pruner's multiplexage)."""

    name = "multiplexage"
    Params = VariantParams

    def build(self, model, block, groups, freq, params, ctx):
        merged = merged_experts(block, groups, freq, params.operator, params.operator_args, params.align)
        experts, init = merged_module(MultiplexExperts, model, block, groups, merged)
        return experts, init, {"merged": groups.num_groups, "top_k": block.top_k}


class FusedLoRA(RouterKeepingVariant):
    """Merged experts plus low-rank adapters fed by the original routing (moe-pruner's fused experts).

    Default (``adapters = "members"``), as moe-pruner's ``FusedLinear`` in mixture mode
    (gabrielolympie/moe-pruner, ``utils/fused.py``): each member keeps an adapter initialised
    from the truncated SVD of its difference from the merge, mixed by its routing weight,
    scaled per output feature, with an input bias projected from the members' weights
    (:class:`~.modules.MemberAdapterExperts`). Deviations: an exact truncated SVD where the
    reference uses ``torch.svd_lowrank(niter=2)``; the input bias starts at zero (the
    reference draws it from N(0, 0.02), which changes an unhealed model at random); the
    merged expert runs with the summed weight of its selected members, as every grouped
    variant here. ``adapters = "latent"`` is moebench's earlier variant: one LoRA per merged
    expert whose input includes a latent projection of the routing weights.

    The reference always trains after fusing: its first-forward scale makes each member
    adapter's output as large as the merged projection's, so an unhealed ``members`` model
    is far from the original (+98% perplexity on the zoo model at 8 of 16 experts,
    docs/benchmarks.md); a run without ``heal`` says so in its notes.
    """

    name = "fused_lora"
    Params = FusedLoRAParams

    def apply(self, model, params, ctx):
        if params.adapters == "members" and not enabled(params.heal):
            ctx.note("fused_lora: adapters = 'members' without heal; the reference trains after fusing (its adapters start "
                     "as large as the merged output), so this model is not meant to be used unhealed")
        return super().apply(model, params, ctx)

    def build(self, model, block, groups, freq, params, ctx):
        if params.adapters == "members":
            return self._members(model, block, groups, freq, params)
        merged = merged_experts(block, groups, freq, params.operator, params.operator_args, params.align)
        experts, init = merged_module(FusedLoRAExperts, model, block, groups, merged, rank=params.rank, latent=params.latent)
        experts.reset_adapters(torch.Generator().manual_seed(ctx.seed * 1000 + block.layer))
        return experts, init, {"merged": groups.num_groups, "top_k": block.top_k, "rank": params.rank, "latent": params.latent, "adapters": "latent"}

    @torch.no_grad()
    def _members(self, model, block, groups, freq, params):
        gate_up, down = merged_experts(block, groups, freq, params.operator, params.operator_args, params.align)
        inter, hidden = block.intermediate_size, block.gate_up_proj.shape[-1]
        rank = min(params.rank, inter, hidden)
        experts, init = merged_module(MemberAdapterExperts, model, block, groups, (gate_up, down), rank=rank)
        for g, members in enumerate(groups.members):
            idx = torch.tensor(members, device=block.gate_up_proj.device)
            gu, dn = block.gate_up_proj.data[idx], block.down_proj.data[idx]
            if params.align and len(members) > 1:
                gu, dn = alignment.align(gu, dn, int(freq[members].double().argmax()))
            for j, e in enumerate(members):
                for delta, a, b in (
                    (gu[j, :inter] - gate_up[g, :inter], experts.gate_up_a[e, :rank], experts.gate_up_b[e, :inter]),
                    (gu[j, inter:] - gate_up[g, inter:], experts.gate_up_a[e, rank:], experts.gate_up_b[e, inter:]),
                    (dn[j] - down[g], experts.down_a[e], experts.down_b[e]),
                ):
                    b_, a_ = reference_low_rank(delta, rank)
                    a.copy_(a_)
                    b.copy_(b_)
        return experts, init, {"merged": groups.num_groups, "top_k": block.top_k, "rank": rank, "adapters": "members"}


class MixtureOfLoRA(RouterKeepingVariant):
    """Each expert as a shared core plus a truncated-SVD low-rank residual, gated by the original router (exact at full rank)."""

    name = "mixture_of_lora"
    Params = MixtureOfLoRAParams
    routing = "original router and top-k unchanged; each selected expert is its core plus its low-rank residual"

    def build(self, model, block, groups, freq, params, ctx):
        cores_gu, cores_d = merged_experts(block, groups, freq, params.operator, params.operator_args)
        inter, hidden = block.intermediate_size, block.gate_up_proj.shape[-1]
        rank = min(params.rank, inter, hidden)
        init = {**experts_init(model, block, groups), "rank": rank}
        experts = MixtureOfLoRAExperts(**init)
        assign = groups.assign
        kept, total = 0.0, 0.0
        with torch.no_grad():
            experts.core_gate_up.copy_(cores_gu)
            experts.core_down.copy_(cores_d)
            for e in range(block.num_experts):
                gate, up, down = block.expert(e)
                core_gate, core_up = cores_gu[assign[e], :inter], cores_gu[assign[e], inter:]
                b_g, a_g = low_rank(gate - core_gate, rank)
                b_u, a_u = low_rank(up - core_up, rank)
                b_d, a_d = low_rank(down - cores_d[assign[e]], rank)
                experts.set_residual(e, (b_g, a_g), (b_u, a_u), (b_d, a_d))
                for w, approx in ((gate, core_gate + b_g @ a_g), (up, core_up + b_u @ a_u), (down, cores_d[assign[e]] + b_d @ a_d)):
                    kept += (w.float() - approx.float()).pow(2).sum().item()
                    total += w.float().pow(2).sum().item()
        full = rank >= min(inter, hidden)
        return experts, init, {"cores": groups.num_groups, "top_k": block.top_k, "rank": rank, "full_rank": full, "weight_rel_error": math.sqrt(kept / max(total, 1e-30))}


def reference_low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """moe-pruner's adapter init: the truncated SVD ``U √(σ/c)``, ``√(σ/c) Vᵀ`` with ``c = Σσ / r``,
    so ``B @ A`` is the best rank-``r`` approximation of ``delta`` divided by ``c``."""
    b, a = low_rank(delta, rank)
    s = torch.linalg.svdvals(delta.double() if delta.numel() <= (1 << 22) else delta.float())[:rank]
    c = float(s.sum()) / rank
    if c <= 0:
        return b, a
    return (b / c**0.5).to(delta.dtype), (a / c**0.5).to(delta.dtype)


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B [a, r], A [r, b])`` with ``B @ A`` the best rank-``r`` approximation of ``delta [a, b]`` (truncated SVD, balanced split)."""
    work = delta.double() if delta.numel() <= (1 << 22) else delta.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = torch.zeros(delta.shape[0], rank, dtype=work.dtype, device=delta.device)
    a = torch.zeros(rank, delta.shape[1], dtype=work.dtype, device=delta.device)
    b[:, :r] = u[:, :r] * root
    a[:r] = root[:, None] * vh[:r]
    return b.to(delta.dtype), a.to(delta.dtype)


def experts_init(model: MoEModel, block: MoEBlock, groups: Groups) -> dict:
    return {
        "num_experts": block.num_experts,
        "assign": groups.assign,
        "hidden_size": block.gate_up_proj.shape[-1],
        "intermediate_size": block.intermediate_size,
        "hidden_act": model.config.hidden_act,
    }


def merged_module(cls: type[nn.Module], model: MoEModel, block: MoEBlock, groups: Groups, merged: tuple[torch.Tensor, torch.Tensor], **init) -> tuple[nn.Module, dict]:
    """A ``cls`` experts module for ``block``'s groups holding the merged ``(gate_up, down)``
    weights (:func:`~.merge.merged_experts`), and its init kwargs (:func:`experts_init` plus ``init``)."""
    init = {**experts_init(model, block, groups), **init}
    experts = cls(**init)
    with torch.no_grad():
        experts.gate_up_proj.copy_(merged[0])
        experts.down_proj.copy_(merged[1])
    return experts, init


def install_fused(model: MoEModel, block: MoEBlock, experts: nn.Module, init: dict) -> FusedMoE:
    """Put ``block`` behind a :class:`FusedMoE` running ``experts`` (built with ``init``), recorded so the saved model reloads it."""
    spec = {**block_spec(model, block), "experts": type(experts).__name__, "experts_init": init}
    path = module_path(model, block.module)
    wrapper = FusedMoE(**spec, _inner=block.module, _experts=experts)
    model.replace_module(path, wrapper, {"class": CLASS_PATH, "init": spec})
    return wrapper
