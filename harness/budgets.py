"""Expert budgets every family shares: ``keep`` / ``keep_ratio`` and spending one budget across layers.

Methods that leave a number of routed experts per MoE layer (expert drop, merging, PreMoe)
take the same pair of parameters: ``keep`` (experts per layer) or ``keep_ratio`` (a
fraction of each layer's experts). :func:`check_keep` is their range check (call it
from a parameter dataclass's ``check``), :func:`kept_count` turns them into a count for
one layer, and :func:`global_budgets` spreads one total over layers by score (the
``scope = "global"`` variants).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .adapter import MoEBlock


def check_keep(keep: int | None, keep_ratio: float | None, missing: str = "keep_ratio or keep must be set") -> None:
    """ValueError (naming the field) unless exactly a usable ``keep`` or ``keep_ratio`` is given."""
    if keep is None and keep_ratio is None:
        raise ValueError(missing)
    if keep_ratio is not None and not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")


def kept_count(num_experts: int, keep: int | None, keep_ratio: float | None) -> int:
    """Experts a layer of ``num_experts`` keeps: ``keep`` if set, else ``round(keep_ratio * E)``; at least 1, at most E."""
    n = keep if keep is not None else round(keep_ratio * num_experts)
    return max(1, min(num_experts, n))


def global_budgets(blocks: list["MoEBlock"], scores: dict[int, torch.Tensor], total: int, floor: dict[int, int] | None = None) -> dict[int, int]:
    """Spend one expert budget across layers by normalised score; each layer keeps at least its floor (default top-k)."""
    budgets = dict(floor) if floor is not None else {b.layer: min(b.top_k, b.num_experts) for b in blocks}
    ranked = sorted(
        ((s.item(), b.layer, rank) for b in blocks for rank, s in enumerate(torch.sort(scores[b.layer], descending=True).values)),
        reverse=True,
    )
    left = total - sum(budgets.values())
    for _, layer, rank in ranked:
        if left <= 0:
            break
        if rank >= budgets[layer]:  # the layer's (rank+1)-th best expert; ranks arrive in order per layer
            budgets[layer] += 1
            left -= 1
    return budgets
