"""Expert slimming by pruning: magnitude, WANDA / MoE-Pruner, SparseGPT (arXiv 2406.02500, 2410.12013).

All three prune the weight matrices of the module kinds in ``targets`` (routed experts
by default; shared experts, attention and dense MLPs optional) to an unstructured
``sparsity`` or to an ``n:m`` pattern (see ``NM_CONVENTION``: ``'2:4'`` keeps 2 of 4).
Unstructured masks compare within the group each paper uses: a matrix (magnitude), a
row (WANDA), a block of 128 columns (SparseGPT); the record's ``variant`` says which ran.
A packed expert's ``gate_up [2I, H]`` holds two matrices (gate rows, then up rows) that
share the input; ``down [H, I]`` is one. Experts are pruned in place a few at a time. WANDA and SparseGPT calibrate layer-sequentially
(:mod:`moebench.sequential`): each layer is pruned on the inputs the already-pruned
layers produce, and each expert only sees the tokens routed to it. Sparsity is stored
as zeros in the dense tensors (no sparse kernel), which every record notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from moebench.adapter import MoEModel
from moebench.hookspecs import hookimpl
from moebench.method import Context, Method
from moebench.params import param
from moebench.sequential import Group, check_targets, static_steps
from moebench_plugins.slimming.sparsity import NM, NM_CONVENTION, mask_for, nm_holds, sparsegpt, wanda_score

MASKED = "sparsity is masked zeros; no sparse kernel"
NO_TOKENS = "{n} routed expert(s) received no calibration tokens; they were pruned by magnitude"


@dataclass
class PruneParams:
    sparsity: float = param(0.5, help="fraction of the targeted weights set to zero, in [0, 1); ignored when nm is set")
    nm: str | None = param(None, help="semi-structured pattern: " + NM_CONVENTION)
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
class MagnitudeParams(PruneParams):
    scope: Literal["matrix", "row"] = param(
        "matrix", help="matrix: one threshold per weight matrix (the WANDA / Unified-MoE baseline); row: per output row (moebench's variant)"
    )


@dataclass
class WandaParams(PruneParams):
    router_weighted: bool = param(
        True, help="MoE-Pruner rule: scale each routed token's input by its routing weight (false: plain WANDA on routed tokens)"
    )


@dataclass
class SparseGPTParams(PruneParams):
    scope: Literal["block", "row"] = param(
        "block",
        help="block: prune the fraction of each block of columns with one threshold across its rows (IST-DASLab/sparsegpt); "
        "row: every row ends at exactly the ratio (moebench's variant)",
    )
    router_weighted: bool = param(
        False, help="weight each routed token's input by its routing weight in the expert Hessians (false: plain X^T X, as the reference)"
    )
    damp: float = param(0.01, help="dampening added to the Hessian diagonal, as a fraction of its mean")
    block_size: int = param(128, help="columns per lazy-update block (and per mask block with scope = block)")
    true_sequential: bool = param(
        False, help="false: every Hessian of a layer from its unpruned weights, as the reference; true: down_proj (and o_proj) "
        "Hessians from the already-pruned gate/up (q/k/v), GPTQ's order (moebench option)"
    )
    expert_chunk: int | None = param(
        None, help="gather and prune a layer's routed experts this many at a time, so only their Hessians are held "
        "(64 experts of DeepSeek-V2-Lite: 1.5 GiB of float32 Hessians at once); the same masks as without it, in either order"
    )

    def check(self):
        super().check()
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.expert_chunk is not None and self.expert_chunk < 1:
            raise ValueError(f"expert_chunk must be a positive number of experts, got {self.expert_chunk}")


def parts_of(group: Group) -> int:
    """How many ``nn.Linear`` a group's matrices stack: a packed ``gate_up`` is gate and up."""
    return 2 if group.attr == "gate_up_proj" else 1


class _Pruner(Method):
    """Shared flow: visit each layer's targeted groups, prune them in place, report what was achieved per module kind."""

    Params = PruneParams
    streams = True  # one layer at a time (ctx.sequential / static_steps): runs with [model] offload

    def apply(self, model: MoEModel, params: PruneParams, ctx: Context) -> dict:
        ctx.note(MASKED)
        changes: dict = {"requested": {"nm": params.nm} if params.nm else {"sparsity": params.sparsity}}
        if params.pattern is not None:
            changes["nm_pattern"] = params.pattern.describe()
        else:
            changes["variant"] = self.variant(params)
        if self.needs_calibration:
            run = ctx.sequential(model, self.name, targets=params.targets, collect=self.collect,
                               router_weighted=params.router_weighted, **self.run_options(params))
            steps = run
        else:
            run, steps = None, static_steps(model, params.targets)
        counted = Achieved(params.pattern)
        for step in steps:
            # expert slices are gathered when their turn comes, and a staged order refreshes stale statistics
            for group in step.sequential() if getattr(params, "true_sequential", False) or getattr(params, "expert_chunk", None) else step.groups:
                self.prune(group, params)
                counted.add(group)  # counted now: a streamed layer ([model] offload) leaves memory after its step
        if run is not None:
            changes["calibration"] = run.summary()
            if run.experts_without_tokens:
                ctx.note(NO_TOKENS.format(n=run.experts_without_tokens))
        return {**changes, **counted.summary()}

    def variant(self, params) -> str:
        """Which unstructured rule ran, for the record."""
        raise NotImplementedError

    def run_options(self, params) -> dict:
        """Options of the layer-sequential pass beyond targets and statistics (staged order, expert slices)."""
        return {}

    def prune(self, group: Group, params) -> None:
        """Zero the pruned weights of ``group`` in place."""
        raise NotImplementedError


class Magnitude(_Pruner):
    """Prune the smallest-magnitude weights (data-free baseline of WANDA, arXiv 2306.11695, github.com/locuslab/wanda,
    and of the Unified-MoE study, github.com/DaizeDong/Unified-MoE-Compression).

    Default ``scope = "matrix"``: one threshold per weight matrix, as both references do
    (a packed expert's gate and up are two matrices). ``scope = "row"`` is moebench's
    variant comparing within each output row (the comparison group WANDA uses).
    """

    name = "magnitude"
    Params = MagnitudeParams

    def variant(self, params: MagnitudeParams) -> str:
        return "matrix: one threshold per weight matrix (reference)" if params.scope == "matrix" else "row: one threshold per output row (moebench variant)"

    def prune(self, group: Group, params: MagnitudeParams) -> None:
        weight = group.weight
        for c in group.chunks():
            w = weight[c]
            w.masked_fill_(mask_for(w.float().abs_(), params.sparsity, params.pattern, params.scope, parts_of(group)), 0.0)


class Wanda(_Pruner):
    """WANDA (arXiv 2306.11695, github.com/locuslab/wanda): ``|W|·‖X‖`` compared per output row; for routed
    experts the MoE-Pruner rule (arXiv 2410.12013): each routed token's input scaled by its routing weight.

    Checked against fusion_bench's MoE-Pruner on the same model and tokens: identical masks.
    """

    name = "wanda"
    Params = WandaParams
    needs_calibration = True
    collect = ("sq",)

    def variant(self, params: WandaParams) -> str:
        return "row: |W|*||X|| per output row" + (" with routing-weighted inputs (MoE-Pruner)" if params.router_weighted else "")

    def prune(self, group: Group, params: WandaParams) -> None:
        weight = group.weight
        sq = group.stats.sq.clone()
        sq[group.stats.tokens == 0] = 1.0  # no routed tokens: plain magnitude
        for c in group.chunks():
            w = weight[c]
            w.masked_fill_(mask_for(wanda_score(w, sq[c]), params.sparsity, params.pattern), 0.0)


class SparseGPT(_Pruner):
    """SparseGPT (arXiv 2301.00774, github.com/IST-DASLab/sparsegpt): OBS saliency masks with second-order error
    compensation, per expert on its routed tokens (as the Unified-MoE repository's prune.py runs it per expert).

    Defaults are the reference's: per-block masks (see :func:`sparsegpt`), unweighted
    Hessians ``X^T X``, dead inputs zeroed. Options keep moebench's earlier variants:
    ``scope = "row"`` (exact per-row ratio) and ``router_weighted`` Hessians (each token
    weighted by its routing weight, the MoE-Pruner idea applied to SparseGPT).
    """

    name = "sparsegpt"
    Params = SparseGPTParams
    needs_calibration = True
    collect = ("hessian",)

    def variant(self, params: SparseGPTParams) -> str:
        scope = ("block: one threshold per block of columns per matrix (reference)" if params.scope == "block"
                 else "row: exact ratio per row (moebench variant)")
        order = "; true sequential: down_proj Hessians from the pruned gate/up (moebench option)" if params.true_sequential else ""
        chunk = f"; experts gathered and pruned in slices of {params.expert_chunk}" if params.expert_chunk else ""
        return (scope + ("; routing-weighted Hessians (moebench variant)" if params.router_weighted else "; unweighted Hessians (reference)")
                + order + chunk)

    def run_options(self, params: SparseGPTParams) -> dict:
        return {"staged": params.true_sequential, **({"expert_chunk": params.expert_chunk} if params.expert_chunk else {})}

    def prune(self, group: Group, params: SparseGPTParams) -> None:
        weight = group.weight
        for c in group.chunks():
            h = group.stats.hessian[c]
            unseen = group.stats.tokens[c] == 0
            if unseen.any():  # identity Hessian: magnitude saliency, no compensation
                h = h.clone()
                h[unseen] = torch.eye(h.shape[-1], device=h.device)
            new, _ = sparsegpt(weight[c], h, params.sparsity, params.pattern, params.damp, params.block_size,
                               params.scope, parts_of(group))
            weight[c] = new.to(weight.dtype)


class Achieved:
    """Measured zeros per module kind over the targeted matrices (and whether an n:m pattern holds everywhere),
    counted group by group as each is pruned."""

    def __init__(self, nm: NM | None):
        self.nm = nm
        self.zeros: dict[str, int] = {}
        self.total: dict[str, int] = {}
        self.matrices: dict[str, int] = {}
        self.holds = True

    def add(self, g: Group) -> None:
        w = g.weight
        self.zeros[g.kind] = self.zeros.get(g.kind, 0) + sum(int((w[c] == 0).sum()) for c in g.chunks())  # no whole-layer mask
        self.total[g.kind] = self.total.get(g.kind, 0) + w.numel()
        self.matrices[g.kind] = self.matrices.get(g.kind, 0) + w.shape[0]
        if self.nm is not None:
            self.holds = self.holds and nm_holds(w, self.nm)

    def summary(self) -> dict:
        out = {
            "sparsity": {k: round(self.zeros[k] / self.total[k], 6) for k in self.total},
            "weights": self.total,
            "matrices": self.matrices,
        }
        if self.nm is not None:
            out["nm_holds"] = self.holds
        return out


def achieved(groups: list[Group], nm: NM | None) -> dict:
    """:class:`Achieved` over ``groups`` at once."""
    counted = Achieved(nm)
    for g in groups:
        counted.add(g)
    return counted.summary()


@hookimpl
def register_methods():
    return [Magnitude, Wanda, SparseGPT]
