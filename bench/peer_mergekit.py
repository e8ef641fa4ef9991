"""Peer check: moebench's ``sce`` and ``slerp`` merge operators against mergekit's ``sce`` and ``multislerp``.

Loads the zoo DeepSeek-V2 model, counts routing on calibration tokens, groups each MoE
layer's routed experts the way the ``merge`` method does by default (frequency grouping on
output similarity, neurons aligned to the most-used member), and merges every group's
gate, up and down stacks with both libraries (mergekit through
:mod:`moebench_plugins.fusion.peers`). Prints, per operator pairing and layer, the
largest element difference and the largest relative Frobenius distance over the
layer's merged tensors (gate, up and down of every group of two or more experts), as a Markdown table. Needs the ``peer`` extra
(``pip install -e '.[peer]'``).

    python bench/peer_mergekit.py                      # keep 4 of 16, 32 x 128 calibration tokens
    python bench/peer_mergekit.py --keep 8 --select 0.3
"""

from __future__ import annotations

import argparse

import torch

from moebench.models import load
from moebench_plugins.fusion.operators import merge
from moebench_plugins.fusion.peers import (
    Agreement,
    merge_groups,
    mergekit_karcher,
    mergekit_karcher_method,
    mergekit_multislerp,
    mergekit_sce,
    mergekit_slerp,
)


def pairings(select: float):
    """(label, which groups: 'all' | 'pairs' | 'many', ours(stack, w), theirs(stack, w))."""
    def uniform(w):
        return torch.ones_like(w)

    return [
        ("sce (reference) vs mergekit sce", "all", lambda s, w: merge(s, w, "sce", select=select), lambda s, w: mergekit_sce(s, w, select)),
        ("sce (variant moebench) vs mergekit sce", "all", lambda s, w: merge(s, w, "sce", select=select, variant="moebench"), lambda s, w: mergekit_sce(s, w, select)),
        ("slerp vs mergekit karcher (same weights)", "all", lambda s, w: merge(s, w, "slerp"), mergekit_karcher),
        ("slerp, equal weights vs mergekit's karcher method", "all", lambda s, w: merge(s, uniform(w), "slerp"), lambda s, w: mergekit_karcher_method(s)),
        ("slerp vs mergekit multislerp", "all", lambda s, w: merge(s, w, "slerp"), mergekit_multislerp),
        ("slerp, 0 iterations (3+ members) vs multislerp", "many", lambda s, w: merge(s, w, "slerp", iterations=0), mergekit_multislerp),
        ("slerp (2 members) vs mergekit slerp", "pairs", lambda s, w: merge(s, w, "slerp"), mergekit_slerp),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:deepseek_v2")
    ap.add_argument("--threads", type=int, default=2, help="[hardware] threads (the zoo cache key)")
    ap.add_argument("--keep", type=int, default=4, help="merged experts per layer")
    ap.add_argument("--select", type=float, default=0.2, help="SCE select fraction (moebench's default)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    args = ap.parse_args()

    torch.set_num_threads(1)
    model = load(args.model, threads=args.threads)
    layers = merge_groups(model, args.keep, args.samples, args.seqlen)
    sizes = {layer: sorted(len(w) for w, _ in groups) for layer, groups in layers.items()}
    print(f"model {args.model}, keep {args.keep}, SCE select {args.select}; group sizes per layer: {sizes}")
    print()
    print("| pairing | layer | groups | tensors | max abs diff | rel Frobenius diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, which, ours, theirs in pairings(args.select):
        for layer, groups in layers.items():
            picked = [(w, s) for w, s in groups if which == "all" or (which == "pairs") == (len(w) == 2)]
            found = [Agreement.of(ours(stack, w), theirs(stack, w)) for w, stacks in picked for stack in stacks.values()]
            if found:
                worst = Agreement.worst(found)
                print(f"| {label} | {layer} | {len(picked)} | {len(found)} | {worst.max_abs:.2e} | {worst.rel_fro:.2e} |")


if __name__ == "__main__":
    main()
