"""4-bit RTN, GPTQ and AWQ with every linear layer quantized, on perplexity and on KL from the baseline.

The zoo-orderings bench checks GPTQ/AWQ against RTN on the routed experts by KL, because
4-bit rounding of the experts moves perplexity by less than its first-order noise. This
script asks whether quantizing every linear layer (routed and shared experts, attention,
the dense MLP) moves perplexity enough to order the methods by it. Same settings as
``bench/zoo_orderings.py`` (calibration 32 x 128 tokens of the domain's train split per
seed; perplexity and KL on 40 x 128 test windows). docs/benchmarks.md ("Recipe 3") quotes it.

    python bench/zoo_quant_all_linear.py [--domains prose code] [--seeds 0 1 2] [--group-sizes 128 32]
"""

from __future__ import annotations

import argparse

import moebench  # noqa: F401  (OpenMP defaults before torch)
import torch
from zoo_orderings import compressed, kl_from, log_probs

from moebench.calibration import Calibration, CalibrationSpec
from moebench.data import encode, load_text, windows
from moebench.method import Context
from moebench.models import load
from moebench_plugins.metrics import perplexity

TARGETS = ["experts", "shared", "attention", "dense"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:deepseek_v2")
    ap.add_argument("--domains", nargs="+", default=["prose", "code"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[128, 32])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load(args.model, threads=args.threads)
    print("| domain | seed | group | method | perplexity | KL from baseline |")
    print("|---|---:|---:|---|---:|---:|")
    for domain in args.domains:
        data = f"embedded:{domain}"
        ids = windows(encode(base.tokenizer, load_text(data, "test")), 128, 40)
        reference = log_probs(base.model, ids)
        print(f"| {domain} | | | baseline | {perplexity(base.model, ids):.3f} | 0 |", flush=True)
        for seed in args.seeds:
            calibration = Calibration(CalibrationSpec(data, 32, 128, seed=seed), cache=False)
            for group in args.group_sizes:
                for method in ("rtn", "gptq", "awq"):
                    moe = compressed(base, method, {"bits": 4, "group_size": group, "targets": TARGETS},
                                     Context(seed=seed, calibration=calibration, teacher=base))
                    print(f"| {domain} | {seed} | {group} | {method} | {perplexity(moe.model, ids):.3f} | "
                          f"{kl_from(reference, moe.model, ids):.5f} |", flush=True)


if __name__ == "__main__":
    main()
