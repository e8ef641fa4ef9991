"""Grouping a layer's experts into a target number of groups, each to become one merged expert.

Ways matching the expert-fusion literature:

- :func:`spectral` over an affinity matrix, as moe-pruner does (scikit-learn's
  ``SpectralClustering`` on a precomputed affinity): co-activation counts (``act_cl``:
  experts chosen for the same tokens merge with the least routing disruption) or the
  experts' output cosine over all sampled tokens (``state_cl``: experts that compute alike
  merge with the least output change).
- :func:`cluster`, moebench's greedy variant over the same kinds of affinity: balanced
  (groups differ in size by at most one, seeded by the busiest experts) or free
  (average-linkage agglomeration, sizes as the affinities fall).
- :func:`by_frequency`: the most-used experts are kept as centres and every other
  expert joins the centre it is most similar to (top-k drop's choice, but nothing is
  thrown away).

A :class:`Groups` lists members per merged expert; ``assign`` maps each original expert
to its group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Groups:
    """``members[m]``: the original experts merged into expert ``m`` (every expert in exactly one group)."""

    members: list[list[int]]

    @property
    def num_groups(self) -> int:
        return len(self.members)

    @property
    def num_experts(self) -> int:
        return sum(len(m) for m in self.members)

    @property
    def assign(self) -> list[int]:
        out = [0] * self.num_experts
        for g, members in enumerate(self.members):
            for e in members:
                out[e] = g
        return out

    def check(self, num_experts: int) -> None:
        flat = sorted(e for m in self.members for e in m)
        if flat != list(range(num_experts)) or any(not m for m in self.members):
            raise ValueError(f"groups must partition experts 0..{num_experts - 1} into non-empty groups")


def cluster(affinity: torch.Tensor, n: int, priority: torch.Tensor | None = None, balanced: bool = True) -> Groups:
    """``n`` groups of experts with high mutual ``affinity [E, E]`` (symmetric, larger = closer).

    ``priority [E]`` (e.g. routing counts) orders seeds and breaks ties; defaults to the
    diagonal of ``affinity``.
    """
    e = affinity.shape[0]
    _check_n(n, e)
    a = ((affinity.double() + affinity.double().T) / 2).cpu()
    prio = (a.diagonal() if priority is None else priority.double().cpu()).clone()
    return _balanced(a, n, prio) if balanced else _agglomerative(a, n, prio)


def spectral(affinity: torch.Tensor, n: int, priority: torch.Tensor | None = None, seed: int = 0) -> Groups:
    """``n`` groups by spectral clustering of a non-negative ``affinity [E, E]`` (scikit-learn,
    ``affinity="precomputed"``, seeded); groups ordered by their busiest member."""
    e = affinity.shape[0]
    _check_n(n, e)
    prio = priority if priority is not None else affinity.diagonal()
    if n in (1, e):
        return _from_labels([0] * e if n == 1 else list(range(e)), prio)
    import warnings

    from sklearn.cluster import SpectralClustering

    a = ((affinity.double() + affinity.double().T) / 2).cpu().numpy()
    if (a < 0).any():
        raise ValueError("spectral clustering needs a non-negative affinity")
    with warnings.catch_warnings():  # a graph that is not fully connected is still clustered; sklearn warns
        warnings.simplefilter("ignore", UserWarning)
        labels = SpectralClustering(n_clusters=n, affinity="precomputed", random_state=seed).fit(a).labels_
    return _from_labels([int(x) for x in labels], prio)


def by_frequency(frequency: torch.Tensor, similarity: torch.Tensor, n: int) -> Groups:
    """The ``n`` most frequent experts are centres; each other expert joins its most similar centre."""
    e = frequency.numel()
    _check_n(n, e)
    order = _order(frequency.double().cpu())
    centres = order[:n]
    members = [[c] for c in centres]
    sim = similarity.double().cpu()
    for x in order[n:]:
        best = max(range(n), key=lambda g: (sim[x, centres[g]].item(), -g))
        members[best].append(x)
    return Groups([sorted(m, key=lambda i: order.index(i)) for m in members])


def hierarchical(features: torch.Tensor, n: int, linkage: str = "average", metric: str = "euclidean",
                 priority: torch.Tensor | None = None) -> Groups:
    """``n`` groups by agglomerative clustering of the rows of ``features [E, D]`` (scipy's ``linkage``,
    cut into exactly ``n`` clusters with ``cut_tree``); groups ordered by their busiest member."""
    import numpy as np
    from scipy.cluster.hierarchy import cut_tree
    from scipy.cluster.hierarchy import linkage as scipy_linkage

    e = features.shape[0]
    _check_n(n, e)
    if n == e:
        labels = list(range(e))
    else:
        tree = scipy_linkage(features.double().cpu().numpy(), method=linkage, metric=metric)
        labels = np.asarray(cut_tree(tree, n_clusters=n)).reshape(-1).tolist()
    return _from_labels(labels, priority if priority is not None else torch.zeros(e))


def _from_labels(labels: list[int], prio: torch.Tensor) -> Groups:
    """Groups from per-expert cluster labels, members and groups ordered by descending priority."""
    order = _order(prio.double().cpu())
    by_label: dict[int, list[int]] = {}
    for e in order:
        by_label.setdefault(int(labels[e]), []).append(e)
    return Groups(list(by_label.values()))


def _balanced(a: torch.Tensor, n: int, prio: torch.Tensor) -> Groups:
    """Greedy: the busiest unassigned expert seeds a group, which then takes the unassigned
    experts with the highest mean affinity to its members until it has its share."""
    e = a.shape[0]
    sizes = [e // n + (1 if g < e % n else 0) for g in range(n)]
    free = torch.ones(e, dtype=torch.bool)
    tie = -1e-9 * torch.as_tensor(_rank(prio), dtype=torch.float64)  # prefer busier experts on equal affinity
    members: list[list[int]] = []
    for size in sizes:
        seed = next(i for i in _order(prio) if free[i])
        group = [seed]
        free[seed] = False
        total = a[seed].clone()
        while len(group) < size:
            score = torch.where(free, total / len(group) + tie, torch.full_like(total, -torch.inf))
            pick = int(score.argmax())
            group.append(pick)
            free[pick] = False
            total += a[pick]
        members.append(group)
    return Groups(members)


def _agglomerative(a: torch.Tensor, n: int, prio: torch.Tensor) -> Groups:
    """Average linkage: repeatedly join the two clusters with the highest mean pairwise affinity."""
    e = a.shape[0]
    clusters = [[i] for i in range(e)]
    link = a.clone()
    link.fill_diagonal_(-torch.inf)
    alive = torch.ones(e, dtype=torch.bool)
    sizes = torch.ones(e, dtype=torch.float64)
    for _ in range(e - n):
        masked = link.masked_fill(~(alive[:, None] & alive[None, :]), -torch.inf)
        flat = int(masked.argmax())
        i, j = divmod(flat, e)
        i, j = min(i, j), max(i, j)
        merged = (sizes[i] * link[i] + sizes[j] * link[j]) / (sizes[i] + sizes[j])
        link[i], link[:, i] = merged, merged
        link[i, i] = -torch.inf
        sizes[i] += sizes[j]
        alive[j] = False
        clusters[i] += clusters[j]
        clusters[j] = []
    order = _order(prio)
    groups = [sorted(c, key=order.index) for c in clusters if c]
    groups.sort(key=lambda g: order.index(g[0]))
    return Groups(groups)


def _order(prio: torch.Tensor) -> list[int]:
    """Indices by descending priority, ties by index (deterministic)."""
    return sorted(range(prio.numel()), key=lambda i: (-prio[i].item(), i))


def _rank(prio: torch.Tensor) -> list[int]:
    rank = [0] * prio.numel()
    for r, i in enumerate(_order(prio)):
        rank[i] = r
    return rank


def _check_n(n: int, e: int) -> None:
    if not 1 <= n <= e:
        raise ValueError(f"cannot group {e} experts into {n} groups; expected 1 <= groups <= {e}")
