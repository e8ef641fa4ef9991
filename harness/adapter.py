"""One view over every MoE architecture, and the edits compression methods make.

transformers 5 stores routed experts packed: ``experts.gate_up_proj [E, 2I, H]`` (gate
rows first, then up), ``experts.down_proj [E, H, I]``, and a router ``gate.weight
[E, H]``. Architectures differ in where the blocks sit, what the config calls the
expert count, shared experts and router details. An :class:`Adapter` (one per family,
registered by a plugin) hides those differences; :class:`MoEModel` gives methods a
single vocabulary: layers, MoE blocks, per-expert weights, router, shared experts,
and the edits keep/replace experts, set top-k, skip a MoE block, drop decoder blocks,
replace a module. Every edit is written down in ``config.moebench`` so a saved model
reloads with the same structure (see :mod:`moebench.models`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


class Adapter:
    """Maps one transformers MoE family onto the moebench view.

    The defaults fit the transformers 5 layout shared by DeepSeek, Mixtral, Qwen-MoE and
    OLMoE (``model.model.layers[i].mlp`` with ``.gate`` and ``.experts``); a subclass
    overrides only what differs.
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    #: config attribute that holds the routed expert count
    num_experts_attr: ClassVar[str] = "num_experts"
    top_k_attr: ClassVar[str] = "num_experts_per_tok"

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        """Put a new decoder-layer list in place (where :meth:`layers` reads it)."""
        model.model.layers = layers

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        mlp = getattr(layer, "mlp", None)
        return mlp if mlp is not None and hasattr(mlp, "experts") and hasattr(mlp, "gate") else None

    def set_moe_block(self, layer: nn.Module, module: nn.Module) -> None:
        """Put ``module`` where the layer's MoE block sits (where :meth:`moe_block` reads it)."""
        layer.mlp = module

    def router(self, block: nn.Module) -> nn.Module:
        return block.gate

    def experts(self, block: nn.Module) -> nn.Module:
        return block.experts

    def shared_experts(self, block: nn.Module) -> nn.Module | None:
        return None

    def route(self, router_output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits [T, E], weights [T, k], indices [T, k])`` from the router's forward output."""
        logits, weights, indices = router_output
        return logits, weights, indices

    def probabilities(self, block: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """Per-expert routing scores the router ranks by (softmax for most families)."""
        return logits.float().softmax(dim=-1)

    def reroute(self, router_output, weights: torch.Tensor, indices: torch.Tensor):
        """The router's output with new ``weights``/``indices`` (inverse of :meth:`route`)."""
        logits, _, _ = router_output
        return logits, weights, indices

    def wrap_router(self, router: nn.Module, rule: "RoutingRule"):
        """Make ``rule`` change what ``router`` returns (a forward hook); returns the hook handle.

        Skipped slots get the sentinel index ``E`` (the expert count) and weight 0: every
        transformers 5 experts implementation, and moebench's own, skips that index, so a
        skipped expert costs no compute.
        """

        def hook(module, args, output):
            logits, weights, indices = self.route(output)
            probs = self.probabilities(module, logits)
            keep = rule.keep(probs, weights, indices)
            keep[:, :1] |= ~keep.any(dim=-1, keepdim=True)  # a token keeps at least one expert
            sentinel = router.weight.shape[0]
            new = torch.where(keep, weights, torch.zeros_like(weights))
            if rule.renormalize:
                new = new * (weights.sum(-1, keepdim=True) / new.sum(-1, keepdim=True).clamp_min(1e-20))
            rule.observe(keep)
            return self.reroute(output, new.to(weights.dtype), torch.where(keep, indices, torch.full_like(indices, sentinel)))

        return router.register_forward_hook(hook)

    #: router buffers indexed by expert (sliced with the router rows)
    expert_buffers: ClassVar[tuple[str, ...]] = ()

    def slice_router(self, router: nn.Module, keep: torch.Tensor) -> list[str]:
        """Keep router rows ``keep`` (and per-expert buffers). Returns notes on behaviour changes."""
        router.weight = _param_like(router.weight, router.weight.data[keep])
        for name in self.expert_buffers:
            setattr(router, name, getattr(router, name)[keep].clone())
        return self.resize_router(router, len(keep))

    def resize_router(self, router: nn.Module, n: int) -> list[str]:
        """Make router state consistent with ``n`` experts (counts, expert groups)."""
        router.num_experts = n
        return []

    def sync_config(self, config, num_experts: int, top_k: int) -> None:
        setattr(config, self.num_experts_attr, num_experts)
        setattr(config, self.top_k_attr, top_k)

    def after_layers_dropped(self, config, kept: Sequence[int], moe_flags: Sequence[bool]) -> None:
        """Update per-layer config fields after decoder blocks were removed."""
        config.num_hidden_layers = len(kept)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [config.layer_types[i] for i in kept]


@dataclass
class MoEBlock:
    """One MoE block seen through the adapter: router, packed experts, shared experts."""

    layer: int
    module: nn.Module
    adapter: Adapter

    @property
    def router(self) -> nn.Module:
        return self.adapter.router(self.module)

    @property
    def experts(self) -> nn.Module:
        return self.adapter.experts(self.module)

    @property
    def shared(self) -> nn.Module | None:
        return self.adapter.shared_experts(self.module)

    @property
    def num_experts(self) -> int:
        return self.router.weight.shape[0]

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def intermediate_size(self) -> int:
        return self.experts.down_proj.shape[-1]

    @property
    def gate_up_proj(self) -> torch.Tensor:
        """``[E, 2I, H]``: gate rows ``[:, :I]``, up rows ``[:, I:]``."""
        return self.experts.gate_up_proj

    @property
    def down_proj(self) -> torch.Tensor:
        """``[E, H, I]``."""
        return self.experts.down_proj

    @property
    def router_weight(self) -> torch.Tensor:
        """``[E, H]``."""
        return self.router.weight

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert ``e``'s ``(gate [I, H], up [I, H], down [H, I])`` as views of the packed tensors."""
        inter = self.intermediate_size
        gate_up = self.experts.gate_up_proj[e]
        return gate_up[:inter], gate_up[inter:], self.experts.down_proj[e]

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` applied to tokens ``x [T, H]`` (no routing weight)."""
        gate, up, down = self.expert(e)
        act = self.experts.act_fn
        return nn.functional.linear(act(nn.functional.linear(x, gate)) * nn.functional.linear(x, up), down)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return self.adapter.probabilities(self.module, logits)


class RoutingRule(nn.Module):
    """A runtime routing change: which of a token's selected experts actually run.

    Installed by :meth:`MoEModel.set_routing` as the router's child ``routing_rule``
    (no weights, so checkpoints keep their keys) and applied by the adapter's
    :meth:`Adapter.wrap_router`; recorded in ``config.moebench`` like any moebench module,
    so a saved model reloads with the same routing. ``tokens``/``slots`` count what ran
    since the last :meth:`reset` (realised experts per token, for FLOPs).
    """

    #: scale the kept weights back to the selected experts' total weight
    renormalize: bool = True

    def __init__(self):
        super().__init__()
        self.tokens = 0
        self.slots = 0

    def keep(self, probs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``[T, k]`` bool: which selected slots run, from the router's scores ``probs [T, E]``."""
        raise NotImplementedError

    def observe(self, keep: torch.Tensor) -> None:
        self.tokens += keep.shape[0]
        self.slots += int(keep.sum())

    def reset(self) -> None:
        self.tokens = self.slots = 0

    def realised_top_k(self) -> float | None:
        """Mean experts run per token since the last reset (None before any token)."""
        return self.slots / self.tokens if self.tokens else None


#: the router's child attribute that holds its :class:`RoutingRule`
ROUTING_ATTR = "routing_rule"


def install_routing(model: nn.Module, adapter: Adapter) -> int:
    """Hook every :class:`RoutingRule` found under a router into it (after a load); returns how many."""
    found = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, RoutingRule) and name.endswith("." + ROUTING_ATTR):
            router = model.get_submodule(name.rpartition(".")[0])
            old = getattr(router, "_moebench_routing_handle", None)
            if old is not None:
                old.remove()
            router._moebench_routing_handle = adapter.wrap_router(router, module)
            found += 1
    return found


class PassThrough(nn.Module):
    """Stands in for a skipped MoE block: contributes nothing, so the residual stream passes through."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class MoEModel:
    """A causal LM with its adapter: the only object compression methods touch."""

    def __init__(self, model: nn.Module, adapter: Adapter, tokenizer=None, source: str = "", identity: str = ""):
        self.model = model
        self.adapter = adapter
        self.tokenizer = tokenizer
        self.source = source
        #: what the weights were loaded from (source plus checkpoint fingerprint), for cache keys
        self.identity = identity or source
        #: lineage of edits applied since load; part of the calibration cache key
        self.lineage: list[str] = []
        #: the format the last :meth:`save` wrote: "transformers", "moebench" (own layout) or a plugin's standard format
        self.saved_format: str | None = None
        #: set when the model is streamed from disk (``[model] offload``, :class:`moebench.offload.DiskOffload`):
        #: its decoder layers stay on ``meta`` except the one the layer loop is on
        self.stream = None

    # -- view ---------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def layers(self) -> nn.ModuleList:
        return self.adapter.layers(self.model)

    def block(self, layer: int) -> MoEBlock | None:
        module = self.adapter.moe_block(self.layers[layer])
        return None if module is None else MoEBlock(layer, module, self.adapter)

    def blocks(self) -> Iterator[MoEBlock]:
        """The MoE blocks, in layer order (dense and skipped layers left out)."""
        for i in range(len(self.layers)):
            block = self.block(i)
            if block is not None:
                yield block

    @property
    def moe_layers(self) -> list[int]:
        return [b.layer for b in self.blocks()]

    def expert_counts(self) -> dict[int, int]:
        return {b.layer: b.num_experts for b in self.blocks()}

    # -- edits --------------------------------------------------------------------------
    def keep_experts(self, layer: int, keep: Sequence[int]) -> list[str]:
        """Keep only experts ``keep`` (in that order) in ``layer``: packed weights and router rows sliced.

        Routing then renormalises over the kept experts exactly as the architecture does
        (softmax over the remaining logits, then its own top-k normalisation). Top-k is
        lowered if fewer experts than top-k remain. Returns notes on behaviour changes.
        """
        block = self._moe(layer)
        notes = slice_experts(block, keep)
        self.record_edit(f"keep_experts({layer},{list(keep)})")
        return notes

    def zero_experts(self, layer: int, experts: Sequence[int]) -> None:
        """Zero the weights of ``experts`` in ``layer``, router untouched: a token routed to one
        loses that expert's contribution (a gated MLP of zero weights outputs exactly zero)."""
        block = self._moe(layer)
        index = torch.as_tensor(list(experts), dtype=torch.long, device=block.gate_up_proj.device)
        with torch.no_grad():
            block.experts.gate_up_proj.index_fill_(0, index, 0)
            block.experts.down_proj.index_fill_(0, index, 0)
        self.record_edit(f"zero_experts({layer},{list(experts)})")

    def replace_experts(
        self,
        layer: int,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        router_weight: torch.Tensor,
        router_buffers: dict[str, torch.Tensor] | None = None,
    ) -> list[str]:
        """Install a new set of experts (e.g. merged ones) with their router rows.

        Per-expert router buffers the adapter names (``expert_buffers``) come from
        ``router_buffers`` or start at zero.
        """
        block = self._moe(layer)
        n = gate_up_proj.shape[0]
        if down_proj.shape[0] != n or router_weight.shape[0] != n:
            raise ValueError("gate_up_proj, down_proj and router_weight must have the same expert count")
        experts = block.experts
        experts.gate_up_proj = _param_like(experts.gate_up_proj, gate_up_proj)
        experts.down_proj = _param_like(experts.down_proj, down_proj)
        experts.num_experts = n
        router = block.router
        router.weight = _param_like(router.weight, router_weight)
        for name in self.adapter.expert_buffers:  # e.g. DeepSeek-V3's score-correction bias
            old = getattr(router, name)
            new = (router_buffers or {}).get(name, torch.zeros(n, dtype=old.dtype, device=old.device))
            setattr(router, name, new.to(old.dtype).to(old.device))
        notes = self.adapter.resize_router(router, n)
        if router.top_k > n:
            self.set_top_k(layer, n)
        self.record_edit(f"replace_experts({layer},{n},{_digest(gate_up_proj, down_proj, router_weight)})")
        return notes

    def set_top_k(self, layer: int, k: int) -> None:
        block = self._moe(layer)
        if not 1 <= k <= block.num_experts:
            raise ValueError(f"layer {layer}: top_k must be in [1, {block.num_experts}], got {k}")
        block.router.top_k = k
        if hasattr(block.module, "top_k"):
            block.module.top_k = k
        self.record_edit(f"set_top_k({layer},{k})")

    def skip_moe(self, layer: int) -> None:
        """Remove the MoE block of ``layer`` (shared experts included); attention stays."""
        self._moe(layer)
        self.adapter.set_moe_block(self.layers[layer], PassThrough())
        self.record_edit(f"skip_moe({layer})")

    def drop_layers(self, indices: Sequence[int]) -> None:
        """Remove whole decoder blocks; renumber the rest and update the config so it reloads."""
        drop = set(indices)
        n = len(self.layers)
        if not drop <= set(range(n)) or len(drop) >= n:
            raise ValueError(f"can drop decoder blocks among 0..{n - 1}, leaving at least one; got {sorted(drop)}")
        struct = self.structure()
        old_moe = [not _is_dense(self.adapter, layer) for layer in self.layers]
        kept = [i for i in range(n) if i not in drop]
        new_layers = nn.ModuleList([self.layers[i] for i in kept])
        for new_idx, layer in enumerate(new_layers):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_idx
        self.adapter.set_layers(self.model, new_layers)
        self.adapter.after_layers_dropped(self.config, kept, [old_moe[i] for i in kept])
        remap = {old: new for new, old in enumerate(kept)}
        self._write_structure(
            {
                "skip_moe": [remap[i] for i in struct["skip_moe"] if i in remap],
                "modules": {
                    _remap_path(p, remap): spec
                    for p, spec in struct["modules"].items()
                    if _layer_of(p) is None or _layer_of(p) in remap
                },
            }
        )
        self.record_edit(f"drop_layers({sorted(drop)})")

    def replace_module(self, path: str, module: nn.Module, spec: dict) -> None:
        """Swap the submodule at ``path`` for a moebench module class.

        ``spec`` must hold ``{"class": "package.module:Class", "init": {...}}``: the
        loader rebuilds ``Class(**init)`` at ``path`` before loading weights, so models
        with custom modules (quantized experts, LoRA fusion) save and reload.
        """
        parent_path, _, attr = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        setattr(parent, attr, module)
        modules = self.structure()["modules"]
        modules[path] = spec
        self._write_structure({"modules": modules})
        self.record_edit(f"replace_module({path},{spec.get('class')},{_digest(*module.state_dict().values())})")

    def set_routing(self, layer: int, rule: RoutingRule, spec: dict) -> None:
        """Install a runtime routing rule on ``layer``'s router (replacing any earlier one).

        ``spec`` is the rule's ``{"class": ..., "init": {...}}`` (see :meth:`replace_module`),
        so the saved model reloads with the same routing.
        """
        block = self._moe(layer)
        path = _path_of(self.model, block.router)
        self.replace_module(f"{path}.{ROUTING_ATTR}", rule, spec)
        router = block.router
        old = getattr(router, "_moebench_routing_handle", None)
        if old is not None:
            old.remove()
        router._moebench_routing_handle = self.adapter.wrap_router(router, rule)
        self.record_edit(f"set_routing({layer},{json.dumps(spec, sort_keys=True)})")

    def routing_rules(self) -> dict[int, RoutingRule]:
        """The routing rules installed, by layer."""
        return {b.layer: rule for b in self.blocks() if isinstance(rule := getattr(b.router, ROUTING_ATTR, None), RoutingRule)}

    # -- structure (what the loader must rebuild) --------------------------------------
    def structure(self) -> dict:
        """The structure in ``config.moebench``: per-layer expert counts and top-k, skipped blocks, custom modules."""
        struct = dict(getattr(self.config, "moebench", None) or {})
        return {
            "num_experts": {int(k): v for k, v in struct.get("num_experts", {}).items()},
            "top_k": {int(k): v for k, v in struct.get("top_k", {}).items()},
            "router": {int(k): v for k, v in struct.get("router", {}).items()},
            "skip_moe": list(struct.get("skip_moe", [])),
            "modules": dict(struct.get("modules", {})),
        }

    def sync_config(self) -> None:
        """Write the current shapes into the config before saving.

        Uniform expert counts and top-k go into the architecture's own config fields,
        so plain transformers reloads the model. Counts that differ per layer are
        recorded per layer in ``config.moebench`` (the global field holds the maximum);
        only :func:`moebench.models.load_pretrained` rebuilds those.
        """
        counts = {b.layer: b.num_experts for b in self.blocks()}
        top_ks = {b.layer: b.top_k for b in self.blocks()}
        routers = {b.layer: _router_state(b.router) for b in self.blocks()}
        struct = self.structure()
        struct["skip_moe"] = sorted(
            i for i, layer in enumerate(self.layers) if isinstance(getattr(layer, "mlp", None), PassThrough)
        )
        if counts:
            self.adapter.sync_config(self.config, max(counts.values()), max(top_ks.values()))
        uniform = len(set(counts.values())) <= 1 and len(set(top_ks.values())) <= 1
        uniform = uniform and len({tuple(sorted(r.items())) for r in routers.values()}) <= 1
        struct["num_experts"] = {} if uniform else counts
        struct["top_k"] = {} if uniform else top_ks
        struct["router"] = {} if uniform else routers
        if uniform and routers:
            for key, value in next(iter(routers.values())).items():
                setattr(self.config, _ROUTER_CONFIG_FIELDS[key], value)
        self._write_structure(struct)

    def _write_structure(self, updates: dict) -> None:
        struct = self.structure()
        struct.update(updates)
        clean = {
            "num_experts": {str(k): v for k, v in struct["num_experts"].items()},
            "top_k": {str(k): v for k, v in struct["top_k"].items()},
            "router": {str(k): v for k, v in struct["router"].items()},
            "skip_moe": list(struct["skip_moe"]),
            "modules": struct["modules"],
        }
        self.config.moebench = clean if any(clean.values()) else None

    def needs_moebench_loader(self) -> bool:
        """True when plain transformers cannot rebuild this structure from the config alone."""
        self.sync_config()
        return bool(getattr(self.config, "moebench", None))

    def save(self, path, **kwargs) -> None:
        """``save_pretrained`` (safetensors) with the structure written into the config.

        A model plain transformers can rebuild is saved in its family's original
        checkpoint format; one with a moebench structure keeps the in-memory (packed)
        names, which is what :func:`moebench.models.load_pretrained` reads back, and its
        config refuses plain loaders (:func:`moebench.saved.refuse_plain_loaders`).
        """
        self.saved_format = "transformers"
        own_layout = self.needs_moebench_loader()
        if own_layout:
            from .plugins import host

            written = host().pm.hook.save_standard_format(model=self, folder=str(path))
            if written:
                self.saved_format = written
                own_layout = False
            else:
                kwargs.setdefault("save_original_format", False)
                self.model.save_pretrained(path, **kwargs)
                from .saved import refuse_plain_loaders

                refuse_plain_loaders(path, self.config.model_type)
                self.saved_format = "moebench"
        else:
            self.model.save_pretrained(path, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)

    # -- helpers ------------------------------------------------------------------------
    def _moe(self, layer: int) -> MoEBlock:
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"layer {layer} out of range 0..{len(self.layers) - 1}")
        block = self.block(layer)
        if block is None:
            raise ValueError(f"layer {layer} has no MoE block (dense or already skipped)")
        return block

    def record_edit(self, edit: str) -> None:
        """Write an in-place edit into the lineage, which keys the calibration cache: a method
        that edits weights mid-step (a merge before it heals) calls it so later statistics
        are not served from the model's earlier state. Edits through this class record
        themselves; the runner records each whole step (:meth:`record_step`)."""
        self.lineage.append(edit)

    def record_step(self, method: str, params) -> None:
        """Write a method step into the lineage (the runner does it after every step), so
        statistics cached for the model before an in-place weight edit are not reused."""
        import json

        from .params import to_dict

        self.lineage.append(f"{method}({json.dumps(to_dict(params), sort_keys=True, default=str)})")


# router attributes that some families change when the expert count changes, and the
# config fields that hold them
_ROUTER_CONFIG_FIELDS = {"topk_method": "topk_method", "num_group": "n_group", "topk_group": "topk_group"}


def slice_experts(block: MoEBlock, keep: Sequence[int]) -> list[str]:
    """Keep experts ``keep`` of ``block`` in place (packed weights, router rows, top-k)."""
    order = [int(k) for k in keep]  # checked on the host, so this also works on meta-device skeletons
    keep = torch.as_tensor(order, dtype=torch.long, device=block.gate_up_proj.device)
    if not order:
        raise ValueError(f"layer {block.layer}: cannot keep zero experts")
    if len(set(order)) != len(order) or min(order) < 0 or max(order) >= block.num_experts:
        raise ValueError(f"layer {block.layer}: keep indices must be distinct and in [0, {block.num_experts})")
    experts = block.experts
    experts.gate_up_proj = _param_like(experts.gate_up_proj, experts.gate_up_proj.data[keep])
    experts.down_proj = _param_like(experts.down_proj, experts.down_proj.data[keep])
    experts.num_experts = keep.numel()
    notes = block.adapter.slice_router(block.router, keep)
    if block.top_k > keep.numel():
        block.router.top_k = keep.numel()
        if hasattr(block.module, "top_k"):
            block.module.top_k = keep.numel()
    return notes


@contextmanager
def experts_subset(block: MoEBlock, keep: Sequence[int]) -> Iterator[nn.Module]:
    """Temporarily keep only experts ``keep`` of ``block`` (to try a choice before making it).

    Yields the block module with the subset in place and restores every attribute the
    edit touched afterwards; cheaper than copying the block for each trial.
    """
    router, experts, module = block.router, block.experts, block.module
    saved = [
        (obj, name, getattr(obj, name))
        for obj, names in (
            (experts, ("gate_up_proj", "down_proj", "num_experts")),
            (router, ("weight", "num_experts", "top_k", *_ROUTER_CONFIG_FIELDS, *block.adapter.expert_buffers)),
            (module, ("top_k",)),
        )
        for name in names
        if hasattr(obj, name)
    ]
    try:
        slice_experts(block, keep)
        yield module
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def _digest(*tensors: torch.Tensor) -> str:
    """A short fingerprint of new weights, so edits that install different weights get
    different calibration cache keys. Shapes, sums and a strided sample of each tensor:
    cheap on multi-GB expert tensors, and different for any two merges in practice."""
    import hashlib

    h = hashlib.sha1()
    for t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(str(tuple(t.shape)).encode())
        h.update(_sums(flat).cpu().numpy().tobytes())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


#: tensors up to this many elements are summed in one float32 copy (as always: their digests, and the
#: calibration cache keys built from them, are unchanged); larger ones a slice at a time
DIGEST_SLICE = 1 << 24


def _sums(flat: torch.Tensor) -> torch.Tensor:
    """``[sum, sum of |x|]`` in float32, never holding a float32 copy of more than DIGEST_SLICE elements
    (a whole layer's quantized experts as float32 would add several times the layer's bytes)."""
    if flat.numel() <= DIGEST_SLICE:
        f = flat.float()
        return torch.stack([f.sum(), f.abs().sum()])
    total = torch.zeros(2, dtype=torch.float64, device=flat.device)
    for part in flat.split(DIGEST_SLICE):
        f = part.float()
        total += torch.stack([f.sum(), f.abs().sum()]).double()
    return total.float()


def _is_dense(adapter: Adapter, layer: nn.Module) -> bool:
    """A layer built with a dense MLP (not a MoE block, live or skipped)."""
    return adapter.moe_block(layer) is None and not isinstance(getattr(layer, "mlp", None), PassThrough)


def _router_state(router: nn.Module) -> dict:
    return {k: getattr(router, k) for k in _ROUTER_CONFIG_FIELDS if hasattr(router, k)}


def _param_like(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data.detach().to(old.dtype).to(old.device).contiguous(), requires_grad=old.requires_grad)


def _path_of(root: nn.Module, module: nn.Module) -> str:
    for name, m in root.named_modules():
        if m is module:
            return name
    raise ValueError("module is not part of the model")


def _layer_of(path: str) -> int | None:
    parts = path.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def _remap_path(path: str, remap: dict[int, int]) -> str:
    parts = path.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "layers" and parts[i + 1].isdigit():
            parts[i + 1] = str(remap[int(parts[i + 1])])
    return ".".join(parts)
