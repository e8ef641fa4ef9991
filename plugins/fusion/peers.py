"""moebench's merge operators beside the library they follow: mergekit (optional extra ``peer``).

mergekit (arcee-ai/mergekit, https://github.com/arcee-ai/mergekit) is the library
moe-pruner calls for SCE (FuseChat, Wan et al., arXiv 2408.07990), and its
``multislerp`` is the multi-model SLERP (Goddard,
https://goddard.blog/posts/multislerp-wow-what-a-cool-idea). These functions put a
group's member stack through mergekit's own tensor-level entry point
(``mergekit.merge_methods.merge_tensors``) with moebench's semantics mapped onto its
call, so a test or bench script (``tests/test_peer_mergekit.py``,
``bench/peer_mergekit.py``) can compare the two on the same expert weights. Nothing in a
run uses this module; mergekit is imported only when one of these is called.

The mapping:

- ``sce``: moebench's pivot (the member with the largest routing weight) is mergekit's
  base model (``base_index``); the other members are its inputs; ``select`` is
  ``select_topk``. mergekit's SCE takes no per-model weights (its coefficients are the
  task vectors' mean squares), and neither does moebench's reference variant.
- ``slerp`` (moebench's weighted spherical mean, at the members' weighted mean norm) has
  three mergekit counterparts: ``karcher`` (the same Karcher iteration; mergekit's
  function with per-member weights), ``multislerp`` (the members with no base, so the
  sphere is centred on the origin as moebench's is; ``weight`` = the routing weights) and,
  for two members, ``slerp`` (base = member 0, ``t`` = member 1's share).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moebench.errors import MoebenchError

def merge_groups(model, keep: int, samples: int, seqlen: int) -> dict[int, list[tuple[torch.Tensor, dict[str, torch.Tensor]]]]:
    """``{layer: [(weights, {"gate", "up", "down": stack}), ...]}``: every group of two or more experts that the
    ``merge`` method's defaults form on ``samples`` x ``seqlen`` calibration tokens, with its stacks as the operator
    sees them (what the bench and the peer test compare)."""
    from moebench.calibration import Calibration, CalibrationSpec

    from .merge import MergeParams, group_layer, member_stacks, stats_needed

    params = MergeParams(keep=keep)
    params.check()
    stats = Calibration(CalibrationSpec(samples=samples, seqlen=seqlen), cache=False).stats(model, list(stats_needed(params)))
    out = {}
    for block in model.blocks():
        groups = group_layer(block, keep, params, stats)
        freq = stats["routing_counts"][block.layer].double()
        out[block.layer] = [(w, s) for w, s in member_stacks(block, groups, freq, params.align) if len(w) > 1]
    return out


#: the mergekit release the ``peer`` extra pins (pyproject.toml)
MERGEKIT_VERSION = "0.1.5"


def _merge_tensors():
    try:
        from mergekit.merge_methods import merge_tensors
    except ImportError:
        raise MoebenchError(
            "mergekit is not installed: the peer checks need the optional extra (pip install -e '.[peer]')"
        ) from None
    return merge_tensors


def mergekit_sce(stack: torch.Tensor, weights: torch.Tensor, select: float = 0.2) -> torch.Tensor:
    """mergekit's SCE of ``stack [n, *shape]`` with the pivot moebench picks (largest weight) as base."""
    pivot = int(torch.as_tensor(weights).argmax())
    return _merge_tensors()(list(stack), "sce", parameters={"select_topk": float(select)}, base_index=pivot)


def _normalised(weights: torch.Tensor) -> list[float]:
    w = torch.as_tensor(weights, dtype=torch.float64)
    return (w / w.sum()).tolist()


def mergekit_multislerp(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mergekit's ``multislerp`` of ``stack [n, *shape]`` with the members' weights (no base model)."""
    return _merge_tensors()(list(stack), "multislerp", parameters={"weight": _normalised(weights)})


def mergekit_karcher(stack: torch.Tensor, weights: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """mergekit's weighted Karcher mean (``karcher_merge_tensors``, the function behind its ``karcher`` method).

    mergekit's registered ``karcher`` method gives every input the same weight; its
    module-level function takes per-input weights, which moebench's frequencies need.
    ``tol`` is set below float32 resolution so that both run the same ``iterations``.
    """
    _merge_tensors()  # the same clear error when mergekit is missing
    from mergekit.merge_methods.karcher import karcher_merge_tensors

    return karcher_merge_tensors(list(stack), _normalised(weights), max_iter=iterations, tol=1e-12)


def mergekit_karcher_method(stack: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """mergekit's registered ``karcher`` merge method (every member weighted the same)."""
    return _merge_tensors()(list(stack), "karcher", parameters={"max_iter": iterations, "tol": 1e-12})


def mergekit_slerp(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mergekit's two-model ``slerp`` of ``stack [2, *shape]``: base = member 0, ``t`` = member 1's share."""
    if stack.shape[0] != 2:
        raise ValueError(f"mergekit's slerp merges two tensors, got {stack.shape[0]}")
    return _merge_tensors()(list(stack), "slerp", parameters={"t": _normalised(weights)[1]}, base_index=0)


@dataclass(frozen=True)
class Agreement:
    """How far moebench's result is from the peer's: largest element difference and relative Frobenius distance."""

    max_abs: float
    rel_fro: float

    @staticmethod
    def of(ours: torch.Tensor, theirs: torch.Tensor) -> "Agreement":
        a, b = ours.double(), theirs.double()
        diff = a - b
        return Agreement(diff.abs().max().item(), (diff.norm() / b.norm().clamp_min(1e-30)).item())

    @staticmethod
    def worst(items: list["Agreement"]) -> "Agreement":
        return Agreement(max((x.max_abs for x in items), default=0.0), max((x.rel_fro for x in items), default=0.0))
