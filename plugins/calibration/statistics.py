"""Built-in calibration statistics: routing, router logits, layer and MoE-block similarity, block I/O.

Each gathers per layer during the calibration service's single pass. Results are keyed
by decoder-layer index (as ``int``) so methods can look layers up directly.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from moebench.calibration import RouterStatistic, Statistic, hidden_in
from moebench.hookspecs import hookimpl


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class RoutingCounts(RouterStatistic):
    """How many tokens select each expert (top-k selections), per MoE layer: ``{layer: [E]}``."""

    name = "routing_counts"
    streamable = True  # per-layer hooks: a layer-by-layer pass gives the same result

    def __init__(self, model, seed=0):
        super().__init__(model, seed)
        self.counts: dict[int, torch.Tensor] = {}

    def update(self, layer, block, logits, weights, indices):
        # [:E]: a runtime routing rule marks skipped slots with the sentinel index E
        counts = torch.bincount(indices.reshape(-1).cpu(), minlength=block.num_experts + 1)[: block.num_experts]
        self.counts[layer] = self.counts.get(layer, 0) + counts

    def result(self):
        return self.counts


class RouterMass(RouterStatistic):
    """Accumulated router score per expert: full probabilities and the routed (top-k) weights.

    ``{layer: {"prob": [E], "routed": [E], "tokens": T}}``; ``prob`` sums the router's
    scores over all tokens, ``routed`` only the weights of selected experts.
    """

    name = "router_mass"
    streamable = True  # per-layer hooks: a layer-by-layer pass gives the same result

    def __init__(self, model, seed=0):
        super().__init__(model, seed)
        self.mass: dict[int, dict] = {}

    def update(self, layer, block, logits, weights, indices):
        probs = block.probabilities(logits).float().cpu()
        flat, w = indices.reshape(-1).cpu(), weights.float().reshape(-1).cpu()
        ran = flat < block.num_experts  # skipped slots (runtime routing) carry the sentinel index E
        routed = torch.zeros(block.num_experts).index_add_(0, flat[ran], w[ran])
        entry = self.mass.setdefault(layer, {"prob": torch.zeros(block.num_experts), "routed": torch.zeros(block.num_experts), "tokens": 0})
        entry["prob"] += probs.sum(0)
        entry["routed"] += routed
        entry["tokens"] += probs.shape[0]

    def result(self):
        return self.mass


class RouterLogits(RouterStatistic):
    """Every token's router logits, per MoE layer: ``{layer: [T, E]}`` (float16 to stay small)."""

    name = "router_logits"
    streamable = True  # per-layer hooks: a layer-by-layer pass gives the same result

    def __init__(self, model, seed=0):
        super().__init__(model, seed)
        self.logits: dict[int, list] = defaultdict(list)

    def update(self, layer, block, logits, weights, indices):
        self.logits[layer].append(logits.to(torch.float16).cpu())

    def result(self):
        return {layer: torch.cat(chunks) for layer, chunks in self.logits.items()}


class LayerSimilarity(Statistic):
    """Mean cosine similarity between the hidden states entering every pair of decoder blocks.

    A matrix ``S [L+1, L+1]``: ``S[i, j]`` compares the residual stream entering block
    ``i`` with the one entering block ``j`` (index ``L`` is the last block's output), per
    token, averaged. ``S[i, i+1]`` says how little block ``i`` changes its input (block
    drop removes the most similar); ``S[i, i+n]`` scores removing ``n`` consecutive blocks.
    """

    name = "layer_similarity"

    def __init__(self, model, seed=0):
        super().__init__(model, seed)
        n = len(model.layers) + 1
        self.sums = torch.zeros(n, n, dtype=torch.float64)
        self.tokens = 0
        self._states: dict[int, torch.Tensor] = {}

    def attach(self) -> list:
        handles = []
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            def hook(module, args, kwargs, output, i=i):
                self._states[i] = F.normalize(hidden_in(args, kwargs).detach().float().reshape(-1, output_dim(output)), dim=-1)
                if i == last:
                    self._states[i + 1] = F.normalize(_first(output).detach().float().reshape(-1, output_dim(output)), dim=-1)
                    self._accumulate()

            handles.append(layer.register_forward_hook(hook, with_kwargs=True))
        return handles

    def _accumulate(self) -> None:
        states = torch.stack([self._states[i] for i in range(len(self._states))])  # [L+1, T, H]
        self.sums += torch.einsum("ith,jth->ij", states, states).double()
        self.tokens += states.shape[1]
        self._states.clear()

    def result(self):
        return (self.sums / max(self.tokens, 1)).float()


def output_dim(output) -> int:
    return _first(output).shape[-1]


class MoESimilarity(Statistic):
    """Mean cosine similarity of the residual stream before and after each MoE block: ``{layer: float}``.

    Before is the hidden state entering the block's pre-norm; after adds the block's
    output. Layer drop removes the MoE blocks with the highest similarity.
    """

    name = "moe_similarity"
    streamable = True  # per-layer hooks: a layer-by-layer pass gives the same result

    def __init__(self, model, seed=0):
        super().__init__(model, seed)
        self.sums: dict[int, float] = defaultdict(float)
        self.tokens: dict[int, int] = defaultdict(int)
        self._residual: dict[int, torch.Tensor] = {}

    def attach(self) -> list:
        handles = []
        for block in self.model.blocks():
            layer = self.model.layers[block.layer]
            norm = layer.post_attention_layernorm

            def pre(module, args, i=block.layer):
                self._residual[i] = args[0].detach()

            def post(module, args, output, i=block.layer):
                h = self._residual.pop(i).float()
                after = h + _first(output).float()
                cos = F.cosine_similarity(h.reshape(-1, h.shape[-1]), after.reshape(-1, h.shape[-1]), dim=-1)
                self.sums[i] += cos.sum().item()
                self.tokens[i] += cos.numel()

            handles.append(norm.register_forward_pre_hook(pre))
            handles.append(block.module.register_forward_hook(post))
        return handles

    def result(self):
        return {i: self.sums[i] / self.tokens[i] for i in self.sums}


class MoEInputs(Statistic):
    """A seeded sample of tokens entering and leaving each MoE block: ``{layer: {"input": [N, H], "output": [N, H]}}``.

    At most ``max_tokens`` per layer, drawn with the same positions in every layer, so
    reconstruction-aware criteria can replay the block on real inputs.
    """

    name = "moe_io"
    max_tokens = 4096
    # positions are drawn per batch and looked up by each layer's call count, so a layer-by-layer
    # pass (every batch through one layer, then the next) keeps the same positions as a full one
    streamable = True

    def __init__(self, model, seed=0):
        super().__init__(model, seed)
        self.inputs: dict[int, list] = defaultdict(list)
        self.outputs: dict[int, list] = defaultdict(list)
        self.generator = torch.Generator().manual_seed(seed)
        self._selects: list[torch.Tensor] = []  # per batch, drawn by the first MoE layer
        self._calls: dict[int, int] = defaultdict(int)  # per layer, batches seen

    def attach(self) -> list:
        handles = []
        for block in self.model.blocks():
            def hook(module, args, output, i=block.layer):
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                y = _first(output).detach().reshape(-1, x.shape[-1])
                batch = self._calls[i]
                self._calls[i] += 1
                if i == self.model.moe_layers[0]:  # the first MoE layer draws positions for all layers
                    per_batch = max(1, self.max_tokens // 8)
                    self._selects.append(torch.randperm(x.shape[0], generator=self.generator)[:per_batch])
                select = self._selects[batch]
                sel = select[select < x.shape[0]]
                if sum(t.shape[0] for t in self.inputs[i]) < self.max_tokens:
                    self.inputs[i].append(x[sel].float().cpu())
                    self.outputs[i].append(y[sel].float().cpu())

            handles.append(block.module.register_forward_hook(hook))
        return handles

    def result(self):
        return {
            i: {"input": torch.cat(self.inputs[i])[: self.max_tokens], "output": torch.cat(self.outputs[i])[: self.max_tokens]}
            for i in self.inputs
        }


@hookimpl
def register_statistics():
    return [RoutingCounts, RouterMass, RouterLogits, LayerSimilarity, MoESimilarity, MoEInputs]
