"""D2-MoE: delta decompression of a layer's experts (Gu et al., "Delta Decompression for
MoE-based LLMs Compression", ICML 2025, arXiv 2502.17298; reference zhy617/D2MoE,
``preprocess/get_fisher.py`` and the ``D2-*.py`` scripts).

Per MoE layer:

1. **Fisher-weighted base**: ``W_base = sum_e F_e * W_e / sum_e F_e`` (elementwise), with
   ``F_e`` the empirical Fisher of expert ``e``'s weights: squared gradients of the
   language-modelling loss on the calibration windows, averaged over batches (as the
   reference's ``calib_fisher_info``). ``fisher = "expert"`` keeps one number per expert
   and matrix (the summed Fisher) to save memory on large models.
2. **Whitened truncated SVD of each delta** ``D_e = W_e - W_base``: with ``S`` the Cholesky
   factor of the Gram matrix of the matrix's inputs on the tokens routed to ``e``
   (``X^T X = S S^T``, damped), ``D_e S = U Sigma V^T`` is truncated to ``rank`` and
   ``D_e ~ (U_r Sigma_r^1/2)(Sigma_r^1/2 V_r^T S^-1)`` (SVD-LLM's truncation-aware
   whitening, which the paper uses): the truncation error is measured on the outputs.

The experts become one shared base plus per-expert low-rank deltas
(:class:`~moebench_plugins.fusion.modules.MixtureOfLoRAExperts` with a single core),
behind the original router; at full rank every expert is reproduced. Grams are gathered
layer by layer on the inputs the already-compressed layers produce (:mod:`moebench.sequential`).
Deviation: the paper also prunes the base weight (semi-dynamic structured pruning); that
step is not implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from moebench.adapter import MoEModel
from moebench.method import Context, Method
from moebench.params import param

from .modules import CLASS_PATH, MixtureOfLoRAExperts
from .variants import experts_init, install_fused


@dataclass
class D2MoEParams:
    rank: int = param(16, help="rank of each expert's delta (>= min(hidden, intermediate) reproduces every expert)")
    fisher: Literal["elementwise", "expert"] = param(
        "elementwise", help="elementwise: Fisher merging per weight (the reference); expert: one Fisher number per expert and matrix (less memory)"
    )
    damp: float = param(0.01, help="dampening added to each Gram diagonal before whitening, as a fraction of its mean")

    def check(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")


def expert_fisher(model: MoEModel, windows: torch.Tensor, batch_size: int, elementwise: bool = True) -> dict[int, dict[str, torch.Tensor]]:
    """Mean squared gradient of the LM loss for every MoE layer's packed expert weights.

    ``{layer: {"gate_up_proj": F, "down_proj": F}}``, ``F`` shaped like the weights
    (``elementwise``) or ``[E]`` (summed per expert).
    """
    blocks = list(model.blocks())
    params = {(b.layer, attr): getattr(b.experts, attr) for b in blocks for attr in ("gate_up_proj", "down_proj")}
    wanted = {id(p) for p in params.values()}
    saved = [(p, p.requires_grad) for p in model.model.parameters()]
    for p, _ in saved:
        p.requires_grad_(id(p) in wanted)
    acc: dict = {}
    batches = 0
    try:
        with torch.enable_grad():
            for batch in windows.split(batch_size):
                batch = batch.to(model.device)
                loss = model.model(input_ids=batch, labels=batch, use_cache=False).loss
                loss.backward()
                for key, p in params.items():
                    if p.grad is None:
                        continue
                    g2 = p.grad.detach().float().pow(2)
                    g2 = g2 if elementwise else g2.sum(dim=(1, 2))
                    acc[key] = acc[key] + g2 if key in acc else g2
                    p.grad = None
                batches += 1
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None
    out: dict[int, dict[str, torch.Tensor]] = {}
    for (layer, attr), p in params.items():
        f = acc.get((layer, attr))
        if f is None:
            f = torch.zeros(p.shape if elementwise else p.shape[:1], device=p.device)
        out.setdefault(layer, {})[attr] = f / max(batches, 1)
    return out


def fisher_base(weights: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """``sum_e F_e W_e / sum_e F_e`` over experts (dim 0); ``F`` elementwise or ``[E]``; plain mean where the Fisher is all zero."""
    w = weights.double()
    f = fisher.double().to(w.device)
    if f.dim() == 1:
        f = f[:, None, None].expand_as(w)
    total = f.sum(0)
    merged = (f * w).sum(0) / total.clamp_min(1e-300)
    return torch.where(total > 0, merged, w.mean(0))


def whitened_low_rank(delta: torch.Tensor, gram: torch.Tensor, rank: int, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B [out, rank], A [rank, in])`` minimising ``||(delta - B A) X^T||`` for inputs with Gram ``X^T X = gram``.

    SVD of ``delta S`` (``S S^T`` the damped Gram), truncated, mapped back by ``S^-1``;
    exact at full rank. A zero Gram (no routed tokens) whitens with the identity.
    """
    d = delta.double()
    g = gram.double().to(d.device)
    n = g.shape[0]
    eye = torch.eye(n, dtype=torch.float64, device=d.device)
    mean = g.diagonal().mean()
    g = eye if mean <= 0 else g + damp * mean * eye
    chol, info = torch.linalg.cholesky_ex(g)
    while int(info) > 0:  # not positive definite: more damping
        g = g + damp * max(float(mean), 1.0) * eye
        chol, info = torch.linalg.cholesky_ex(g)
    u, s, vh = torch.linalg.svd(d @ chol, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = torch.zeros(d.shape[0], rank, dtype=torch.float64, device=d.device)
    a = torch.zeros(rank, d.shape[1], dtype=torch.float64, device=d.device)
    b[:, :r] = u[:, :r] * root
    a[:r] = torch.linalg.solve_triangular(chol, root[:, None] * vh[:r], upper=False, left=False)
    return b.to(delta.dtype), a.to(delta.dtype)


class D2MoE(Method):
    """D2-MoE (Gu et al. 2025, arXiv 2502.17298): a Fisher-weighted base expert per layer plus a whitened truncated SVD of each expert's delta.

    Reference: zhy617/D2MoE. Deviation: the paper's semi-dynamic structured pruning of
    the base weight is not implemented (the base is kept dense).
    """

    name = "d2_moe"
    Params = D2MoEParams
    needs_calibration = True

    def apply(self, model: MoEModel, params: D2MoEParams, ctx: Context) -> dict:
        windows = ctx.calibration.windows(model.tokenizer) if ctx.calibration is not None else None
        if windows is None:
            from moebench.errors import MoebenchError

            raise MoebenchError("d2_moe needs calibration data; add a [calibration] table to the suite")
        fisher = expert_fisher(model, windows, ctx.calibration.spec.batch_size, params.fisher == "elementwise")
        run = ctx.sequential(model, self.name, targets=["experts"], collect=["hessian"], router_weighted=False)
        facts, before = {}, model.expert_counts()
        for step in run:
            block = model.block(step.index)
            if block is None:
                continue
            grams = {g.attr: g.stats.hessian for g in step.groups if g.module is block.experts}
            facts[block.layer] = self._decompose(model, block, fisher[block.layer], grams, params)
        ctx.note("d2_moe: decomposed layers are opaque to the MoEModel view (later steps and the experts count skip them)")
        return {"rank": params.rank, "fisher": params.fisher, "layers": facts, "experts_before": sum(before.values()),
                "reload": "moebench", "module_class": CLASS_PATH}

    @torch.no_grad()
    def _decompose(self, model: MoEModel, block, fisher: dict, grams: dict, params: D2MoEParams) -> dict:
        inter, hidden = block.intermediate_size, block.gate_up_proj.shape[-1]
        rank = min(params.rank, inter, hidden)
        ref = block.gate_up_proj
        base_gu = fisher_base(block.gate_up_proj.data, fisher["gate_up_proj"])
        base_d = fisher_base(block.down_proj.data, fisher["down_proj"])
        init = {**experts_init(model, block, _OneGroup(block.num_experts)), "rank": rank}
        experts = MixtureOfLoRAExperts(**init).to(device=ref.device, dtype=torch.float64)
        experts.core_gate_up[0].copy_(base_gu)
        experts.core_down[0].copy_(base_d)
        err = total = 0.0
        for e in range(block.num_experts):
            gate, up, down = (w.double() for w in block.expert(e))
            b_g, a_g = whitened_low_rank(gate - base_gu[:inter], grams["gate_up_proj"][e], rank, params.damp)
            b_u, a_u = whitened_low_rank(up - base_gu[inter:], grams["gate_up_proj"][e], rank, params.damp)
            b_d, a_d = whitened_low_rank(down - base_d, grams["down_proj"][e], rank, params.damp)
            experts.set_residual(e, (b_g, a_g), (b_u, a_u), (b_d, a_d))
            for w, approx in ((gate, base_gu[:inter] + b_g @ a_g), (up, base_gu[inter:] + b_u @ a_u), (down, base_d + b_d @ a_d)):
                err += (w - approx).pow(2).sum().item()
                total += w.pow(2).sum().item()
        install_fused(model, block, experts.to(dtype=ref.dtype), init)
        return {"rank": rank, "full_rank": rank >= min(inter, hidden), "weight_rel_error": math.sqrt(err / max(total, 1e-300)),
                "top_k": block.top_k}


class _OneGroup:
    """Every expert assigned to the single shared base (``experts_init`` reads ``assign``)."""

    def __init__(self, n: int):
        self.assign = [0] * n
