"""Pruning math shared by the pruning methods: per-row, per-matrix and n:m masks, the SparseGPT solver.

Functions take a weight stack ``[B, rows, cols]`` (one Linear has ``B = 1``; a MoE
block's experts are solved together) and return boolean masks that are ``True`` where a
weight is pruned. Unstructured masks prune exactly ``round(sparsity * n)`` of the ``n``
weights compared together: a row (WANDA), a whole matrix (magnitude, as the WANDA and
Unified-MoE references threshold each ``nn.Linear``) or a block of columns of a matrix
(SparseGPT). Experts are taken a few at a time so float32 temporaries stay small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moebench.sequential import inverse_cholesky


#: how ``nm`` strings read, said in ``moebench methods``, errors and records
NM_CONVENTION = (
    "'N:M' keeps N non-zeros in every M consecutive inputs (the 2:4 convention of NVIDIA, SparseGPT and WANDA); "
    "'keep N:M' says the same explicitly; 'prune N:M' zeroes N of every M (fusion_bench's semistructured convention)"
)


@dataclass(frozen=True)
class NM:
    """An n:m pattern: at most ``n`` non-zeros (kept weights) in every ``m`` consecutive inputs of a row."""

    n: int
    m: int

    @classmethod
    def parse(cls, text: str) -> "NM":
        """Read ``'N:M'`` / ``'keep N:M'`` (keep N of M) or ``'prune N:M'`` (prune N of M) into the keep form."""
        words = str(text).strip().lower().split()
        mode = words[0] if len(words) == 2 and words[0] in ("keep", "prune") else "keep"
        try:
            if len(words) not in (1, 2) or (len(words) == 2 and words[0] not in ("keep", "prune")):
                raise ValueError
            n, m = (int(p) for p in words[-1].split(":"))
        except ValueError:
            raise ValueError(f"nm must look like '2:4', 'keep 2:4' or 'prune 2:4', got {text!r}; {NM_CONVENTION}") from None
        if not 0 < n < m:
            raise ValueError(f"nm {text!r}: expected 0 < N < M; {NM_CONVENTION}")
        return cls(m - n, m) if mode == "prune" else cls(n, m)

    def describe(self) -> str:
        """The pattern in words, for records: ``'keeps 2 of every 4 inputs (prunes 2)'``."""
        return f"keeps {self.n} of every {self.m} inputs (prunes {self.m - self.n})"

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def pruned_per_row(sparsity: float, cols: int) -> int:
    """How many of ``cols`` weights an unstructured ratio prunes (rounded half up)."""
    return int(sparsity * cols + 0.5)


def lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of exactly the ``k`` lowest entries along the last dim of ``score`` (ties: first positions).

    A ``kthvalue`` threshold (a selection, linear time) instead of a ``topk`` of ``k`` indices:
    without ties at the threshold the set is the same as ``topk``'s, at about half the time.
    """
    n = score.shape[-1]
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(score, dtype=torch.bool)
    thr = score.kthvalue(k, dim=-1, keepdim=True).values
    mask = score < thr
    tie = score == thr
    need = k - mask.sum(-1, keepdim=True)
    if bool((tie.sum(-1, keepdim=True) > need).any()):
        tie &= tie.cumsum(-1) <= need
    return mask.logical_or_(tie)


def row_mask(score: torch.Tensor, sparsity: float, chunk: int = 2) -> torch.Tensor:
    """Prune the ``round(sparsity * cols)`` lowest scores of every row of ``score [B, rows, cols]`` (WANDA's comparison group).

    ``chunk`` matrices at a time: the selection's temporaries (a copy of the scores and int64
    positions, about 3x a float32 score) for two real-size experts, not for a whole slice of a layer."""
    k = pruned_per_row(sparsity, score.shape[-1])
    return torch.cat([lowest(part, k) for part in score.split(chunk)]) if score.ndim == 3 else lowest(score, k)


def matrix_mask(score: torch.Tensor, sparsity: float, parts: int = 1, chunk: int = 2) -> torch.Tensor:
    """Prune the ``round(sparsity * n)`` lowest scores of each matrix: one threshold per matrix.

    ``score [B, rows, cols]``; with ``parts = 2`` each stacked matrix is two Linear layers
    on top of each other (a packed expert's ``gate_up``: gate rows, then up rows), each
    with its own threshold, as the reference prunes each ``nn.Linear`` on its own.
    """
    B, rows, cols = score.shape
    k = pruned_per_row(sparsity, rows // parts * cols)
    out = [lowest(part.reshape(part.shape[0], parts, -1), k).reshape(part.shape) for part in score.split(chunk)]
    return torch.cat(out)


def nm_mask(score: torch.Tensor, nm: NM) -> torch.Tensor:
    """Keep the ``n`` highest scores in every ``m`` consecutive columns of each row."""
    cols = score.shape[-1]
    if cols % nm.m:
        raise ValueError(f"nm {nm}: input width {cols} is not a multiple of {nm.m} ({nm.describe()})")
    groups = score.reshape(*score.shape[:-1], cols // nm.m, nm.m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, groups.topk(nm.m - nm.n, dim=-1, largest=False).indices, True)
    return mask.reshape(score.shape)


def mask_for(score: torch.Tensor, sparsity: float, nm: NM | None, scope: str = "row", parts: int = 1) -> torch.Tensor:
    """n:m mask when ``nm`` is set, else the unstructured mask compared per ``row`` or per ``matrix``."""
    if nm is not None:
        return nm_mask(score, nm)
    return matrix_mask(score, sparsity, parts) if scope == "matrix" else row_mask(score, sparsity)


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
    scope: str = "block",
    parts: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh, 2301.00774; github.com/IST-DASLab/sparsegpt) on ``w [B, rows, cols]``
    with Hessians ``[B, cols, cols]``.

    Columns are visited in order; every pruned weight's error is compensated on the
    columns not yet visited through the Cholesky factor of ``H^-1``, lazily per block.
    Inputs never seen (``diag H = 0``) are zeroed first, as the reference does. Masks
    use the OBS saliency ``w^2 / [H^-1]_jj^2`` of the current (already compensated) weights:

    * ``scope = "block"`` (the reference): at each block of ``block_size`` columns, the
      fraction ``sparsity`` of the block's weights with the lowest saliency is pruned,
      with one threshold across all rows of the block (per stacked Linear: ``parts = 2``
      gives gate and up rows their own threshold, as two ``nn.Linear`` in the reference).
      Deviation: exactly ``round(sparsity * n)`` weights per block, where the reference's
      ``<= threshold`` prunes one more (and every tie).
    * ``scope = "row"`` (moebench's variant): every row spends what is left of a budget of
      ``round(sparsity * cols)`` on its lowest saliencies among the unvisited columns, so
      each row ends exactly at the requested ratio, as WANDA compares per row.

    n:m masks are chosen every ``m`` columns, per row. Returns ``(new weights, mask)`` in float32.
    """
    W = w.float().clone()
    H = hessian.float().clone()
    dead = H.diagonal(dim1=-2, dim2=-1) == 0
    H.diagonal(dim1=-2, dim2=-1)[dead] = 1.0
    W.masked_fill_(dead[:, None, :], 0.0)
    B, rows, cols = W.shape
    if nm is not None and cols % nm.m:
        raise ValueError(f"nm {nm}: input width {cols} is not a multiple of {nm.m} ({nm.describe()})")
    if nm is not None:
        block_size = max(nm.m, block_size // nm.m * nm.m)
    Hinv = inverse_cholesky(H, damp)
    del H
    diag = Hinv.diagonal(dim1=-2, dim2=-1)  # [B, cols]
    mask = torch.zeros_like(W, dtype=torch.bool)
    budget = torch.full((B, rows), pruned_per_row(sparsity, cols), device=W.device)  # still to prune, per row
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, :, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2].contiguous()
        d = diag[:, i1:i2]  # [B, count]
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None and scope == "block":
            mask1 = matrix_mask(W1.pow(2) / d[:, None, :].pow(2), sparsity, parts)
        elif nm is None and int(budget.max()):
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
