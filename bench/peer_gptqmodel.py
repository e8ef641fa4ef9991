"""Peer check: moebench's GPTQ against GPTQModel's on one zoo expert's real weights and calibration inputs.

Loads the zoo DeepSeek-V2 model, feeds the calibration tokens through it, and quantizes
one routed expert's gate, up and down projections with both libraries on the same inputs
(every token entering the MoE block; :mod:`moebench_plugins.quantization.peers`), for
several settings. Prints, per projection and setting, the share of codes that differ and
the relative Frobenius distance of the dequantized weights, for moebench's earlier group
rule (``group_weights = "updated"``), its default (the reference's ``"block_start"``, with
float16 scales while choosing codes) and the default with float32 scales
(``half_scales = False``, as GPTQModel). Needs GPTQModel (extra ``peer-gptq``, in its own environment:
it pins numpy 2.2.6).

    python bench/peer_gptqmodel.py                  # layer 1, expert 0, 16 x 64 tokens
"""

from __future__ import annotations

import argparse

import torch

from moebench.calibration import Calibration, CalibrationSpec
from moebench.models import load
from moebench_plugins.quantization.peers import expert_inputs, gptqmodel_gptq
from moebench_plugins.quantization.quant import gptq

#: (bits, group_size, symmetric, act_order)
SETTINGS = [(4, 32, False, False), (4, 32, True, False), (4, 32, False, True), (4, -1, True, False), (4, 128, False, False), (3, 32, False, False)]


def compare(ours, theirs) -> tuple[float, float]:
    """(share of differing codes, relative Frobenius distance of the dequantized weights)."""
    a, b = ours.dequantize(), theirs.dequantize()
    return (ours.codes != theirs.codes).float().mean().item(), ((a - b).norm() / b.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:deepseek_v2")
    ap.add_argument("--threads", type=int, default=2, help="[hardware] threads (the zoo cache key)")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--expert", type=int, default=0)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--damp", type=float, default=0.01)
    args = ap.parse_args()

    torch.set_num_threads(1)
    model = load(args.model, threads=args.threads)
    windows = Calibration(CalibrationSpec(samples=args.samples, seqlen=args.seqlen), cache=False).windows(model.tokenizer)
    projections = expert_inputs(model, args.layer, args.expert, windows)
    print(f"model {args.model}, layer {args.layer}, expert {args.expert}, {windows.numel()} calibration tokens, damp {args.damp}")
    print()
    print("| projection | bits | group | sym | act_order | earlier rule (updated, float16): codes differ / rel Frobenius "
          "| default (block_start, float16) | block_start, float32 scales |")
    print("|---|---:|---:|---|---|---|---|---|")
    for name, (w, x) in projections.items():
        h = x.T.double() @ x.double()
        for bits, group, sym, act in SETTINGS:
            kw = dict(bits=bits, group_size=group, act_order=act, damp=args.damp, symmetric=sym)
            theirs = gptqmodel_gptq(w, x, **kw)
            cells = [compare(gptq(w, h.float(), group_weights="updated", **kw), theirs), compare(gptq(w, h.float(), **kw), theirs),
                     compare(gptq(w, h.float(), half_scales=False, **kw), theirs)]
            print(f"| {name} {tuple(w.shape)} | {bits} | {group} | {sym} | {act} | " + " | ".join(f"{a:.2%} / {b:.2e}" for a, b in cells) + " |")


if __name__ == "__main__":
    main()
