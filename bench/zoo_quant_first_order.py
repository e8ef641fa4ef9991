"""Why perplexity cannot order 4-bit methods on the default zoo model: the first-order term.

A quantizer changes the weights by ``dW``. To second order the held-out loss (mean
next-token NLL, the log of perplexity) changes by ``g . dW + (second-order term)``, where
``g`` is the gradient of that loss at the unquantized weights. A model trained to a
minimum of the held-out loss has ``g ~ 0``, so every perturbation raises perplexity and the
method with the smaller error (GPTQ, AWQ) wins; a model that is still far from one (the
zoo's 500-step build, whose loss is still falling fast) has a sizeable ``g``, and ``g . dW``
has either sign. This script measures, on the default ``zoo:deepseek_v2`` with the
orderings bench's settings (routed experts, each method's 4-bit defaults, calibration 32 x
128 tokens of the domain's train split, seed 0; 40 x 128 test windows), per method:

- ``dNLL``: the actual change of the held-out loss (nats per token; ``exp`` of it is the
  perplexity ratio);
- ``g.dW``: its first-order part, from one backward pass at the unquantized weights;
- ``rest = dNLL - g.dW``: the second-order part, what the method's error costs;
- ``KL``: the mean per-token KL divergence from the unquantized model's predictions.

If ``rest`` and ``KL`` order the methods as the papers do while ``dNLL`` does not, the
perplexity ordering is decided by the first-order term, not by how well a method quantizes.
docs/benchmarks.md (issue #13) quotes its output.

    python bench/zoo_quant_first_order.py [--model zoo:deepseek_v2] [--domains prose code] [--bits 4]
"""

from __future__ import annotations

import argparse
import copy
import math

import moebench  # noqa: F401  (OpenMP defaults before torch)
import torch
import torch.nn.functional as F

from moebench.adapter import MoEModel
from moebench.calibration import Calibration, CalibrationSpec
from moebench.data import encode, load_text, windows
from moebench.method import Context
from moebench.params import parse
from moebench.plugins import host

METHODS = ("rtn", "gptq", "awq")


def mean_nll(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token NLL over the windows (differentiable when grad is enabled)."""
    total = 0.0
    for batch in ids.split(batch_size):
        logits = model(input_ids=batch).logits[:, :-1].float()
        total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
    return total / (ids.shape[0] * (ids.shape[1] - 1))


@torch.no_grad()
def kl(reference: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 8) -> float:
    total, count = 0.0, 0
    for batch in ids.split(batch_size):
        ref = torch.log_softmax(reference(input_ids=batch).logits.float(), -1)
        logp = torch.log_softmax(model(input_ids=batch).logits.float(), -1)
        total += torch.sum(ref.exp() * (ref - logp)).item()
        count += ref.shape[0] * ref.shape[1]
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:deepseek_v2")
    ap.add_argument("--domains", nargs="+", default=["prose", "code"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from moebench.models import load

    torch.set_num_threads(args.threads)
    base = load(args.model, threads=args.threads)
    print(f"model {args.model}; routed experts, {args.bits}-bit, each method's defaults; calibration seed {args.seed}")
    print("| domain | method | dNLL (ppl ratio) | g.dW | rest = dNLL - g.dW | KL |")
    print("|---|---|---|---|---|---|", flush=True)
    for domain in args.domains:
        data = f"embedded:{domain}"
        ids = windows(encode(base.tokenizer, load_text(data, "test")), 128, 40)
        params = dict(base.model.named_parameters())
        base.model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            nll0 = mean_nll(base.model, ids)
            nll0.backward()
        grads = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
        base.model.zero_grad(set_to_none=True)
        calibration = Calibration(CalibrationSpec(data, 32, 128, seed=args.seed), cache=False)
        for method in METHODS:
            moe = MoEModel(copy.deepcopy(base.model), base.adapter, tokenizer=base.tokenizer, source=base.source, identity=base.identity)
            cls = host().method(method)
            cls().apply(moe, parse(cls.Params, {"bits": args.bits}), Context(seed=args.seed, calibration=calibration, teacher=base))
            after = dict(moe.model.named_parameters())
            missing = [n for n in grads if n not in after or after[n].shape != params[n].shape]
            if missing:
                raise SystemExit(f"{method}: parameters renamed or reshaped ({missing[:3]}); expected fake-quantized weights in place")
            first = sum(torch.sum(g * (after[n].detach() - params[n].detach())).item() for n, g in grads.items())
            with torch.no_grad():
                d = (mean_nll(moe.model, ids) - nll0).item()
            print(f"| {domain} | {method} | {d:+.5f} ({math.exp(d):.4f}) | {first:+.5f} | {d - first:+.5f} | "
                  f"{kl(base.model, moe.model, ids):.5f} |", flush=True)
            del moe


if __name__ == "__main__":
    main()
