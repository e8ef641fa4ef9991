"""Expert analysis: which experts fire together, compute alike, or look alike.

Three ``[E, E]`` matrices per MoE layer, which fusion methods group experts by and
``moebench analyze`` draws as heatmaps:

- **co-activation**: how many tokens select both experts (the diagonal is each expert's
  selection count). One ``bincount`` over every token's ``k²`` expert pairs, so 100k
  tokens at top-8 cost a few million integer adds per layer, with no loop over tokens.
- **output similarity**: mean cosine between two experts' outputs on the same tokens,
  over all sampled tokens and over the tokens routed to either of the two.
- **weight similarity**: cosine between the experts' flattened gate, up and down weights.

Everything here is plain tensors in, tensors out; the calibration statistics that feed
it live in :mod:`moebench_plugins.fusion`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

#: cap on the ``N * E * E`` cosine block computed at once (elements)
_BLOCK = 1 << 24


def coactivation_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E, E]`` int64: tokens whose top-k ``indices [..., k]`` contain both experts (diagonal: each expert's count)."""
    idx = indices.reshape(-1, indices.shape[-1]).long()
    idx = idx.masked_fill((idx < 0) | (idx >= num_experts), num_experts)  # out-of-range slots land in a spill bin
    e = num_experts + 1
    pairs = (idx.unsqueeze(2) * e + idx.unsqueeze(1)).reshape(-1)
    counts = torch.bincount(pairs, minlength=e * e).view(e, e)
    return counts[:num_experts, :num_experts].clone()


def coactivation_affinity(counts: torch.Tensor) -> torch.Tensor:
    """Jaccard index of two experts' token sets: ``C_ij / (C_ii + C_jj - C_ij)``, 1 on the diagonal."""
    c = counts.double()
    d = c.diagonal()
    union = (d[:, None] + d[None, :] - c).clamp_min(1.0)
    out = c / union
    out.fill_diagonal_(1.0)
    return out.float()


def output_similarity_update(outputs: torch.Tensor, selected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums for output similarity from ``outputs [N, E, H]`` (every expert on the same tokens) and ``selected [N, E]``.

    Returns ``all`` (sum over tokens of the cosine matrix), ``routed`` (the same over tokens
    that route to either expert of a pair), ``routed_count`` and ``tokens``; add the sums of
    several batches, then divide (see :func:`output_similarity`).
    """
    n, e, _ = outputs.shape
    unit = F.normalize(outputs.float(), dim=-1)
    sel = selected.float()
    total = torch.zeros(e, e, dtype=torch.float64)
    routed = torch.zeros(e, e, dtype=torch.float64)
    count = torch.zeros(e, e, dtype=torch.float64)
    step = max(1, _BLOCK // max(1, e * e))
    for start in range(0, n, step):
        u, s = unit[start : start + step], sel[start : start + step]
        cos = torch.einsum("nih,njh->nij", u, u)
        union = s[:, :, None] + s[:, None, :] - s[:, :, None] * s[:, None, :]
        total += cos.sum(0).double().cpu()
        routed += (cos * union).sum(0).double().cpu()
        count += union.sum(0).double().cpu()
    return {"all": total, "routed": routed, "routed_count": count, "tokens": torch.tensor(n)}


def output_similarity(sums: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean cosine matrices from accumulated :func:`output_similarity_update` sums.

    ``routed`` falls back to ``all`` for pairs that no sampled token routes to.
    """
    tokens = max(int(sums["tokens"]), 1)
    all_ = (sums["all"] / tokens).float()
    count = sums["routed_count"]
    routed = torch.where(count > 0, sums["routed"] / count.clamp_min(1), sums["all"] / tokens).float()
    return {"all": all_, "routed": routed, "tokens": int(sums["tokens"])}


def weight_similarity(gate_up: torch.Tensor, down: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """``[E, E]`` cosine between experts' flattened weights (gate, up and down together).

    The Gram matrix is accumulated over column chunks in float32, so a layer of large
    bfloat16 experts never needs a full float32 copy.
    """
    e = gate_up.shape[0]
    gram = torch.zeros(e, e, dtype=torch.float64)
    for w in (gate_up.detach().reshape(e, -1), down.detach().reshape(e, -1)):
        for start in range(0, w.shape[1], chunk):
            part = w[:, start : start + chunk].float()
            gram += (part @ part.T).double().cpu()
    norm = gram.diagonal().clamp_min(1e-30).sqrt()
    return (gram / (norm[:, None] * norm[None, :])).float()


def analyze_model(model, stats: Mapping[str, Mapping]) -> dict[str, dict[int, torch.Tensor]]:
    """The three matrices for every MoE layer of ``model`` from calibration ``stats`` (those present).

    ``stats`` may hold ``coactivation`` and ``output_similarity`` (from the calibration
    service); weight similarity is read off the weights.
    """
    out: dict[str, dict[int, torch.Tensor]] = {}
    if "coactivation" in stats:
        out["coactivation"] = {layer: coactivation_affinity(c) for layer, c in stats["coactivation"].items()}
    if "output_similarity" in stats:
        out["output_similarity"] = {layer: s["routed"] for layer, s in stats["output_similarity"].items()}
    out["weight_similarity"] = {b.layer: weight_similarity(b.gate_up_proj, b.down_proj) for b in model.blocks()}
    return out


# -- plots ------------------------------------------------------------------------------
def plot_heatmaps(
    matrices: Mapping[int, torch.Tensor],
    title: str,
    path: str | Path,
    vmin: float | None = None,
    vmax: float | None = None,
    hide_diagonal: bool = True,
) -> Path:
    """One heatmap per layer in a grid, saved as a PNG (matplotlib, no display needed).

    The diagonal (an expert against itself) is left blank by default, so the colour
    scale spans the pairs that matter.
    """
    import matplotlib.pyplot as plt

    fig = heatmap_figure(matrices, title, vmin, vmax, hide_diagonal)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap_figure(matrices: Mapping[int, torch.Tensor], title: str, vmin=None, vmax=None, hide_diagonal: bool = True):
    """The figure :func:`plot_heatmaps` saves; axes are expert indices, ticked at whole numbers only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layers = sorted(matrices)
    cols = min(4, max(1, len(layers)))
    rows = math.ceil(len(layers) / cols) if layers else 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    image = None
    for ax, layer in zip(axes.flat, layers):
        m = matrices[layer].float().clone()
        if hide_diagonal:
            m.fill_diagonal_(float("nan"))
        image = ax.imshow(m.numpy(), cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.axis("on")
        ax.tick_params(labelsize=6)
        for axis in (ax.xaxis, ax.yaxis):  # experts are whole numbers: no 2.5 ticks
            axis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("expert", fontsize=7)
        ax.set_ylabel("expert", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle(title)
    return fig
