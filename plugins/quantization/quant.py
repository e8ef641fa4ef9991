"""Weight quantization math shared by the quantization methods: RTN, GPTQ, AWQ, int4 packing.

Small pure functions on weight matrices ``[rows, cols]`` (rows are outputs, cols are
inputs), or stacks ``[B, rows, cols]`` so every expert of a MoE block is solved in one
batched call. Quantization is group-wise along the input dimension:
``w ≈ (code - zero) * scale`` with one ``scale``/``zero`` per row and group of
``group_size`` columns (``-1``: one group per row). It is asymmetric (min-max, as the
papers' reference code defaults to) unless ``symmetric``: then ``zero = 2**(bits-1)`` and
``scale = max|w| / ((2**bits - 1) / 2)``, GPTQ's ``sym=True`` and the scheme compressed-tensors
stores without zero points (``code - zero`` is its signed value). Scales are rounded to float16, so the
fake-quantized weights equal exactly what a packed int4 store dequantizes to.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from moebench.sequential import inverse_cholesky

BITS = (2, 3, 4, 8)


@dataclass
class Quantized:
    """Integer codes with their group-wise scale and zero point: ``w ≈ (codes - zero) * scale``.

    ``codes`` is uint8 ``[..., rows, cols]``; ``scale`` and ``zero`` are float32
    ``[..., rows, groups]`` (zero holds integers in ``[0, 2**bits)``).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int

    def select(self, index) -> "Quantized":
        """The codes of some stacked matrices (``index`` into the leading dim)."""
        return Quantized(self.codes[index], self.scale[index], self.zero[index], self.bits, self.group_size)

    @staticmethod
    def cat(parts: list["Quantized"]) -> "Quantized":
        """Stacks of codes joined along the leading dim."""
        return Quantized(torch.cat([q.codes for q in parts]), torch.cat([q.scale for q in parts]),
                         torch.cat([q.zero for q in parts]), parts[0].bits, parts[0].group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        cols = self.codes.shape[-1]
        scale = expand_groups(self.scale, self.group_size, cols)
        zero = expand_groups(self.zero, self.group_size, cols)
        return ((self.codes.float() - zero) * scale).to(dtype)


def group_size_for(group_size: int, cols: int) -> int:
    """The effective group size: ``-1`` or anything wider than the row means one group per row."""
    return cols if group_size <= 0 or group_size >= cols else group_size


def expand_groups(values: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    """Per-group values ``[..., groups]`` repeated to per-column ``[..., cols]``."""
    return values.repeat_interleave(group_size, dim=-1)[..., :cols]


def group_params(w: torch.Tensor, bits: int, symmetric: bool = False, half_scales: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max ``(scale, zero)`` over the last dim of ``w``; the range always holds 0 (as GPTQ does).

    ``symmetric``: ``scale = max|w| / ((2**bits - 1) / 2)`` and ``zero = 2**(bits-1)`` (GPTQ's
    ``sym=True``; codes ``-2**(bits-1) .. 2**(bits-1) - 1`` once the zero is taken off).
    The scale is rounded to float16 (how it is stored, so codes are chosen against the scale
    that dequantizes them; ``half_scales = False`` keeps float32, as GPTQModel quantizes
    before it stores float16); an all-zero group gets scale 1.
    """
    maxq = 2**bits - 1
    if symmetric:
        scale = w.abs().amax(dim=-1) / (maxq / 2)
    else:
        lo = w.amin(dim=-1).clamp(max=0)
        hi = w.amax(dim=-1).clamp(min=0)
        scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if half_scales:
        scale = scale.half().float()
        scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))  # float16 underflow
    if symmetric:
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``w`` for per-element (already expanded) ``scale`` and ``zero``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """``[..., rows, cols]`` as ``[..., rows, groups, g]``, zero-padded (zeros never widen a range that holds 0)."""
    cols = w.shape[-1]
    pad = -cols % g
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(*w.shape[:-1], (cols + pad) // g, g)


def rtn(w: torch.Tensor, bits: int, group_size: int = 128, symmetric: bool = False) -> Quantized:
    """Round-to-nearest group-wise quantization of ``w [..., rows, cols]``."""
    _check_bits(bits)
    w = w.float()
    g = group_size_for(group_size, w.shape[-1])
    scale, zero = group_params(_grouped(w, g), bits, symmetric)
    cols = w.shape[-1]
    codes = quantize_codes(w, expand_groups(scale, g, cols), expand_groups(zero, g, cols), bits)
    return Quantized(codes.to(torch.uint8), scale, zero, bits, g)


def theoretical_bits(bits: int, group_size: int, cols: int, symmetric: bool = False) -> float:
    """Bits per weight of a group-wise store: the code, plus a float16 scale and (asymmetric) a ``bits``-wide zero per group."""
    g = group_size_for(group_size, cols)
    return bits + (16 + (0 if symmetric else bits)) * math.ceil(cols / g) / cols


# -- GPTQ ---------------------------------------------------------------------------------
def _prepare_hessian(w: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float copies with dead inputs (never active) made harmless: diag 1 in H. Returns ``(W, H, dead)``."""
    W = w.float().clone()
    H = hessian.float().clone()
    dead = H.diagonal(dim1=-2, dim2=-1) == 0
    H.diagonal(dim1=-2, dim2=-1)[dead] = 1.0
    return W, H, dead


def gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int = 128,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    symmetric: bool = False,
    group_weights: str = "block_start",
    half_scales: bool = True,
) -> Quantized:
    """GPTQ (Frantar et al., 2210.17323) on a stack ``w [B, rows, cols]`` with Hessians ``H [B, cols, cols]``.

    Columns are quantized one at a time; each one's rounding error is spread over the
    not-yet-quantized columns through the inverse Hessian's Cholesky factor, updated
    lazily in blocks. ``act_order`` visits columns by decreasing ``diag(H)``; group
    scales are then fixed up front from the original weights, so groups stay runs of
    contiguous columns (what a packed store needs). ``H`` is any positive multiple of
    ``X^T X`` over the calibration inputs.

    ``group_weights = "block_start"`` fits a group's scale to its columns as they stood when
    their block began, as the reference code does (IST-DASLab/gptq, AutoGPTQ, GPTQModel);
    ``"updated"`` (moebench's earlier rule) fits it after the error feedback of earlier
    columns in the block; they differ only for groups narrower than the block. ``half_scales``
    rounds scales to float16 before choosing codes (see :func:`group_params`); off, the
    codes equal GPTQModel's to the bit (tests/test_peer_gptqmodel.py).
    """
    _check_bits(bits)
    if group_weights not in ("updated", "block_start"):
        raise ValueError(f"group_weights must be 'updated' or 'block_start', got {group_weights!r}")
    squeeze = w.ndim == 2
    if squeeze:
        w, hessian = w[None], hessian[None]
    W, H, dead = _prepare_hessian(w, hessian)
    W.masked_fill_(dead[:, None, :], 0.0)  # unseen inputs: any value is free, 0 is exact
    B, rows, cols = W.shape
    g = group_size_for(group_size, cols)
    groups = math.ceil(cols / g)
    maxq = 2**bits - 1
    scale = torch.zeros(B, rows, groups, device=W.device)
    zero = torch.zeros_like(scale)
    batch = torch.arange(B, device=W.device)
    if act_order:
        s, z = group_params(_grouped(W, g), bits, symmetric, half_scales)
        scale.copy_(s)
        zero.copy_(z)
        perm = torch.argsort(H.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)
        W = W.gather(2, perm[:, None, :].expand(B, rows, cols))
        H = H[batch[:, None, None], perm[:, :, None], perm[:, None, :]]
    else:
        perm = torch.arange(cols, device=W.device).expand(B, cols)
    Hinv = inverse_cholesky(H, damp)
    codes = torch.zeros(B, rows, cols, dtype=torch.uint8, device=W.device)
    block = block_size if act_order else max(g, block_size // g * g)  # groups never straddle blocks
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, :, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2].contiguous()  # rows read whole below: a compact copy, not a strided view
        for i in range(i2 - i1):
            col = i1 + i
            if not act_order:
                if col % g == 0:
                    source = W1[:, :, i : i + g] if group_weights == "updated" else W[:, :, col : col + g]
                    s, z = group_params(source, bits, symmetric, half_scales)
                    scale[:, :, col // g], zero[:, :, col // g] = s, z
                s, z = scale[:, :, col // g], zero[:, :, col // g]
            else:
                grp = (perm[:, col] // g)[:, None, None].expand(B, rows, 1)
                s, z = scale.gather(2, grp)[..., 0], zero.gather(2, grp)[..., 0]
            w_col = W1[:, :, i]
            q = torch.clamp(torch.round(w_col / s) + z, 0, maxq)
            codes[:, :, col] = q.to(torch.uint8)
            err = (w_col - (q - z) * s) / Hinv1[:, i, i][:, None]
            W1[:, :, i:] -= err[:, :, None] * Hinv1[:, None, i, i:]
            err1[:, :, i] = err
        W[:, :, i2:] -= err1 @ Hinv[:, i1:i2, i2:]
    if act_order:
        codes = codes.gather(2, torch.argsort(perm, dim=-1)[:, None, :].expand(B, rows, cols))
    out = Quantized(codes, scale, zero, bits, g)
    if squeeze:
        out = Quantized(codes[0], scale[0], zero[0], bits, g)
    return out


# -- AWQ ----------------------------------------------------------------------------------
def awq_scale(
    w: torch.Tensor, x: torch.Tensor, act_mean: torch.Tensor, bits: int, group_size: int, grid: int = 20,
    symmetric: bool = False,
) -> tuple[torch.Tensor, float, float]:
    """AWQ's per-input-channel scale search (Lin et al., 2306.00978).

    Tries ``s = act_mean**a`` (normalised) for ``a`` on a grid in ``[0, 1)`` and keeps the
    one whose quantized ``Q(w * s) / s`` best reproduces ``x @ w.T`` on the sample
    ``x [n, cols]``; ``a = 0`` is plain round-to-nearest, so the search never does worse
    than RTN on the sample. Returns ``(s [cols], best alpha, error ratio to RTN)``.
    """
    w, x = w.float(), x.float()
    target = x @ w.T
    best = (None, 0.0, math.inf)
    rtn_error = None
    for alpha, s in awq_candidates(act_mean, grid):
        wq = rtn(w * s, bits, group_size, symmetric).dequantize() / s
        error = (x @ wq.T - target).pow(2).mean().item()
        if rtn_error is None:
            rtn_error = error
        if error < best[2]:
            best = (s, alpha, error)
    return best[0], best[1], best[2] / rtn_error if rtn_error else 1.0


def awq_candidates(act_mean: torch.Tensor, grid: int) -> Iterator[tuple[float, torch.Tensor]]:
    """AWQ's grid: ``(alpha, s)`` with ``s = act_mean**alpha`` normalised by ``sqrt(max * min)``, stored as float16."""
    base = act_mean.float().clamp_min(0)
    for k in range(grid):
        alpha = k / grid
        s = base.pow(alpha).clamp(min=1e-4)
        yield alpha, (s / (s.max() * s.min()).sqrt()).half().float()


class RoutedExperts:
    """A block's routed experts on kept inputs: ``y = sum_e w_e * down_e(act(gate_e x) * up_e x)``.

    ``gate_up [E, 2I, H]``, ``down [E, H, I]``; ``x [n, H]`` with ``index``/``weights
    [n, k]`` as the experts module receives them. Token lists per expert are found once.
    """

    def __init__(self, gate_up, down, act, x, index, weights):
        self.gate_up, self.down, self.act = gate_up, down, act
        self.x = x.float()
        self.routes = []
        for e in index.unique().tolist():
            if 0 <= e < gate_up.shape[0]:
                tok, pos = torch.where(index == e)
                self.routes.append((e, tok, weights[tok, pos].float()[:, None]))

    def output(self, gate_up_of=None) -> torch.Tensor:
        """The block output; ``gate_up_of(e)`` replaces expert ``e``'s ``gate_up`` (float32) when given."""
        out = torch.zeros_like(self.x)
        for e, tok, w in self.routes:
            gu = self.gate_up[e].float() if gate_up_of is None else gate_up_of(e)
            gate, up = (self.x[tok] @ gu.T).chunk(2, dim=-1)
            out.index_add_(0, tok, ((self.act(gate) * up) @ self.down[e].float().T) * w)
        return out


def awq_block_scale(
    experts: RoutedExperts, act_mean: torch.Tensor, bits: int, group_size: int, grid: int = 20, symmetric: bool = False
) -> tuple[torch.Tensor, float, float]:
    """AWQ's scale search on a whole MoE block, as llm-awq / AutoAWQ do for MoE models.

    One scale ``s [H]`` for every expert's gate and up (they read the same normed input):
    for each grid point, every expert's ``Q(gate_up * s) / s`` replaces its ``gate_up``
    and the error of the block output (down in full precision) is measured on the kept
    inputs; the grid point with the least error wins (``alpha = 0`` is round-to-nearest).
    Returns ``(s, best alpha, error ratio to RTN)``. The error is read once per grid point.
    """
    target = experts.output()
    best = (None, 0.0, math.inf)
    rtn_error = None
    for alpha, s in awq_candidates(act_mean, grid):
        out = experts.output(lambda e: rtn(experts.gate_up[e].float() * s, bits, group_size, symmetric).dequantize() / s)
        error = (out - target).pow(2).mean().item()
        if rtn_error is None:
            rtn_error = error
        if error < best[2]:
            best = (s, alpha, error)
    return best[0], best[1], best[2] / rtn_error if rtn_error else 1.0


def awq_clip(
    w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, grid: int = 20, max_shrink: float = 0.5, chunk: int = 64,
    symmetric: bool = False,
) -> torch.Tensor:
    """AWQ's clipping search: per row and group, the symmetric clip ``±max|w| * (1 - i/grid)``
    whose quantization best reproduces that group's partial outputs on ``x [n, cols]``.

    Returns the per-(row, group) clip values ``[rows, groups]``.
    """
    w, x = w.float(), x.float()
    rows, cols = w.shape
    g = group_size_for(group_size, cols)
    xg = _grouped(x, g)  # [n, groups, g]
    wg = _grouped(w, g)  # [rows, groups, g]
    best_max = wg.abs().amax(dim=-1)  # [rows, groups]
    for r0 in range(0, rows, chunk):
        wc = wg[r0 : r0 + chunk]
        orig_max = wc.abs().amax(dim=-1, keepdim=True)
        target = torch.einsum("ngk,rgk->rng", xg, wc)
        best_err = torch.full(wc.shape[:2], math.inf, device=w.device)
        for i in range(int(max_shrink * grid)):
            max_val = orig_max * (1 - i / grid)
            clipped = torch.maximum(torch.minimum(wc, max_val), -max_val)
            scale, zero = group_params(clipped, bits, symmetric)
            q = (quantize_codes(clipped, scale[..., None], zero[..., None], bits) - zero[..., None]) * scale[..., None]
            err = (torch.einsum("ngk,rgk->rng", xg, q) - target).pow(2).mean(dim=1)  # [rows, groups]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max[r0 : r0 + chunk] = torch.where(better, max_val[..., 0], best_max[r0 : r0 + chunk])
    return best_max


def clip_groups(w: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w [rows, cols]`` clamped to ``±max_val [rows, groups]`` group by group."""
    cols = w.shape[-1]
    g = group_size_for(group_size, cols)
    m = expand_groups(max_val, g, cols)
    return torch.maximum(torch.minimum(w.float(), m), -m)


# -- int4 packing -------------------------------------------------------------------------
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dim (even column in the low nibble); odd widths padded."""
    codes = codes.to(torch.uint8)
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 codes ``[..., cols]``."""
    out = torch.stack((packed & 0x0F, packed >> 4), dim=-1)
    return out.reshape(*packed.shape[:-1], -1)[..., :cols]


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits}")
