"""Expert slimming by pruning: magnitude, WANDA / MoE-Pruner, SparseGPT (arXiv 2406.02500, 2410.12013).

All three prune the weight matrices of the module kinds in ``targets`` (routed experts
by default; shared experts, attention and dense MLPs optional) to an unstructured
``sparsity`` compared within each output row, or to an ``n:m`` pattern. A packed expert
is pruned as two matrices: ``gate_up [2I, H]`` (gate and up rows share the input) and
``down [H, I]``. WANDA and SparseGPT calibrate layer-sequentially
(:mod:`moebench.sequential`): each layer is pruned on the inputs the already-pruned
layers produce, and each expert only sees the tokens routed to it. Sparsity is stored
as zeros in the dense tensors (no sparse kernel), which every record notes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moebench.adapter import MoEModel
from moebench.hookspecs import hookimpl
from moebench.method import Context, Method
from moebench.params import param
from moebench.sequential import Group, check_targets, from_context, record_edit, static_steps
from moebench_plugins.slimming.sparsity import NM, mask_for, nm_holds, sparsegpt, wanda_score

MASKED = "sparsity is masked zeros; no sparse kernel"
NO_TOKENS = "{n} routed expert(s) received no calibration tokens; they were pruned by magnitude"


@dataclass
class PruneParams:
    sparsity: float = param(0.5, help="fraction of every targeted row's weights set to zero, in [0, 1); ignored when nm is set")
    nm: str | None = param(None, help="semi-structured pattern 'n:m' (at most n non-zeros in every m consecutive inputs), e.g. '2:4', '4:8'")
    targets: list[str] = param(
        default_factory=lambda: ["experts"], help="module kinds pruned: experts, shared, attention, dense"
    )

    def check(self):
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.nm is not None:
            NM.parse(self.nm)
        check_targets(self.targets)

    @property
    def pattern(self) -> NM | None:
        return NM.parse(self.nm) if self.nm is not None else None


@dataclass
class WandaParams(PruneParams):
    router_weighted: bool = param(
        True, help="MoE-Pruner rule: scale each routed token's input by its routing weight (false: plain WANDA on routed tokens)"
    )


@dataclass
class SparseGPTParams(PruneParams):
    router_weighted: bool = param(True, help="weight each routed token's input by its routing weight in the expert Hessians")
    damp: float = param(0.01, help="dampening added to the Hessian diagonal, as a fraction of its mean")
    block_size: int = param(128, help="columns per lazy-update block")

    def check(self):
        super().check()
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


class _Pruner(Method):
    """Shared flow: visit each layer's targeted groups, prune them, report what was achieved per module kind."""

    Params = PruneParams

    def apply(self, model: MoEModel, params: PruneParams, ctx: Context) -> dict:
        ctx.note(MASKED)
        changes: dict = {"requested": {"nm": params.nm} if params.nm else {"sparsity": params.sparsity}}
        if self.needs_calibration:
            run = from_context(model, ctx, self.name, targets=params.targets, collect=self.collect,
                               router_weighted=params.router_weighted)
            steps = run
        else:
            run, steps = None, static_steps(model, params.targets)
        groups: list[Group] = []
        for step in steps:
            for group in step.groups:
                group.write(self.prune(group, params))
                groups.append(group)
        if run is not None:
            changes["calibration"] = run.summary()
            if run.experts_without_tokens:
                ctx.note(NO_TOKENS.format(n=run.experts_without_tokens))
        record_edit(model, self.name, params)
        return {**changes, **achieved(groups, params.pattern)}

    def prune(self, group: Group, params) -> torch.Tensor:
        raise NotImplementedError


class Magnitude(_Pruner):
    """Prune the smallest-magnitude weights of each row (data-free baseline)."""

    name = "magnitude"

    def prune(self, group: Group, params: PruneParams) -> torch.Tensor:
        w = group.weight.float()
        return w.masked_fill(mask_for(w.abs(), params.sparsity, params.pattern), 0.0)


class Wanda(_Pruner):
    """WANDA |W|·‖X‖ per row; for routed experts the MoE-Pruner rule (inputs scaled by routing weight)."""

    name = "wanda"
    Params = WandaParams
    needs_calibration = True
    collect = ("sq",)

    def prune(self, group: Group, params: WandaParams) -> torch.Tensor:
        w = group.weight.float()
        sq = group.stats.sq.clone()
        sq[group.stats.tokens == 0] = 1.0  # no routed tokens: plain magnitude
        return w.masked_fill(mask_for(wanda_score(w, sq), params.sparsity, params.pattern), 0.0)


class SparseGPT(_Pruner):
    """SparseGPT: OBS saliency masks with second-order error compensation, per expert on its routed tokens."""

    name = "sparsegpt"
    Params = SparseGPTParams
    needs_calibration = True
    collect = ("hessian",)

    def prune(self, group: Group, params: SparseGPTParams) -> torch.Tensor:
        h = group.stats.hessian
        unseen = group.stats.tokens == 0
        if unseen.any():  # identity Hessian: magnitude saliency, no compensation
            h = h.clone()
            h[unseen] = torch.eye(h.shape[-1], device=h.device)
        new, _ = sparsegpt(group.weight, h, params.sparsity, params.pattern, params.damp, params.block_size)
        return new


def achieved(groups: list[Group], nm: NM | None) -> dict:
    """Measured zeros per module kind over the targeted matrices (and whether an n:m pattern holds everywhere)."""
    zeros: dict[str, int] = {}
    total: dict[str, int] = {}
    matrices: dict[str, int] = {}
    holds = True
    for g in groups:
        w = g.weight
        zeros[g.kind] = zeros.get(g.kind, 0) + int((w == 0).sum())
        total[g.kind] = total.get(g.kind, 0) + w.numel()
        matrices[g.kind] = matrices.get(g.kind, 0) + w.shape[0]
        if nm is not None:
            holds = holds and nm_holds(w, nm)
    out = {
        "sparsity": {k: round(zeros[k] / total[k], 6) for k in total},
        "weights": total,
        "matrices": matrices,
    }
    if nm is not None:
        out["nm_holds"] = holds
    return out


@hookimpl
def register_methods():
    return [Magnitude, Wanda, SparseGPT]
