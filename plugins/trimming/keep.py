"""The step every expert-drop method of this family ends with: keep the chosen experts, cap top-k, record it.

``expert_drop``, ``naee`` and ``reap`` differ in how they choose each layer's experts;
once chosen, the edit and the record are the same (:func:`keep_chosen`).
"""

from __future__ import annotations

from typing import Any

from moebench.adapter import MoEBlock, MoEModel
from moebench.method import Context


def keep_chosen(model: MoEModel, blocks: list[MoEBlock], keeps: dict[int, list[int]], top_k: int | None, ctx: Context,
                details: dict[str, Any] | None = None, after: dict[str, Any] | None = None, zero: bool = False) -> dict[str, Any]:
    """Keep experts ``keeps[layer]`` of each block (router rows sliced to match; notes go to ``ctx``) and,
    with ``top_k``, cap each layer's top-k at it; with ``zero``, zero the others in place instead (router
    width and top-k unchanged). Returns the changes: ``kept``, ``dropped``, the method's
    ``details``, ``experts_before``, ``experts_after``, ``top_k``, then ``after``."""
    before = {b.layer: b.num_experts for b in blocks}
    for b in blocks:
        if zero:
            model.zero_experts(b.layer, sorted(set(range(b.num_experts)) - set(keeps[b.layer])))
            continue
        for note in model.keep_experts(b.layer, keeps[b.layer]):
            ctx.note(f"layer {b.layer}: {note}")
        if top_k is not None:
            model.set_top_k(b.layer, min(top_k, len(keeps[b.layer])))
    return {
        "kept": {b.layer: keeps[b.layer] for b in blocks},
        "dropped": {b.layer: sorted(set(range(before[b.layer])) - set(keeps[b.layer])) for b in blocks},
        **(details or {}),
        "experts_before": sum(before.values()),
        "experts_after": sum(len(keeps[b.layer]) for b in blocks),
        "top_k": {b.layer: model.block(b.layer).top_k for b in blocks},
        **(after or {}),
    }
