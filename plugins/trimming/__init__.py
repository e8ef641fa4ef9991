"""Expert trimming: expert drop, layer drop, block drop (He, Dong et al., arXiv 2406.02500),
REAP (:mod:`.reap`) and NAEE's combination search (:mod:`.naee`).

Reference code: the Unified-MoE-Compression repository (DaizeDong/Unified-MoE-Compression,
``compression/prune/{expert_drop,block_drop}.py``). Defaults follow it; moebench's own
variants stay available as named options and every record says which one ran.

All three read calibration statistics from the shared service and edit the model only
through :class:`moebench.adapter.MoEModel`, so they work on every adapted architecture
and compose in pipelines.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import torch

from moebench.adapter import MoEBlock, MoEModel, experts_subset
from moebench.budgets import check_keep, global_budgets, kept_count
from moebench.hookspecs import hookimpl
from moebench.method import Context, Method
from moebench.params import ParamError, param

from .keep import keep_chosen


# -- expert drop --------------------------------------------------------------------------
@dataclass
class ExpertDropParams:
    keep_ratio: float | None = param(0.5, help="fraction of each layer's routed experts kept (ignored when keep is set)")
    keep: int | None = param(None, help="experts kept per layer (layer scope) or on average (global scope)")
    criterion: Literal["frequency", "score", "reconstruction", "random"] = param(
        "score",
        help="score: highest mean routing score (the reference's criterion); frequency: most selected "
        "(moebench's variant); reconstruction: greedy removal that least changes the block's output; random: baseline",
    )
    score: Literal["auto", "prob", "routed"] = param(
        "auto",
        help="what the score criterion averages over calibration tokens: prob: the router's full probabilities "
        "(the reference for Mixtral-style routers); routed: the selected experts' weights, zero elsewhere (the "
        "reference for DeepSeek, whose gate returns only its top-k); auto: the reference's choice for the architecture",
    )
    scope: Literal["layer", "global"] = param("layer", help="layer: same count per layer; global: one budget, counts differ")
    global_floor: Literal["one", "top_k"] = param(
        "one",
        help="experts every layer keeps under global scope: one (the reference ranks all layers' scores together "
        "with no floor; moebench keeps at least one expert so no MoE block vanishes) or top_k (moebench's variant)",
    )
    reverse_drop: bool = param(False, help="drop the highest-ranked experts instead (the reference's reverse_drop ablation)")
    preserve_gate: bool = param(
        False,
        help="keep the router's full width: tokens routed to a dropped expert lose that expert's contribution "
        "instead of being re-routed to kept ones (the reference's preserve_gate); the dropped experts are zeroed "
        "in place, so parameter counts do not shrink",
    )
    top_k: int | None = param(None, help="new experts-per-token after the drop (default: unchanged)")
    seed: int = param(0, help="seed for the random criterion")

    def check(self):
        check_keep(self.keep, self.keep_ratio, "set keep_ratio or keep")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


class ExpertDrop(Method):
    """Drop the least important routed experts of each MoE layer; router rows sliced to match.

    He, Dong et al., "Demystifying the Compression of Mixture-of-Experts Through a Unified
    Framework" (arXiv 2406.02500); reference: DaizeDong/Unified-MoE-Compression. The default
    ranks experts by their mean routing score over calibration tokens, as the reference does.
    Deviations, each a named option: ``criterion = "frequency"`` (selection counts) and
    ``"reconstruction"`` are moebench's; ``global_floor = "one"`` keeps one expert where the
    reference may empty a layer; ``preserve_gate`` zeroes dropped experts in place rather
    than removing them behind a re-mapped router (same outputs, no size saving).
    """

    name = "expert_drop"
    Params = ExpertDropParams
    stats = ("routing_counts",)

    @classmethod
    def check_model(cls, params: ExpertDropParams, shape) -> None:
        """Refuse a drop that keeps every expert of every layer (it would be recorded as a compression that did nothing)."""
        if not shape.experts:
            raise ParamError("keep", "the model has no MoE layers with routed experts to drop")
        if params.top_k is not None and any(params.top_k < k for k in shape.top_k.values()):
            return  # lowering top-k alone is a change
        if all(kept_count(n, params.keep, params.keep_ratio) >= n for n in shape.experts.values()):
            field, value = ("keep", params.keep) if params.keep is not None else ("keep_ratio", params.keep_ratio)
            raise ParamError(field, f"{field}={value} keeps every expert (the model's MoE layers have {shape.min_experts}); expected fewer than {shape.min_experts}, or this run would do nothing")

    def needs(self, params: ExpertDropParams) -> tuple[str, ...]:
        return {"frequency": ("routing_counts",), "score": ("router_mass",), "reconstruction": ("moe_io",), "random": ()}[
            params.criterion
        ]

    @staticmethod
    def score_source(model: MoEModel, params: ExpertDropParams) -> str:
        """``prob`` or ``routed``: the reference reads DeepSeek's gate top-k weights and Mixtral's full softmax."""
        if params.score != "auto":
            return params.score
        return "routed" if str(getattr(model.config, "model_type", "")).startswith("deepseek") else "prob"

    def apply(self, model: MoEModel, params: ExpertDropParams, ctx: Context) -> dict:
        blocks = list(model.blocks())
        budgets = {b.layer: kept_count(b.num_experts, params.keep, params.keep_ratio) for b in blocks}
        if all(budgets[b.layer] >= b.num_experts for b in blocks) and (params.top_k is None or all(params.top_k >= b.top_k for b in blocks)):
            raise ValueError(f"expert_drop would keep every expert (layers have {sorted({b.num_experts for b in blocks})}); nothing to compress")
        if params.criterion == "reconstruction":
            io = ctx.stats(model, "moe_io")["moe_io"]
            if params.scope == "global":
                ctx.note("reconstruction criterion ranks experts per layer; global scope keeps the per-layer budget")
            keeps = {b.layer: _greedy_reconstruction(b, io[b.layer], budgets[b.layer]) for b in blocks}
        else:
            scores = _scores(model, blocks, params, ctx)
            if params.reverse_drop:  # rank the other way round: the best experts go first
                scores = {layer: -s for layer, s in scores.items()}
            if params.scope == "global":
                floor = {b.layer: 1 if params.global_floor == "one" else min(b.top_k, b.num_experts) for b in blocks}
                budgets = global_budgets(blocks, scores, sum(budgets.values()), floor)
            keeps = {b.layer: sorted(torch.argsort(scores[b.layer], descending=True)[: budgets[b.layer]].tolist()) for b in blocks}
        variant = {
            "criterion": params.criterion,
            **({"score": self.score_source(model, params)} if params.criterion == "score" else {}),
            **({"global_floor": params.global_floor} if params.scope == "global" else {}),
            "reverse_drop": params.reverse_drop,
            "routing": "tokens of dropped experts dropped (router width kept)" if params.preserve_gate else "re-routed to kept experts",
        }
        return keep_chosen(model, blocks, keeps, params.top_k, ctx, after={"variant": variant}, zero=params.preserve_gate)


def _scores(model: MoEModel, blocks: list[MoEBlock], p: ExpertDropParams, ctx: Context) -> dict[int, torch.Tensor]:
    """Per-layer expert importance, normalised to sum to 1 in each layer (comparable across layers)."""
    if p.criterion == "random":
        rng = random.Random(p.seed)
        return {b.layer: torch.tensor([rng.random() for _ in range(b.num_experts)]) for b in blocks}
    if p.criterion == "frequency":
        raw = ctx.stats(model, "routing_counts")["routing_counts"]
        raw = {layer: counts.double() for layer, counts in raw.items()}
    else:
        source = ExpertDrop.score_source(model, p)
        raw = {layer: mass[source].double() for layer, mass in ctx.stats(model, "router_mass")["router_mass"].items()}
    # a tiny index-based tie-break keeps the order deterministic when counts are equal
    return {b.layer: raw[b.layer] / raw[b.layer].sum().clamp_min(1e-12) - 1e-12 * torch.arange(b.num_experts) for b in blocks}


@torch.no_grad()
def _greedy_reconstruction(block: MoEBlock, io: dict, budget: int) -> list[int]:
    """Remove experts one at a time, each time the one whose removal least changes the block output.

    The block is replayed on calibration inputs with the candidate subset (routing
    renormalised as the architecture does); the error is the squared distance to the
    full block's output. A greedy form of the enumeration in Lu et al. (2402.14800).
    """
    x = io["input"].to(block.gate_up_proj.device, block.gate_up_proj.dtype)
    target = io["output"].to(x.device).float()
    keep = list(range(block.num_experts))
    while len(keep) > budget:
        errors = []
        for e in keep:
            with experts_subset(block, [k for k in keep if k != e]) as trial:
                out = trial(x.unsqueeze(0)).squeeze(0).float()
            errors.append(((out - target) ** 2).sum().item())
        keep.remove(keep[min(range(len(errors)), key=errors.__getitem__)])
    return keep


# -- layer drop ---------------------------------------------------------------------------
@dataclass
class LayerDropParams:
    n: int = param(1, help="MoE blocks removed")
    criterion: Literal["similarity", "random"] = param(
        "similarity", help="similarity: the blocks whose output changes the residual stream least; random: baseline"
    )
    seed: int = param(0, help="seed for the random criterion")

    def check(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


class LayerDrop(Method):
    """Remove whole MoE blocks (attention kept): the residual stream passes through them."""

    name = "layer_drop"
    Params = LayerDropParams
    stats = ("moe_similarity",)

    def needs(self, params):
        return self.stats if params.criterion == "similarity" else ()

    @classmethod
    def check_model(cls, params: LayerDropParams, shape) -> None:
        if params.n >= len(shape.moe_layers):
            raise ParamError("n", f"n={params.n} would remove all {len(shape.moe_layers)} MoE blocks; expected n < {len(shape.moe_layers)}")

    def apply(self, model: MoEModel, params: LayerDropParams, ctx: Context) -> dict:
        layers = model.moe_layers
        if params.n >= len(layers):
            raise ValueError(f"n={params.n} would remove all {len(layers)} MoE blocks; expected n < {len(layers)}")
        if params.criterion == "similarity":
            sim = ctx.stats(model, "moe_similarity")["moe_similarity"]
            chosen = sorted(layers, key=lambda i: sim[i], reverse=True)[: params.n]
        else:
            sim = {}
            chosen = random.Random(params.seed).sample(layers, params.n)
        for layer in chosen:
            model.skip_moe(layer)
        return {"skipped_moe": sorted(chosen), "similarity": {i: round(float(sim[i]), 6) for i in sim}}


# -- block drop ---------------------------------------------------------------------------
@dataclass
class BlockDropParams:
    n: int = param(1, help="decoder blocks (attention + MoE) removed")
    mode: Literal["one_shot", "iterative", "consecutive"] = param(
        "one_shot",
        help="one_shot: the n blocks whose output is most similar to their input; iterative: remove one, "
        "recalibrate, repeat; consecutive: the run of n blocks whose span changes the stream least",
    )
    span: Literal["reference", "exact"] = param(
        "reference",
        help="consecutive mode's score: reference: similarity of the stream n + 1 blocks apart, as the reference "
        "code indexes it (similarities[:, drop_n]), so published numbers reproduce; exact: across the n dropped blocks only",
    )

    def check(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


class BlockDrop(Method):
    """Remove whole decoder blocks by input/output similarity; config and layer count updated.

    He, Dong et al. (arXiv 2406.02500), reference DaizeDong/Unified-MoE-Compression
    ``block_drop.py``. Its consecutive mode scores a start block ``s`` by the cosine between
    the stream entering ``s`` and the one entering ``s + n + 1`` (one block past the run it
    drops); that is the default (``span = "reference"``). ``span = "exact"`` is moebench's
    variant, scoring exactly the ``n`` blocks removed.
    """

    name = "block_drop"
    Params = BlockDropParams
    stats = ("layer_similarity",)

    @classmethod
    def check_model(cls, params: BlockDropParams, shape) -> None:
        if params.n >= shape.layers:
            raise ParamError("n", f"n={params.n} would remove all {shape.layers} decoder blocks; expected n < {shape.layers}")

    def apply(self, model: MoEModel, params: BlockDropParams, ctx: Context) -> dict:
        total = len(model.layers)
        if params.n >= total:
            raise ValueError(f"n={params.n} would remove all {total} decoder blocks; expected n < {total}")
        original = list(range(total))  # original index of each current block
        dropped, scores = [], {}
        if params.mode == "iterative":
            for _ in range(params.n):
                sim = ctx.stats(model, "layer_similarity")["layer_similarity"]
                i = max(range(len(model.layers)), key=lambda j: sim[j, j + 1].item())
                scores[original[i]] = round(sim[i, i + 1].item(), 6)
                dropped.append(original.pop(i))
                model.drop_layers([i])
        else:
            sim = ctx.stats(model, "layer_similarity")["layer_similarity"]
            if params.mode == "consecutive":
                gap = params.n + 1 if params.span == "reference" else params.n
                if total - gap < 0:
                    raise ValueError(f"n={params.n} with span='reference' needs n + 1 <= {total} blocks; use span='exact'")
                start = max(range(total - gap + 1), key=lambda s: sim[s, s + gap].item())
                dropped = list(range(start, start + params.n))
                scores = {start: round(sim[start, start + gap].item(), 6)}
            else:
                scores = {i: round(sim[i, i + 1].item(), 6) for i in range(total)}
                dropped = sorted(scores, key=scores.get, reverse=True)[: params.n]
            model.drop_layers(dropped)
        changes = {"dropped_blocks": sorted(dropped), "blocks_before": total, "blocks_after": len(model.layers), "similarity": scores}
        if params.mode == "consecutive":
            changes["span"] = params.span
        return changes


@hookimpl
def register_methods():
    from .naee import Naee
    from .reap import Reap

    return [ExpertDrop, LayerDrop, BlockDrop, Reap, Naee]


@hookimpl
def register_statistics():
    from .reap import ReapSaliency

    return [ReapSaliency]
