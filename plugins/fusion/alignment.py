"""Neuron alignment before merging: permute each member's intermediate neurons to match a pivot.

An expert's intermediate neurons can be reordered without changing what it computes
(permute the rows of gate and up and the columns of down together), so two experts that
learned the same features in a different order average into noise unless they are
aligned first. As in the expert-merging literature (MC-SMoE, Li et al., ICLR 2024; the
weight-matching of Git Re-Basin, Ainsworth et al., ICLR 2023), each member is matched to
the group's pivot by the assignment that maximises the summed similarity of paired
neurons, solved exactly with scipy's ``linear_sum_assignment``.
"""

from __future__ import annotations

import torch


def neuron_features(gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One row per intermediate neuron: its gate row, up row and down column (``[I, 3H]``)."""
    inter = down.shape[-1]
    return torch.cat([gate_up[:inter], gate_up[inter:], down.T], dim=1).double()


def match(pivot: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """The permutation ``perm`` with ``other``'s neuron ``perm[i]`` paired to the pivot's neuron ``i``.

    ``pivot`` and ``other`` are :func:`neuron_features` rows; the pairing maximises the sum
    of their dot products (an exact linear assignment).
    """
    from scipy.optimize import linear_sum_assignment

    score = (pivot @ other.T).cpu().numpy()
    rows, cols = linear_sum_assignment(score, maximize=True)
    return torch.as_tensor(cols[rows.argsort()], dtype=torch.long)


def permute(gate_up: torch.Tensor, down: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same expert with its intermediate neurons reordered by ``perm`` (its function is unchanged)."""
    inter = down.shape[-1]
    perm = perm.to(gate_up.device)
    return torch.cat([gate_up[:inter][perm], gate_up[inter:][perm]]), down[:, perm]


def align(gate_up: torch.Tensor, down: torch.Tensor, pivot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Members ``gate_up [n, 2I, H]``, ``down [n, H, I]`` with every member aligned to member ``pivot``."""
    ref = neuron_features(gate_up[pivot], down[pivot])
    gu, dn = gate_up.clone(), down.clone()
    for m in range(gate_up.shape[0]):
        if m != pivot:
            gu[m], dn[m] = permute(gate_up[m], down[m], match(ref, neuron_features(gate_up[m], down[m])))
    return gu, dn
