"""Expert fusion: merge a layer's experts into fewer, with the variants of the moe-pruner line of work.

Methods (all edit the model through :class:`moebench.adapter.MoEModel`):

- ``merge``: group each layer's experts (:mod:`moebench.grouping`), merge each group's
  weights with an operator (:mod:`moebench.merging`), give the merged expert a router row
  (``row_average`` of its members' rows, or ``sum_prob``: rows fitted on calibration
  inputs so the merged logits are the log of the members' summed probabilities). The
  result is the architecture's own classes with fewer experts: plain transformers reloads it.
- ``progressive_merge``: halve the expert count step by step (pairs by output similarity,
  SCE merge by default), healing between steps.
- ``multiplexage``: merged experts fed by the *original* router; a merged expert runs when
  any member is in the token's top-k, weighted by the members' summed routing weights,
  and its input gets a bias projected from the members' share of that weight (a learned
  ``[E, H]`` projection, zero at first), so routing information survives the merge.
- ``fused_lora``: the same grouped routing, plus per merged expert a LoRA on its gate/up
  projections (input: the hidden state and a latent projection of the original routing
  weights) and on its down projection; B starts at zero.
- ``mixture_of_lora``: every original expert becomes a shared core (its group's merge)
  plus a truncated SVD of its difference from the core; the original router picks
  experts as before. At full rank the layer is reproduced exactly.

Any of them heals by distillation (``heal = {steps = ..., ...}``, :mod:`moebench.healing`).

The last three install :class:`FusedMoE`, a moebench module class that wraps the
architecture's own MoE block (router and shared experts untouched) with a fusion experts
module; it saves and reloads through :func:`moebench.models.load_pretrained`. Its layer
is opaque to the MoEModel view (routing and expert count no longer line up one-to-one),
so later pipeline steps and the ``experts`` count skip it.

The calibration statistics the grouping reads are registered here too: ``coactivation``
and ``output_similarity`` (see :mod:`moebench.analysis`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from moebench.adapter import MoEBlock, MoEModel
from moebench.analysis import (
    coactivation_affinity,
    coactivation_counts,
    output_similarity,
    output_similarity_update,
    weight_similarity,
)
from moebench.calibration import Statistic
from moebench.grouping import Groups, by_frequency, cluster
from moebench.healing import HealParams, enabled, heal, lora_heal, resolved, teacher_for
from moebench.hookspecs import hookimpl
from moebench.merging import merge, operators
from moebench.method import Context, Method
from moebench.params import param
from moebench_plugins.statistics import _hidden_in, _RouterStatistic
from moebench_plugins.trimming import _count, _global_budgets
from torch import nn

CLASS_PATH = "moebench_plugins.fusion:FusedMoE"


# == calibration statistics ===============================================================
class Coactivation(_RouterStatistic):
    """Tokens that select both experts, per MoE layer: ``{layer: [E, E] int64}`` (diagonal: selections)."""

    name = "coactivation"

    def __init__(self, model, seed=0):
        super().__init__(model, seed)
        self.counts: dict[int, torch.Tensor] = {}

    def update(self, layer, block, logits, weights, indices):
        counts = coactivation_counts(indices, block.num_experts).cpu()
        self.counts[layer] = self.counts.get(layer, 0) + counts

    def result(self):
        return self.counts


class OutputSimilarity(Statistic):
    """Cosine similarity of every pair of experts' outputs on the same sampled tokens.

    ``{layer: {"all": [E, E], "routed": [E, E], "tokens": N}}``: ``all`` averages over
    sampled tokens, ``routed`` over the sampled tokens whose top-k holds either expert.
    Every expert runs on at most ``max_tokens`` tokens per layer (drawn with a seeded
    generator, ``per_call`` per forward), so the cost stays bounded on large models.
    """

    name = "output_similarity"
    max_tokens = 2048
    per_call = 256

    def __init__(self, model, seed=0):
        super().__init__(model, seed)
        self.sums: dict[int, dict] = {}
        self.generator = torch.Generator().manual_seed(seed)

    def attach(self) -> list:
        handles = []
        for block in self.model.blocks():
            def hook(module, args, kwargs, output, block=block):
                self._update(block, _hidden_in(args, kwargs))

            handles.append(block.module.register_forward_hook(hook, with_kwargs=True))
        return handles

    def _update(self, block: MoEBlock, hidden: torch.Tensor) -> None:
        x = hidden.detach().reshape(-1, hidden.shape[-1])
        have = int(self.sums[block.layer]["tokens"]) if block.layer in self.sums else 0
        n = min(self.per_call, self.max_tokens - have, x.shape[0])
        if n <= 0:
            return
        pick = torch.randperm(x.shape[0], generator=self.generator)[:n].to(x.device)
        xs = x[pick]
        # .forward, not __call__: other statistics' router hooks must not count these tokens twice
        _, _, indices = self.model.adapter.route(block.router.forward(xs))
        selected = torch.zeros(n, block.num_experts, dtype=torch.bool, device=x.device).scatter_(1, indices, True)
        outputs = torch.stack([block.expert_forward(e, xs) for e in range(block.num_experts)], dim=1)
        update = output_similarity_update(outputs, selected)
        if block.layer in self.sums:
            for key, value in update.items():
                self.sums[block.layer][key] = self.sums[block.layer][key] + value
        else:
            self.sums[block.layer] = update

    def result(self):
        return {layer: output_similarity(sums) for layer, sums in self.sums.items()}


# == fusion experts modules ===============================================================
class _PackedExperts(nn.Module):
    """``M`` SwiGLU experts stored packed like transformers 5 (``gate_up_proj [M, 2I, H]``, ``down_proj [M, H, I]``)."""

    def __init__(self, num_merged: int, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        from transformers.activations import ACT2FN

        self.num_experts = num_merged
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.hidden_act = hidden_act
        self.act_fn = ACT2FN[hidden_act]
        self.gate_up_proj = nn.Parameter(torch.zeros(num_merged, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.zeros(num_merged, hidden_size, intermediate_size))

    def merged_parameters(self) -> list[nn.Parameter]:
        return [self.gate_up_proj, self.down_proj]

    def adapter_parameters(self) -> list[nn.Parameter]:
        return []

    def per_merged(self) -> list[nn.Parameter]:
        """Tensors with one slice per merged expert (a token uses the slices of the experts it runs)."""
        return self.merged_parameters()

    def per_source(self) -> list[nn.Parameter]:
        """Tensors with one slice per original expert (a token uses those of its top-k)."""
        return []

    def unused_numel(self, top_k: int) -> int:
        """Parameters a token leaves unused when its router picks ``top_k`` original experts."""
        return _unused(self.per_merged(), self.num_experts, top_k) + _unused(self.per_source(), getattr(self, "num_source", 0), top_k)


def _unused(params: list[nn.Parameter], n: int, top_k: int) -> int:
    """Of tensors sliced ``n`` ways along dim 0, the numel of the ``n - top_k`` slices a token does not touch."""
    return sum(p.numel() for p in params) // n * (n - min(top_k, n)) if n else 0


class GroupedExperts(_PackedExperts):
    """Merged experts behind the original router: ``assign[e]`` is the merged expert of original expert ``e``.

    A merged expert runs for a token when any of its members is in the token's top-k; its
    routing weight is the sum of those members' weights. Subclasses add what the merged
    expert computes from the members' share of that weight (``group_forward``).
    """

    kind = "grouped"

    def __init__(self, num_experts: int, assign: list[int], hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__(max(assign) + 1, hidden_size, intermediate_size, hidden_act)
        if len(assign) != num_experts:
            raise ValueError(f"assign must name a merged expert for each of the {num_experts} original experts")
        self.num_source = num_experts
        self.register_buffer("assign", torch.tensor(assign, dtype=torch.long), persistent=False)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        group = self.assign[top_k_index]
        for m in torch.unique(group).tolist():
            sel = group == m
            tok = sel.any(dim=1).nonzero().squeeze(1)
            w = torch.where(sel[tok], top_k_weights[tok], torch.zeros_like(top_k_weights[tok]))
            total = w.sum(dim=1, keepdim=True)
            share = w / total.clamp_min(1e-20)
            y = self.group_forward(m, hidden_states[tok], share, top_k_index[tok], top_k_weights[tok])
            out.index_add_(0, tok, (y * total).to(out.dtype))
        return out

    def expert(self, m: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj[m]).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self.down_proj[m])

    def group_forward(self, m, x, share, index, weights) -> torch.Tensor:
        return self.expert(m, x)


class MultiplexExperts(GroupedExperts):
    """Grouped experts whose input gets ``Σ_e share_e · mux[e]``: the members' routing share, projected to the hidden size."""

    kind = "multiplexage"

    def __init__(self, num_experts: int, assign: list[int], hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__(num_experts, assign, hidden_size, intermediate_size, hidden_act)
        self.mux = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def group_forward(self, m, x, share, index, weights):
        bias = torch.einsum("nk,nkh->nh", share.to(x.dtype), self.mux[index])
        return self.expert(m, x + bias)

    def adapter_parameters(self):
        return [self.mux]

    def per_source(self):
        return [self.mux]


class FusedLoRAExperts(GroupedExperts):
    """Grouped experts plus LoRA terms; the gate/up LoRA reads ``[x ; z]``, ``z`` a latent projection of the routing weights."""

    kind = "fused_lora"

    def __init__(self, num_experts: int, assign: list[int], hidden_size: int, intermediate_size: int, hidden_act: str, rank: int, latent: int):
        super().__init__(num_experts, assign, hidden_size, intermediate_size, hidden_act)
        m = self.num_experts
        self.rank, self.latent_dim = rank, latent
        self.latent = nn.Parameter(torch.zeros(num_experts, latent))
        self.lora_gate_up_a = nn.Parameter(torch.zeros(m, rank, hidden_size + latent))
        self.lora_gate_up_b = nn.Parameter(torch.zeros(m, 2 * intermediate_size, rank))
        self.lora_down_a = nn.Parameter(torch.zeros(m, rank, intermediate_size))
        self.lora_down_b = nn.Parameter(torch.zeros(m, hidden_size, rank))

    def reset_adapters(self, generator: torch.Generator) -> None:
        """LoRA init: A (and the latent projection) random, B zero, so the layer starts as the plain merge."""
        with torch.no_grad():
            for p in (self.latent, self.lora_gate_up_a, self.lora_down_a):
                fan_in = p.shape[-1] if p is not self.latent else self.num_source
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
            self.lora_gate_up_b.zero_()
            self.lora_down_b.zero_()

    def group_forward(self, m, x, share, index, weights):
        z = torch.einsum("nk,nkd->nd", weights.to(x.dtype), self.latent[index])
        u = torch.cat([x, z], dim=-1)
        gate_up = F.linear(x, self.gate_up_proj[m]) + F.linear(F.linear(u, self.lora_gate_up_a[m]), self.lora_gate_up_b[m])
        gate, up = gate_up.chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        return F.linear(h, self.down_proj[m]) + F.linear(F.linear(h, self.lora_down_a[m]), self.lora_down_b[m])

    def adapter_parameters(self):
        return [self.latent, self.lora_gate_up_a, self.lora_gate_up_b, self.lora_down_a, self.lora_down_b]

    def per_merged(self):
        return self.merged_parameters() + [self.lora_gate_up_a, self.lora_gate_up_b, self.lora_down_a, self.lora_down_b]

    def per_source(self):
        return [self.latent]


class MixtureOfLoRAExperts(nn.Module):
    """Each original expert ``e`` as its group's core plus low-rank residuals, routed by the original router.

    ``gate_e = core_gate[g] + B_gate,e A_gate,e`` (likewise up and down), ``g = assign[e]``.
    Factors are stored packed: ``gate_up_a [E, 2r, H]`` (gate rows, then up rows),
    ``gate_up_b [E, 2I, r]``, ``down_a [E, r, I]``, ``down_b [E, H, r]``.
    """

    kind = "mixture_of_lora"

    def __init__(self, num_experts: int, assign: list[int], hidden_size: int, intermediate_size: int, hidden_act: str, rank: int):
        super().__init__()
        from transformers.activations import ACT2FN

        if len(assign) != num_experts:
            raise ValueError(f"assign must name a core for each of the {num_experts} experts")
        cores = max(assign) + 1
        self.num_experts, self.num_cores, self.rank = num_experts, cores, rank
        self.hidden_dim, self.intermediate_dim, self.hidden_act = hidden_size, intermediate_size, hidden_act
        self.act_fn = ACT2FN[hidden_act]
        self.register_buffer("assign", torch.tensor(assign, dtype=torch.long), persistent=False)
        self.core_gate_up = nn.Parameter(torch.zeros(cores, 2 * intermediate_size, hidden_size))
        self.core_down = nn.Parameter(torch.zeros(cores, hidden_size, intermediate_size))
        self.gate_up_a = nn.Parameter(torch.zeros(num_experts, 2 * rank, hidden_size))
        self.gate_up_b = nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size, rank))
        self.down_a = nn.Parameter(torch.zeros(num_experts, rank, intermediate_size))
        self.down_b = nn.Parameter(torch.zeros(num_experts, hidden_size, rank))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        inter, r = self.intermediate_dim, self.rank
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:
                continue
            tok, pos = torch.where(top_k_index == e)
            x = hidden_states[tok]
            g = int(self.assign[e])
            t = F.linear(x, self.gate_up_a[e])
            core = F.linear(x, self.core_gate_up[g])
            gate = core[:, :inter] + F.linear(t[:, :r], self.gate_up_b[e, :inter])
            up = core[:, inter:] + F.linear(t[:, r:], self.gate_up_b[e, inter:])
            h = self.act_fn(gate) * up
            y = F.linear(h, self.core_down[g]) + F.linear(F.linear(h, self.down_a[e]), self.down_b[e])
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out

    def merged_parameters(self):
        return [self.core_gate_up, self.core_down]

    def adapter_parameters(self):
        return [self.gate_up_a, self.gate_up_b, self.down_a, self.down_b]

    def unused_numel(self, top_k: int) -> int:
        """A token runs at most ``top_k`` cores and exactly ``top_k`` experts' residuals."""
        return _unused(self.merged_parameters(), self.num_cores, top_k) + _unused(self.adapter_parameters(), self.num_experts, top_k)


EXPERTS_CLASSES = {c.__name__: c for c in (GroupedExperts, MultiplexExperts, FusedLoRAExperts, MixtureOfLoRAExperts)}


class FusedMoE(nn.Module):
    """An architecture's own MoE block (router, shared experts) whose routed experts are a fusion module.

    Built from ``init`` alone when a saved model reloads: ``block`` (the block class),
    ``config`` (the model config as JSON, with this layer's expert count and top-k),
    ``router`` (router attributes to restore), ``experts`` (a class of this module) and
    ``experts_init``. The block sits under ``fused``, not ``experts``/``gate``, so the
    MoEModel view treats the layer as opaque.
    """

    def __init__(self, block: str, config: str, router: str, experts: str, experts_init: dict, _inner: nn.Module | None = None, _experts: nn.Module | None = None):
        super().__init__()
        inner = _inner if _inner is not None else _build_block(block, config, router)
        inner.experts = _experts if _experts is not None else EXPERTS_CLASSES[experts](**experts_init)
        self.fused = inner
        self.kind = experts

    @property
    def fusion(self) -> nn.Module:
        """The fusion experts module."""
        return self.fused.experts

    @property
    def top_k(self) -> int:
        """Original experts the block's router picks per token."""
        for module in self.fused.modules():
            if module is not self.fusion and isinstance(getattr(module, "top_k", None), int):
                return module.top_k
        raise AttributeError(f"no router with a top_k in {type(self.fused).__name__}")

    @property
    def routed_experts(self) -> int:
        """Routed experts this layer holds (merged experts; mixture of LoRA: the original experts it rebuilds)."""
        return self.fusion.num_experts

    def inactive_numel(self) -> int:
        """Parameters a token does not use (for ``params.active``): the block is opaque to the MoE view."""
        return self.fusion.unused_numel(self.top_k)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.fused(hidden_states)

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


_CONFIG_SKIP = {"moebench", "architectures", "transformers_version", "_name_or_path", "auto_map", "dtype", "torch_dtype"}
_ROUTER_ATTRS = ("top_k", "num_experts", "topk_method", "num_group", "topk_group", "norm_topk_prob", "routed_scaling_factor")


def block_spec(model: MoEModel, block: MoEBlock) -> dict[str, str]:
    """What rebuilds ``block``'s class at its current shape: class path, config JSON, router attributes."""
    cls = type(block.module)
    config = {k: v for k, v in model.config.to_diff_dict().items() if k not in _CONFIG_SKIP}
    config["model_type"] = model.config.model_type
    config[model.adapter.num_experts_attr] = block.num_experts
    config[model.adapter.top_k_attr] = block.top_k
    router = {k: getattr(block.router, k) for k in _ROUTER_ATTRS if isinstance(getattr(block.router, k, None), (int, float, str, bool))}
    return {"block": f"{cls.__module__}:{cls.__qualname__}", "config": json.dumps(config, sort_keys=True), "router": json.dumps(router, sort_keys=True)}


def _build_block(block: str, config: str, router: str) -> nn.Module:
    from moebench.plugins import host
    from transformers import AutoConfig

    fields = json.loads(config)
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    module_name, _, cls_name = block.partition(":")
    module = getattr(importlib.import_module(module_name), cls_name)(cfg)
    gate = host().adapter_for(cfg).router(module)
    for key, value in json.loads(router).items():
        setattr(gate, key, value)
    if hasattr(module, "top_k") and "top_k" in json.loads(router):
        module.top_k = json.loads(router)["top_k"]
    return module


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
    balanced: bool = param(True, help="clusters of equal size (busiest experts seed them); false: average-linkage clusters of any size")
    similarity: Literal["output", "weight"] = param("output", help="what the frequency grouping measures closeness by")
    operator: str = param("slerp", help="merge operator: average | frequency_average | slerp | sce | any a plugin registers")
    operator_args: dict = param(default_factory=dict, help="options passed to the operator, e.g. {select = 0.1} for sce")
    scope: Literal["layer", "global"] = param(
        "layer", help="layer: same count per layer; global: one budget spread by routing frequency (each layer keeps at least its top-k)"
    )
    heal: HealParams = param(default_factory=HealParams, help="distillation healing, e.g. {steps = 100, loss = 'kl'} (steps = 0: none)")

    def check(self):
        if self.keep is None and self.keep_ratio is None:
            raise ValueError("keep_ratio or keep must be set")
        if self.keep_ratio is not None and not 0 < self.keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.keep is not None and self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")
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
    operator: str = param("sce", help="merge operator at each halving step")


@dataclass
class VariantParams(GroupParams):
    def check(self):
        super().check()
        if self.heal.train == "lora":
            raise ValueError("heal.train = 'lora' applies to merge and progressive_merge; this method trains its own adapters")


@dataclass
class FusedLoRAParams(VariantParams):
    rank: int = param(8, help="LoRA rank per merged expert")
    latent: int = param(8, help="size of the latent projection of the original routing weights fed to the LoRA")

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

    def check(self):
        if self.keep is None and self.keep_ratio is None:
            self.keep = 1
        super().check()
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")


# == shared steps =========================================================================
def _needs(params: GroupParams, router: str | None = None) -> tuple[str, ...]:
    needs = ["routing_counts"]
    if params.grouping == "act_cl":
        needs.append("coactivation")
    if params.grouping == "state_cl" or (params.grouping == "frequency" and params.similarity == "output"):
        needs.append("output_similarity")
    if router == "sum_prob":
        needs.append("moe_io")
    return tuple(needs)


def _budgets(model: MoEModel, blocks: list[MoEBlock], params: GroupParams, stats: dict) -> dict[int, int]:
    """Merged experts per layer: the same count everywhere, or one budget spread by normalised routing frequency."""
    budgets = {b.layer: _count(b.num_experts, params) for b in blocks}
    if params.scope == "global":
        counts = stats["routing_counts"]
        scores = {b.layer: counts[b.layer].double() / counts[b.layer].sum().clamp_min(1) - 1e-12 * torch.arange(b.num_experts) for b in blocks}
        budgets = _global_budgets(blocks, scores, sum(budgets.values()))
    return budgets


def _group(block: MoEBlock, n: int, params: GroupParams, stats: dict) -> Groups:
    freq = stats["routing_counts"][block.layer].double()
    if params.grouping == "act_cl":
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
def merged_experts(block: MoEBlock, groups: Groups, freq: torch.Tensor, operator: str, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's gate, up and down merged separately: ``(gate_up [M, 2I, H], down [M, H, I])``."""
    inter = block.intermediate_size
    gate_up, down = [], []
    for members in groups.members:
        idx = torch.tensor(members, device=block.gate_up_proj.device)
        w = _member_weights(freq, members)
        gu = block.gate_up_proj.data[idx]
        gate = merge(gu[:, :inter], w, operator, **options)
        up = merge(gu[:, inter:], w, operator, **options)
        gate_up.append(torch.cat([gate, up], dim=0))
        down.append(merge(block.down_proj.data[idx], w, operator, **options))
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


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _module_path(model: MoEModel, module: nn.Module) -> str:
    for name, m in model.model.named_modules():
        if m is module:
            return name
    raise ValueError("module is not part of the model")


def _reload(model: MoEModel) -> str:
    return "moebench" if model.needs_moebench_loader() else "transformers"


def _params_summary(params) -> dict:
    return {k: v for k, v in asdict(params).items() if k != "heal"}


# == methods ==============================================================================
def _merge_layer(model: MoEModel, block: MoEBlock, n: int, params: MergeParams, stats: dict) -> tuple[Groups, list[str]]:
    groups = _group(block, n, params, stats)
    freq = stats["routing_counts"][block.layer]
    gate_up, down = merged_experts(block, groups, freq, params.operator, params.operator_args)
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
        return _needs(params, params.router)

    def apply(self, model: MoEModel, params: MergeParams, ctx: Context) -> dict:
        blocks = list(model.blocks())
        stats = ctx.stats(model, *self.needs(params))
        budgets = _budgets(model, blocks, params, stats)
        before = {b.layer: b.num_experts for b in blocks}
        groups = {}
        for b in blocks:
            groups[b.layer], notes = _merge_layer(model, b, budgets[b.layer], params, stats)
            for note in notes:
                ctx.note(f"layer {b.layer}: {note}")
        model.lineage.append(f"merge({_digest([_params_summary(params), {k: g.members for k, g in groups.items()}])})")
        changes = _summary(model, before, groups, params)
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
        return _needs(params, params.router)

    def apply(self, model: MoEModel, params: ProgressiveParams, ctx: Context) -> dict:
        blocks = list(model.blocks())
        before = {b.layer: b.num_experts for b in blocks}
        targets = _budgets(model, blocks, params, ctx.stats(model, *self.needs(params)))
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
                model.lineage.append(f"progressive_merge({_digest([_params_summary(params), members, len(steps)])})")
                step = {"experts": sum(model.expert_counts().values())}
                if enabled(params.heal):
                    if teacher is None and params.heal.train != "lora":
                        teacher, _ = teacher_for(model, ctx)
                    step["healing"] = _heal_merged(model, params.heal, ctx, teacher=teacher)
                    curve.extend(step["healing"]["loss_curve"])
                steps.append(step)
        finally:
            del teacher
        changes = _summary(model, before, {layer: Groups(m) for layer, m in members.items()}, params)
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


class _Variant(Method):
    """Shared flow of the variants that keep the original router and wrap the block in :class:`FusedMoE`."""

    Params = VariantParams
    stats = ("routing_counts", "output_similarity")  # for the defaults; needs() follows the params
    #: how tokens reach the fused experts (for the record)
    routing = "original router top-k over the original experts; a merged expert runs with the summed weight of its selected members"

    def needs(self, params) -> tuple[str, ...]:
        return _needs(params)

    def build(self, model: MoEModel, block: MoEBlock, groups: Groups, freq: torch.Tensor, params, ctx: Context) -> tuple[nn.Module, dict, dict]:
        """The experts module for one layer, its init kwargs, and per-layer facts for the record."""
        raise NotImplementedError

    def apply(self, model: MoEModel, params, ctx: Context) -> dict:
        blocks = list(model.blocks())
        stats = ctx.stats(model, *self.needs(params))
        budgets = _budgets(model, blocks, params, stats)
        before = {b.layer: b.num_experts for b in blocks}
        groups, facts = {}, {}
        fused: list[FusedMoE] = []
        for b in blocks:
            groups[b.layer] = g = _group(b, budgets[b.layer], params, stats)
            experts, init, facts[b.layer] = self.build(model, b, g, stats["routing_counts"][b.layer], params, ctx)
            ref = b.gate_up_proj
            experts = experts.to(device=ref.device, dtype=ref.dtype)
            spec = {**block_spec(model, b), "experts": type(experts).__name__, "experts_init": init}
            path = _module_path(model, b.module)
            wrapper = FusedMoE(**spec, _inner=b.module, _experts=experts)
            model.replace_module(path, wrapper, {"class": CLASS_PATH, "init": spec})
            fused.append(wrapper)
        model.lineage.append(f"{self.name}({_digest([_params_summary(params), {k: g.members for k, g in groups.items()}])})")
        ctx.note(f"{self.name}: fused layers are opaque to the MoEModel view (later steps and the experts count skip them; params.active counts all their weights)")
        changes = _summary(model, before, groups, params, after={layer: g.num_groups for layer, g in groups.items()})
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


class Multiplexage(_Variant):
    """Merged experts behind the original router, with a learned bias from the members' routing share (moe-pruner's multiplexage)."""

    name = "multiplexage"
    Params = VariantParams

    def build(self, model, block, groups, freq, params, ctx):
        gate_up, down = merged_experts(block, groups, freq, params.operator, params.operator_args)
        init = _experts_init(model, block, groups)
        experts = MultiplexExperts(**init)
        with torch.no_grad():
            experts.gate_up_proj.copy_(gate_up)
            experts.down_proj.copy_(down)
        return experts, init, {"merged": groups.num_groups, "top_k": block.top_k}


class FusedLoRA(_Variant):
    """Merged experts plus a LoRA per merged expert whose input includes a latent projection of the original routing weights."""

    name = "fused_lora"
    Params = FusedLoRAParams

    def build(self, model, block, groups, freq, params, ctx):
        gate_up, down = merged_experts(block, groups, freq, params.operator, params.operator_args)
        init = {**_experts_init(model, block, groups), "rank": params.rank, "latent": params.latent}
        experts = FusedLoRAExperts(**init)
        with torch.no_grad():
            experts.gate_up_proj.copy_(gate_up)
            experts.down_proj.copy_(down)
        experts.reset_adapters(torch.Generator().manual_seed(ctx.seed * 1000 + block.layer))
        return experts, init, {"merged": groups.num_groups, "top_k": block.top_k, "rank": params.rank, "latent": params.latent}


class MixtureOfLoRA(_Variant):
    """Each expert as a shared core plus a truncated-SVD low-rank residual, gated by the original router (exact at full rank)."""

    name = "mixture_of_lora"
    Params = MixtureOfLoRAParams
    routing = "original router and top-k unchanged; each selected expert is its core plus its low-rank residual"

    def build(self, model, block, groups, freq, params, ctx):
        cores_gu, cores_d = merged_experts(block, groups, freq, params.operator, params.operator_args)
        inter, hidden = block.intermediate_size, block.gate_up_proj.shape[-1]
        rank = min(params.rank, inter, hidden)
        init = {**_experts_init(model, block, groups), "rank": rank}
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
                experts.gate_up_a[e].copy_(torch.cat([a_g, a_u]))
                experts.gate_up_b[e, :inter].copy_(b_g)
                experts.gate_up_b[e, inter:].copy_(b_u)
                experts.down_a[e].copy_(a_d)
                experts.down_b[e].copy_(b_d)
                for w, approx in ((gate, core_gate + b_g @ a_g), (up, core_up + b_u @ a_u), (down, cores_d[assign[e]] + b_d @ a_d)):
                    kept += (w.float() - approx.float()).pow(2).sum().item()
                    total += w.float().pow(2).sum().item()
        full = rank >= min(inter, hidden)
        return experts, init, {"cores": groups.num_groups, "top_k": block.top_k, "rank": rank, "full_rank": full, "weight_rel_error": math.sqrt(kept / max(total, 1e-30))}


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


def _experts_init(model: MoEModel, block: MoEBlock, groups: Groups) -> dict:
    return {
        "num_experts": block.num_experts,
        "assign": groups.assign,
        "hidden_size": block.gate_up_proj.shape[-1],
        "intermediate_size": block.intermediate_size,
        "hidden_act": model.config.hidden_act,
    }


def _summary(model: MoEModel, before: dict[int, int], groups: dict[int, Groups], params, after: dict[int, int] | None = None) -> dict:
    after = after or model.expert_counts()
    return {
        "groups": {layer: g.members for layer, g in groups.items()},
        "experts_before": sum(before.values()),
        "experts_after": sum(after.values()),
        "experts_per_layer": dict(after),
        "grouping": params.grouping,
        "operator": params.operator,
        "top_k": {layer: b.top_k for layer, b in ((b.layer, b) for b in model.blocks())},
    }


@hookimpl
def register_methods():
    return [Merge, ProgressiveMerge, Multiplexage, FusedLoRA, MixtureOfLoRA]


@hookimpl
def register_statistics():
    return [Coactivation, OutputSimilarity]
