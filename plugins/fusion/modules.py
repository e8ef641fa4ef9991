"""The fusion experts modules and :class:`FusedMoE`, the wrapper the fusion variants install in a layer."""


from __future__ import annotations

import json
import math
import sys

import torch
import torch.nn.functional as F
from moebench.adapter import MoEBlock, MoEModel
from torch import nn

#: the name saved models give FusedMoE (its entry in moebench's module-class allow-list)
CLASS_PATH = "moebench_plugins.fusion:FusedMoE"


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


class MemberAdapterExperts(GroupedExperts):
    """moe-pruner's fused expert (``FusedLinear``, mixture adapters): the group's merged expert plus one
    low-rank adapter per member, mixed by the members' routing weights.

    For a token routed to members ``e`` of merged expert ``m`` with weights ``w_e``: the input
    gets ``Σ_e w_e · mux[e]`` (moe-pruner's ``mask_up_proj``, an up-projection of the members'
    weights), and each projection ``P`` (gate, up, down) computes
    ``P_m x + s_P,m ⊙ Σ_e w_e · B_P,e A_P,e x``. Adapters start as a truncated SVD of the
    member's difference from the merge, scaled down by ``c = Σσ / r`` as the reference does;
    ``s`` (per output feature) is set on the first forward to ``mean|P_m x| / mean|adapter|``
    (1 where an adapter is zero, a guard the reference lacks). Factors are packed:
    ``gate_up_a [E, 2r, H]`` (gate rows, then up rows), ``gate_up_b [E, 2I, r]``,
    ``down_a [E, r, I]``, ``down_b [E, H, r]``.
    """

    kind = "member_adapters"

    def __init__(self, num_experts: int, assign: list[int], hidden_size: int, intermediate_size: int, hidden_act: str, rank: int):
        super().__init__(num_experts, assign, hidden_size, intermediate_size, hidden_act)
        m = self.num_experts
        self.rank = rank
        self.mux = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.gate_up_a = nn.Parameter(torch.zeros(num_experts, 2 * rank, hidden_size))
        self.gate_up_b = nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size, rank))
        self.down_a = nn.Parameter(torch.zeros(num_experts, rank, intermediate_size))
        self.down_b = nn.Parameter(torch.zeros(num_experts, hidden_size, rank))
        self.gate_up_scale = nn.Parameter(torch.ones(m, 2 * intermediate_size))
        self.down_scale = nn.Parameter(torch.ones(m, hidden_size))
        self.register_buffer("scaled", torch.zeros(m, dtype=torch.bool))  # saved: a reloaded model keeps its scales

    def group_forward(self, m, x, share, index, weights):
        inter, r = self.intermediate_dim, self.rank
        mine = self.assign[index] == m
        w = torch.where(mine, weights, torch.zeros_like(weights)).to(x.dtype)
        x = x + torch.einsum("nk,nkh->nh", w, self.mux[index])
        members = torch.unique(index[mine]).tolist()
        gate_up = F.linear(x, self.gate_up_proj[m])
        extra = torch.zeros_like(gate_up)
        for e in members:
            tok, pos = torch.where(index == e)
            t = F.linear(x[tok], self.gate_up_a[e])
            delta = torch.cat([F.linear(t[:, :r], self.gate_up_b[e, :inter]), F.linear(t[:, r:], self.gate_up_b[e, inter:])], dim=-1)
            extra.index_add_(0, tok, delta * w[tok, pos, None])
        gate_up = gate_up + self._scale(self.gate_up_scale, m, gate_up, extra) * extra
        gate, up = gate_up.chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        y = F.linear(h, self.down_proj[m])
        extra = torch.zeros_like(y)
        for e in members:
            tok, pos = torch.where(index == e)
            extra.index_add_(0, tok, F.linear(F.linear(h[tok], self.down_a[e]), self.down_b[e]) * w[tok, pos, None])
        y = y + self._scale(self.down_scale, m, y, extra) * extra
        if not self.scaled[m] and x.shape[0]:
            self.scaled[m] = True
        return y

    def _scale(self, scale: nn.Parameter, m: int, main: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        """The per-feature scale, set from this batch the first time merged expert ``m`` runs."""
        if not self.scaled[m] and main.shape[0]:
            with torch.no_grad():
                adapter = extra.abs().mean(0)
                scale[m] = torch.where(adapter > 1e-8, main.abs().mean(0) / adapter.clamp_min(1e-8), torch.ones_like(adapter)).to(scale.dtype)
        return scale[m]

    def adapter_parameters(self):
        return [self.mux, self.gate_up_a, self.gate_up_b, self.down_a, self.down_b, self.gate_up_scale, self.down_scale]

    def per_merged(self):
        return self.merged_parameters() + [self.gate_up_scale, self.down_scale]

    def per_source(self):
        return [self.mux, self.gate_up_a, self.gate_up_b, self.down_a, self.down_b]


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

    @torch.no_grad()
    def set_residual(self, e: int, gate: tuple[torch.Tensor, torch.Tensor], up: tuple[torch.Tensor, torch.Tensor], down: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Store expert ``e``'s residual factors ``(B, A)`` of its gate, up and down projections (packed as above)."""
        inter = self.intermediate_dim
        self.gate_up_a[e].copy_(torch.cat([gate[1], up[1]]))
        self.gate_up_b[e, :inter].copy_(gate[0])
        self.gate_up_b[e, inter:].copy_(up[0])
        self.down_a[e].copy_(down[1])
        self.down_b[e].copy_(down[0])

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


EXPERTS_CLASSES = {c.__name__: c for c in (GroupedExperts, MultiplexExperts, FusedLoRAExperts, MemberAdapterExperts, MixtureOfLoRAExperts)}


class FusedMoE(nn.Module):
    """An architecture's own MoE block (router, shared experts) whose routed experts are a fusion module.

    Built from ``init`` alone when a saved model reloads: ``block`` (the block class),
    ``config`` (the model config as JSON, with this layer's expert count and top-k),
    ``router`` (router attributes to restore), ``experts`` (a class of this module) and
    ``experts_init``. The block sits under ``fused``, not ``experts``/``gate``, so the
    MoEModel view treats the layer as opaque. Every argument is data read from a saved
    config: ``block`` must be the MoE block class of the config's own transformers model
    and ``experts`` one of :data:`EXPERTS_CLASSES`; nothing else is imported.
    """

    class_path = CLASS_PATH

    def __init__(self, block: str, config: str, router: str, experts: str, experts_init: dict, _inner: nn.Module | None = None, _experts: nn.Module | None = None):
        super().__init__()
        inner = _inner if _inner is not None else _build_block(block, config, router)
        if _experts is None and experts not in EXPERTS_CLASSES:
            raise ValueError(f"experts {experts!r}: expected one of {', '.join(EXPERTS_CLASSES)}")
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


def block_class(block: str, cfg) -> type:
    """The class ``block`` ("module:Class") names, only if it lives in the transformers module of ``cfg``'s model.

    Resolving the model class of ``cfg.model_type`` imports that transformers module (as
    building the model would); the block name is then looked up in it. A name anywhere
    else is refused, so a saved config cannot make moebench import or call other code.
    """
    from transformers import AutoModelForCausalLM

    try:
        model_cls = AutoModelForCausalLM._model_mapping[type(cfg)]
    except KeyError:
        raise ValueError(f"block {block!r}: no causal LM class for model type {cfg.model_type!r}") from None
    module_name, _, cls_name = block.partition(":")
    cls = getattr(sys.modules.get(module_name), cls_name, None) if module_name == model_cls.__module__ and cls_name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"block {block!r}: expected a module class of {model_cls.__module__} (the {cfg.model_type} model's own)")
    return cls


def _build_block(block: str, config: str, router: str) -> nn.Module:
    from moebench.plugins import host
    from transformers import AutoConfig

    fields = json.loads(config)
    if not isinstance(fields, dict) or not isinstance(fields.get("model_type"), str):
        raise ValueError("config: expected a JSON object with a model_type")
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    adapter = host().adapter_for(cfg)  # an architecture moebench supports, or a one-line refusal
    module = block_class(block, cfg)(cfg)
    gate = adapter.router(module)
    for key, value in json.loads(router).items():
        setattr(gate, key, value)
    if hasattr(module, "top_k") and "top_k" in json.loads(router):
        module.top_k = json.loads(router)["top_k"]
    return module
