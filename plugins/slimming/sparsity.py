"""Pruning math shared by the pruning methods: per-row and n:m masks, the SparseGPT solver.

Functions take a weight stack ``[B, rows, cols]`` (one Linear has ``B = 1``; a MoE
block's experts are solved together) and return boolean masks that are ``True`` where a
weight is pruned. Unstructured masks compare scores within each output row, as WANDA
does, and prune exactly ``round(sparsity * cols)`` weights of every row, so the achieved
ratio is the requested one up to that rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moebench.sequential import inverse_cholesky


@dataclass(frozen=True)
class NM:
    """An n:m pattern: at most ``n`` non-zeros in every ``m`` consecutive inputs of a row."""

    n: int
    m: int

    @classmethod
    def parse(cls, text: str) -> "NM":
        try:
            n, m = (int(p) for p in str(text).split(":"))
        except ValueError:
            raise ValueError(f"nm must look like '2:4' (n non-zeros of every m), got {text!r}") from None
        if not 0 < n < m:
            raise ValueError(f"nm {text!r}: expected 0 < n < m")
        return cls(n, m)

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def pruned_per_row(sparsity: float, cols: int) -> int:
    """How many of a row's ``cols`` weights an unstructured ratio prunes (rounded half up)."""
    return int(sparsity * cols + 0.5)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``round(sparsity * cols)`` lowest scores of every row of ``score [..., rows, cols]``."""
    k = pruned_per_row(sparsity, score.shape[-1])
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(-1, score.topk(k, dim=-1, largest=False).indices, True)
    return mask


def nm_mask(score: torch.Tensor, nm: NM) -> torch.Tensor:
    """Keep the ``n`` highest scores in every ``m`` consecutive columns of each row."""
    cols = score.shape[-1]
    if cols % nm.m:
        raise ValueError(f"nm {nm}: input width {cols} is not a multiple of {nm.m}")
    groups = score.reshape(*score.shape[:-1], cols // nm.m, nm.m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, groups.topk(nm.m - nm.n, dim=-1, largest=False).indices, True)
    return mask.reshape(score.shape)


def mask_for(score: torch.Tensor, sparsity: float, nm: NM | None) -> torch.Tensor:
    return nm_mask(score, nm) if nm is not None else row_mask(score, sparsity)


def nm_holds(w: torch.Tensor, nm: NM) -> bool:
    """Whether every ``m`` consecutive inputs of every row hold at most ``n`` non-zeros."""
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // nm.m, nm.m)
    return bool(((groups != 0).sum(-1) <= nm.n).all())


def wanda_score(w: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """WANDA's importance ``|W_ij| * ||X_j||`` from ``w [B, rows, cols]`` and summed squares ``[B, cols]``."""
    return w.float().abs() * sq_norm.float().clamp_min(0).sqrt()[:, None, :]


def sparsegpt(
    w: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.5,
    nm: NM | None = None,
    damp: float = 0.01,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh, 2301.00774) on ``w [B, rows, cols]`` with Hessians ``[B, cols, cols]``.

    Columns are visited in order; every pruned weight's error is compensated on the
    columns not yet visited. Masks use the OBS saliency ``w^2 / [H^-1]_jj^2`` of the
    current (already compensated) weights: at each block of columns, every row spends
    what is left of its budget on its lowest saliencies among the unvisited columns, and
    those inside the block are pruned now. So every row ends exactly at its count (as
    WANDA compares per row) while the mask still adapts block by block, as SparseGPT's
    does. n:m masks are chosen every ``m`` columns. Returns ``(new weights, mask)`` in float32.
    """
    W = w.float().clone()
    H = hessian.float().clone()
    H.diagonal(dim1=-2, dim2=-1)[H.diagonal(dim1=-2, dim2=-1) == 0] = 1.0
    B, rows, cols = W.shape
    if nm is not None and cols % nm.m:
        raise ValueError(f"nm {nm}: input width {cols} is not a multiple of {nm.m}")
    if nm is not None:
        block_size = max(nm.m, block_size // nm.m * nm.m)
    Hinv = inverse_cholesky(H, damp)
    diag = Hinv.diagonal(dim1=-2, dim2=-1)  # [B, cols]
    mask = torch.zeros_like(W, dtype=torch.bool)
    budget = torch.full((B, rows), pruned_per_row(sparsity, cols), device=W.device)  # still to prune, per row
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, :, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        d = diag[:, i1:i2]  # [B, count]
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None and int(budget.max()):
            # each row's remaining budget goes to its lowest saliencies among the columns not yet
            # visited; those inside this block are pruned now (exact per row, adaptive across blocks)
            saliency = W[:, :, i1:].pow(2) / diag[:, None, i1:].pow(2)
            order = saliency.argsort(dim=-1)[..., : int(budget.max())]
            chosen = torch.arange(order.shape[-1], device=W.device) < budget[..., None]
            rest = torch.zeros_like(saliency, dtype=torch.bool).scatter_(-1, order, chosen)
            mask1 = rest[:, :, : i2 - i1]
            budget -= mask1.sum(-1)
        for i in range(i2 - i1):
            if nm is not None and i % nm.m == 0:
                saliency = W1[:, :, i : i + nm.m].pow(2) / d[:, None, i : i + nm.m].pow(2)
                idx = saliency.topk(nm.m - nm.n, dim=-1, largest=False).indices
                mask1[:, :, i : i + nm.m].scatter_(-1, idx, True)
            w_col = W1[:, :, i]
            q = w_col.masked_fill(mask1[:, :, i], 0.0)
            err = (w_col - q) / d[:, i, None]
            W1[:, :, i:] -= err[:, :, None] * Hinv1[:, None, i, i:]
            W1[:, :, i] = q
            err1[:, :, i] = err
        W[:, :, i1:i2] = W1
        mask[:, :, i1:i2] = mask1
        W[:, :, i2:] -= err1 @ Hinv[:, i1:i2, i2:]
    W.masked_fill_(mask, 0.0)
    return W, mask
