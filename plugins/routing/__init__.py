"""Runtime routing: methods that change which selected experts a token runs, at inference.

- ``dynamic_topk``: per token, the fewest of its selected experts whose router mass
  reaches ``p`` (top-p routing, as in Huang et al., "Harder Tasks Need More Experts:
  Dynamic Routing in MoE Models", ACL 2024, arXiv 2403.07652), bounded by top-k.
- ``expert_skip``: NAEE's dynamic skipping (Lu et al., "Not All Experts are Equal",
  ACL 2024, arXiv 2402.14800; reference Lucky-Lance/Expert_Sparsity): a selected
  expert whose score is below ``beta`` times the top one is skipped.

Both install a :class:`moebench.adapter.RoutingRule` on each router through the adapter
(:meth:`moebench.adapter.MoEModel.set_routing`): skipped slots get the experts module's
sentinel index and cost no compute, so the ``flops`` metric (torch's counter over a real
prefill) and ``speed`` measure the skipped work. The rules are recorded in
``config.moebench``: a saved model reloads with the same routing through
:func:`moebench.models.load_pretrained` (plain transformers would run the full top-k).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from moebench.hookspecs import hookimpl
from moebench.method import Context, Method
from moebench.params import param

from .rules import SKIP_CLASS, TOP_P_CLASS, SkipBelow, TopP


@dataclass
class DynamicTopKParams:
    p: float = param(0.9, help="router-score mass a token's kept experts must reach (1: every selected expert runs)")
    top_k: int | None = param(None, help="most experts a token may run (default: the model's top-k; larger widens the selection first)")
    renormalize: bool = param(True, help="scale the kept experts' weights back to the selected experts' total weight")

    def check(self):
        if not 0 < self.p <= 1:
            raise ValueError(f"p must be in (0, 1], got {self.p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


class DynamicTopK(Method):
    """Dynamic top-p routing (Huang et al. 2024, arXiv 2403.07652): each token runs the fewest selected experts whose score mass reaches p.

    moebench's form: the architecture's own top-k selection is kept (group-limited routing
    included) and pruned per token by cumulative score mass; the paper trains a top-p
    router from scratch, here it is applied to a trained top-k router without retraining.
    """

    name = "dynamic_topk"
    Params = DynamicTopKParams

    def apply(self, model, params: DynamicTopKParams, ctx: Context) -> dict:
        init = {"p": params.p, "renormalize": params.renormalize}
        for b in model.blocks():
            if params.top_k is not None:
                model.set_top_k(b.layer, min(params.top_k, b.num_experts))
            model.set_routing(b.layer, TopP(**init), {"class": TOP_P_CLASS, "init": init})
        ctx.note("dynamic_topk: routing changes at run time; the params metric's active count still assumes the full top-k "
                 "(flops counts the experts actually run)")
        return {"rule": "top_p", "p": params.p, "renormalize": params.renormalize,
                "top_k": {b.layer: b.top_k for b in model.blocks()}, "reload": "moebench"}


@dataclass
class ExpertSkipParams:
    beta: float | None = param(
        None, help="skip a selected expert scoring below beta x the top score; default: per layer, the median "
        "second/first score ratio on calibration tokens (the reference's choice)"
    )
    renormalize: bool = param(True, help="scale the kept experts' weights back to the selected experts' total weight (the reference renormalises)")

    def check(self):
        if self.beta is not None and not 0 <= self.beta <= 1:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")


def median_ratio(probs: torch.Tensor) -> float:
    """Median over tokens of the second-highest over the highest router score (NAEE's beta)."""
    top = probs.float().topk(2, dim=-1).values
    return float(statistics.median((top[:, 1] / top[:, 0].clamp_min(1e-20)).tolist()))


class ExpertSkip(Method):
    """NAEE dynamic expert skipping (Lu et al. 2024, arXiv 2402.14800): skip selected experts scoring below beta x the top one.

    Reference: Lucky-Lance/Expert_Sparsity (Mixtral, top-2: the second expert is skipped
    when its weight is below beta x the first; beta per layer = median ratio on
    calibration data; weights renormalised). Generalised here to any top-k: every
    selected expert but the top one is tested against beta x the top score.
    """

    name = "expert_skip"
    Params = ExpertSkipParams
    stats = ("router_logits",)

    def needs(self, params: ExpertSkipParams) -> tuple[str, ...]:
        return self.stats if params.beta is None else ()

    def apply(self, model, params: ExpertSkipParams, ctx: Context) -> dict:
        logits = ctx.stats(model, "router_logits")["router_logits"] if params.beta is None else {}
        betas = {}
        for b in model.blocks():
            if params.beta is not None:
                betas[b.layer] = params.beta
            elif b.num_experts < 2:
                betas[b.layer] = 0.0
            else:
                betas[b.layer] = round(median_ratio(b.probabilities(logits[b.layer].float())), 6)
            init = {"beta": betas[b.layer], "renormalize": params.renormalize}
            model.set_routing(b.layer, SkipBelow(**init), {"class": SKIP_CLASS, "init": init})
        ctx.note("expert_skip: routing changes at run time; the params metric's active count still assumes the full top-k "
                 "(flops counts the experts actually run)")
        return {"rule": "skip_below", "beta": betas, "calibrated": params.beta is None,
                "renormalize": params.renormalize, "reload": "moebench"}


@hookimpl
def register_methods():
    return [DynamicTopK, ExpertSkip]


@hookimpl
def register_module_classes():
    """The routing rules saved models carry (rebuilt from their init on reload)."""
    return [TopP, SkipBelow]
