"""Why perplexity cannot order 4-bit methods on the default zoo model: the first-order term.

A quantizer changes the weights by ``dW``. To second order the held-out loss (mean
next-token NLL, the log of perplexity) changes by ``g . dW + (second-order term)``, where
``g`` is the gradient of that loss at the unquantized weights. A model trained to a
minimum of the held-out loss has ``g ~ 0``, so every perturbation raises perplexity and the
method with the smaller error (GPTQ, AWQ) wins; a model that is still far from one (the
zoo's 500-step build, whose loss is still falling fast) has a sizeable ``g``, and ``g . dW``
has either sign. This script measures, on the default ``zoo:deepseek_v2`` with the
orderings bench's settings (routed experts, each method's 4-bit defaults, calibration 32 x
128 tokens of the domain's train split; 40 x 128 test windows), per method:

- ``dNLL``: the actual change of the held-out loss (nats per token; ``exp`` of it is the
  perplexity ratio);
- ``g.dW``: its first-order part, from one backward pass at the unquantized weights;
- ``rest = dNLL - g.dW``: the second-order part, what the method's error costs;
- ``KL``: the mean per-token KL divergence from the unquantized model's predictions.

If ``rest`` and ``KL`` order the methods as the papers do while ``dNLL`` does not, the
perplexity ordering is decided by the first-order term, not by how well a method quantizes.
AWQ is printed with ``dNLL`` and ``KL`` only: it folds each expert's down scale into its up
rows, a reparametrisation whose weight change (larger than the weights themselves on some
rows) cancels only at second order, so ``g . dW`` is no first-order term for it.
``bench/zoo_orderings.py`` checks ``rest`` for 3 seeds; docs/benchmarks.md (issue #13)
quotes this script's output.

    python bench/zoo_quant_first_order.py [--model zoo:deepseek_v2] [--domains prose code] [--bits 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import math

import moebench  # noqa: F401  (OpenMP defaults before torch)
import torch
from zoo_orderings import compressed, first_order, kl_from, log_probs, loss_gradient

from moebench.calibration import Calibration, CalibrationSpec
from moebench.data import encode, load_text, windows
from moebench.method import Context
from moebench.models import load
from moebench_plugins.metrics import perplexity

METHODS = ("rtn", "gptq", "awq")
IN_PLACE = ("rtn", "gptq")  # quantizers whose weight change is their rounding alone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:deepseek_v2")
    ap.add_argument("--domains", nargs="+", default=["prose", "code"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load(args.model, threads=args.threads)
    print(f"model {args.model}; routed experts, {args.bits}-bit, each method's defaults; calibration seed {args.seed}")
    print("| domain | method | dNLL (ppl ratio) | g.dW | rest = dNLL - g.dW | KL |")
    print("|---|---|---|---|---|---|", flush=True)
    for domain in args.domains:
        data = f"embedded:{domain}"
        ids = windows(encode(base.tokenizer, load_text(data, "test")), 128, 40)
        baseline, reference, grads = perplexity(base.model, ids), log_probs(base.model, ids), loss_gradient(base.model, ids)
        calibration = Calibration(CalibrationSpec(data, 32, 128, seed=args.seed), cache=False)
        for method in METHODS:
            moe = compressed(base, method, {"bits": args.bits}, Context(seed=args.seed, calibration=calibration, teacher=base))
            d = math.log(perplexity(moe.model, ids) / baseline)
            if method in IN_PLACE:
                first = first_order(grads, base.model, moe.model)
                terms = f"{first:+.5f} | {d - first:+.5f}"
            else:
                terms = "n/a (scale folding) | n/a"
            print(f"| {domain} | {method} | {d:+.5f} ({math.exp(d):.4f}) | {terms} | {kl_from(reference, moe.model, ids):.5f} |", flush=True)
            del moe


if __name__ == "__main__":
    main()
