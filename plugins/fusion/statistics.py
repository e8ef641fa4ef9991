"""Calibration statistics the expert grouping reads: co-activation counts and expert output similarity."""


from __future__ import annotations

import torch
from moebench.adapter import MoEBlock
from moebench.calibration import RouterStatistic, Statistic, hidden_in

from .analysis import (
    coactivation_counts,
    output_similarity,
    output_similarity_update,
)


# == calibration statistics ===============================================================
class BlockInputStatistic(Statistic):
    """Base for statistics read off the hidden states entering each MoE block: implement
    ``update_block(block, hidden)`` (the block's input as it ran, not detached)."""

    def attach(self) -> list:
        handles = []
        for block in self.model.blocks():
            def hook(module, args, kwargs, output, block=block):
                self.update_block(block, hidden_in(args, kwargs))

            handles.append(block.module.register_forward_hook(hook, with_kwargs=True))
        return handles

    def update_block(self, block: MoEBlock, hidden: torch.Tensor) -> None:
        raise NotImplementedError


class Coactivation(RouterStatistic):
    """Tokens that select both experts, per MoE layer: ``{layer: [E, E] int64}`` (diagonal: selections)."""

    name = "coactivation"
    streamable = True  # per-layer hooks: a layer-by-layer pass gives the same result

    def __init__(self, model, seed=0):
        super().__init__(model, seed)
        self.counts: dict[int, torch.Tensor] = {}

    def update(self, layer, block, logits, weights, indices):
        counts = coactivation_counts(indices, block.num_experts).cpu()
        self.counts[layer] = self.counts.get(layer, 0) + counts

    def result(self):
        return self.counts


class OutputSimilarity(BlockInputStatistic):
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

    def update_block(self, block: MoEBlock, hidden: torch.Tensor) -> None:
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


class ExpertMeanOutput(BlockInputStatistic):
    """Every expert's mean output over all calibration tokens (each token run through every expert).

    ``{layer: {"mean": [E, H] float64, "tokens": T}}``: HC-SMoE's expert representation
    (Chen et al. 2024, arXiv 2410.08589), independent of routing.
    """

    name = "expert_mean_output"
    streamable = True  # per-layer hooks: a layer-by-layer pass gives the same result

    def __init__(self, model, seed=0):
        super().__init__(model, seed)
        self.sums: dict[int, dict] = {}

    @torch.no_grad()
    def update_block(self, block: MoEBlock, hidden: torch.Tensor) -> None:
        x = hidden.detach().reshape(-1, hidden.shape[-1])
        total = torch.stack([block.expert_forward(e, x).double().sum(0).cpu() for e in range(block.num_experts)])
        entry = self.sums.setdefault(block.layer, {"sum": torch.zeros_like(total), "tokens": 0})
        entry["sum"] += total
        entry["tokens"] += x.shape[0]

    def result(self):
        return {layer: {"mean": s["sum"] / max(s["tokens"], 1), "tokens": s["tokens"]} for layer, s in self.sums.items()}
