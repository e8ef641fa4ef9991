"""Does the default zoo model order the compression methods as the literature does?

On the default ``zoo:deepseek_v2`` build, with the quickstart's evaluation settings
(perplexity over the first 40 non-overlapping 128-token windows of a test split;
calibration 32 x 128 tokens of the same domain's train split), for each calibration seed
and each embedded domain (prose, code), checks:

- baseline < expert drop keep 0.75 < keep 0.5 < keep 0.25 (frequency), each step >= 1% apart;
- frequency expert drop beats random expert drop (keep 0.5; the mean of three random draws);
- WANDA beats magnitude pruning at 50% unstructured (routed experts);
- SparseGPT at least ties WANDA (within 0.1%) at 50%;
- GPTQ and AWQ beat round-to-nearest at 4 bits (routed experts, each method's defaults) on
  the KL divergence of their next-token distributions from the baseline's. Deviation from
  the issue's wording ("at 4 bits on perplexity"): 4-bit rounding moves this model's
  perplexity by ~0.1-0.3%, where the first-order effect of a perturbation on held-out text
  is as likely to lower perplexity as to raise it (RTN often scores *below* the baseline),
  so perplexity cannot order 4-bit methods on a model this small (measured; also at 3 bits
  on the code domain); the KL from the baseline has no first-order term and is what GPTQ
  and AWQ minimise layer by layer. Printed beside it, not checked: the perplexities, and
  GPTQ's and RTN's change of held-out loss net of its first-order term ``g . dW`` (``g`` the
  loss's gradient at the unquantized weights, ``dW`` what the method changed), the
  second-order cost of its error (``bench/zoo_quant_first_order.py``; not AWQ, whose scale
  folding changes the weights far more than its rounding does);
- a fusion merge to 4 of 16 experts per layer, healed (distillation from the original
  model), beats plain top-k expert drop to 4 of 16.

Each method starts from a fresh copy of the loaded model. Prints one line per target,
seed and domain with its figures and ``ok`` / ``FAIL``, then a summary; exits 1 if any
target fails. ``tests/test_zoo_orderings.py`` (slow) runs the same checks.

    python bench/zoo_orderings.py [--model zoo:deepseek_v2] [--seeds 0 1 2] [--domains prose code]
        [--samples 32] [--seqlen 128] [--windows 40] [--heal-steps 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import moebench  # noqa: F401  (OpenMP defaults before torch)
import torch

from moebench.adapter import MoEModel
from moebench.calibration import Calibration, CalibrationSpec
from moebench.data import encode, load_text, windows
from moebench.method import Context
from moebench.models import restore
from moebench.params import parse
from moebench.plugins import host
from moebench_plugins.metrics import perplexity

#: runs whose KL divergence from the baseline is measured too (``"kl " + label``)
KL_RUNS = ("rtn 4-bit", "gptq 4-bit", "awq 4-bit")
#: runs whose first-order term ``g . dW`` is measured too (``"first " + label``): quantizers that only round
#: weights in place. AWQ is not one: it folds each expert's down scale into its up rows, a reparametrisation whose
#: large weight change cancels only at second order, so its ``g . dW`` is not a first-order change of the loss.
FIRST_ORDER_RUNS = ("rtn 4-bit", "gptq 4-bit")
#: label -> (method, params); ``{seedK}`` in a value is replaced by the calibration seed + 100 K
RUNS: dict[str, tuple[str, dict]] = {
    "drop 0.75": ("expert_drop", {"keep_ratio": 0.75, "criterion": "frequency"}),
    "drop 0.5": ("expert_drop", {"keep_ratio": 0.5, "criterion": "frequency"}),
    "drop 0.25": ("expert_drop", {"keep_ratio": 0.25, "criterion": "frequency"}),
    **{f"random drop 0.5 #{k}": ("expert_drop", {"keep_ratio": 0.5, "criterion": "random", "seed": f"{{seed{k}}}"}) for k in range(3)},
    "magnitude 50%": ("magnitude", {"sparsity": 0.5}),
    "wanda 50%": ("wanda", {"sparsity": 0.5}),
    "sparsegpt 50%": ("sparsegpt", {"sparsity": 0.5}),
    "rtn 4-bit": ("rtn", {"bits": 4}),
    "gptq 4-bit": ("gptq", {"bits": 4}),
    "awq 4-bit": ("awq", {"bits": 4}),
    "top-k drop 4/16": ("expert_drop", {"keep": 4, "criterion": "frequency"}),
    "merge 4/16 + heal": ("merge", {"keep": 4, "heal": {"steps": "{heal_steps}", "train": "experts"}}),
}
TIE = 0.001  # "at least ties": within 0.1%
STEP = 0.01  # expert-drop steps at least 1% apart


@dataclass
class Check:
    target: str
    ok: bool
    figures: str


@dataclass
class Outcome:
    """Perplexities per (domain, seed, label) and the checks made on them."""

    ppl: dict[tuple[str, int, str], float] = field(default_factory=dict)
    checks: list[tuple[str, int, Check]] = field(default_factory=list)

    @property
    def failed(self) -> list[tuple[str, int, Check]]:
        return [c for c in self.checks if not c[2].ok]


def _fill(value, **subs):
    if isinstance(value, dict):
        return {k: _fill(v, **subs) for k, v in value.items()}
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return subs[value[1:-1]]
    return value


def compressed(base: MoEModel, method: str, table: dict, ctx: Context) -> MoEModel:
    """A fresh copy of ``base`` with ``method`` (params from ``table``) applied; ``base`` is untouched."""
    moe = restore(base, "cpu")
    cls = host().method(method)
    cls().apply(moe, parse(cls.Params, table), ctx)
    return moe


@torch.no_grad()
def log_probs(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """Next-token log-probabilities of ``model`` on the windows ``ids``, one tensor per batch."""
    return [torch.log_softmax(model(input_ids=b).logits.float(), -1) for b in ids.split(batch_size)]


@torch.no_grad()
def kl_from(reference: list[torch.Tensor], model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean per-token KL(reference || model) over the windows: how far compression moved the predictions."""
    total, count = 0.0, 0
    for ref, batch in zip(reference, ids.split(batch_size)):
        logp = torch.log_softmax(model(input_ids=batch).logits.float(), -1)
        total += torch.sum(ref.exp() * (ref - logp)).item()
        count += ref.shape[0] * ref.shape[1]
    return total / count


def loss_gradient(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Gradient of the mean next-token NLL over the windows (what ``perplexity`` logs) per parameter name."""
    model.zero_grad(set_to_none=True)
    count = ids.shape[0] * (ids.shape[1] - 1)
    with torch.enable_grad():
        for batch in ids.split(batch_size):
            logits = model(input_ids=batch).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            (loss / count).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@torch.no_grad()
def first_order(grads: dict[str, torch.Tensor], base: torch.nn.Module, model: torch.nn.Module) -> float:
    """``g . dW``: the first-order change of the held-out loss from ``base``'s weights to ``model``'s (same names).

    Meaningful for a small in-place change (rounding, pruning); not across a reparametrisation
    such as AWQ's scale folding, whose weight change is large and cancels only at second order.
    """
    before, after = dict(base.named_parameters()), dict(model.named_parameters())
    missing = [n for n in grads if n not in after or after[n].shape != before[n].shape]
    if missing:
        raise ValueError(f"parameters renamed or reshaped ({', '.join(missing[:3])}); expected fake-quantized weights in place")
    return sum(torch.sum(g * (after[n] - before[n])).item() for n, g in grads.items())


def net_of_first_order(p: dict[str, float], label: str) -> float:
    """The change of held-out loss (nats per token) a run caused, less its first-order term."""
    return math.log(p[label] / p["baseline"]) - p["first " + label]


def net_lines(p: dict[str, float]) -> list[str]:
    """GPTQ against RTN on perplexity net of the first-order term: printed, not checked.

    Measured on recipe 3 (docs/benchmarks.md): GPTQ costs less than RTN net of ``g . dW`` for
    every seed and domain, evidence about the first-order term, not a target the zoo meets.
    """
    rtn = net_of_first_order(p, "rtn 4-bit")
    return [f"{m} vs rtn at 4 bits, perplexity net of the first-order term: {net_of_first_order(p, f'{m} 4-bit'):+.5f} vs "
            f"{rtn:+.5f} nats ({'lower' if net_of_first_order(p, f'{m} 4-bit') < rtn else 'NOT lower'}; "
            f"g.dW {p[f'first {m} 4-bit']:+.5f} vs {p['first rtn 4-bit']:+.5f})" for m in ("gptq",)]


def checks_for(p: dict[str, float]) -> list[Check]:
    """The targets on one domain and seed's perplexities ``p`` (label -> ppl)."""

    def rel(a: str, b: str) -> float:
        return p[b] / p[a] - 1

    draws = [v for k, v in p.items() if k.startswith("random drop 0.5")]
    random = sum(draws) / len(draws)
    chain = ["baseline", "drop 0.75", "drop 0.5", "drop 0.25"]
    steps = [rel(a, b) for a, b in zip(chain, chain[1:])]
    return [
        Check("expert drop: baseline < 0.75 < 0.5 < 0.25, steps >= 1%", all(s >= STEP for s in steps),
              " < ".join(f"{p[k]:.3f}" for k in chain) + "  (steps " + ", ".join(f"{100 * s:+.2f}%" for s in steps) + ")"),
        Check("frequency drop beats random drop (keep 0.5, mean of 3 draws)", p["drop 0.5"] < random,
              f"{p['drop 0.5']:.3f} vs {random:.3f} ({', '.join(f'{x:.3f}' for x in draws)})"),
        Check("wanda beats magnitude at 50%", p["wanda 50%"] < p["magnitude 50%"],
              f"{p['wanda 50%']:.3f} vs {p['magnitude 50%']:.3f}"),
        Check("sparsegpt at least ties wanda at 50%", p["sparsegpt 50%"] <= p["wanda 50%"] * (1 + TIE),
              f"{p['sparsegpt 50%']:.3f} vs {p['wanda 50%']:.3f}"),
        Check("gptq beats rtn at 4 bits (KL from the baseline)", p["kl gptq 4-bit"] < p["kl rtn 4-bit"],
              f"KL {p['kl gptq 4-bit']:.5f} vs {p['kl rtn 4-bit']:.5f}; ppl {p['gptq 4-bit']:.3f} vs {p['rtn 4-bit']:.3f} (baseline {p['baseline']:.3f})"),
        Check("awq beats rtn at 4 bits (KL from the baseline)", p["kl awq 4-bit"] < p["kl rtn 4-bit"],
              f"KL {p['kl awq 4-bit']:.5f} vs {p['kl rtn 4-bit']:.5f}; ppl {p['awq 4-bit']:.3f} vs {p['rtn 4-bit']:.3f}"),
        Check("healed merge beats top-k drop at 4 of 16", p["merge 4/16 + heal"] < p["top-k drop 4/16"],
              f"{p['merge 4/16 + heal']:.3f} vs {p['top-k drop 4/16']:.3f}"),
    ]


def measure(model: str = "zoo:deepseek_v2", seeds=(0, 1, 2), domains=("prose", "code"), samples: int = 32,
            seqlen: int = 128, windows_: int = 40, heal_steps: int = 100, threads: int | None = 2,
            log=print) -> Outcome:
    """Run every method for every seed and domain; log one line per check as it completes."""
    from moebench.models import load

    if threads:
        torch.set_num_threads(threads)
    base = load(model, threads=threads)
    outcome = Outcome()
    for domain in domains:
        data = f"embedded:{domain}"
        ids = windows(encode(base.tokenizer, load_text(data, "test")), seqlen, windows_)
        baseline = perplexity(base.model, ids)
        reference = log_probs(base.model, ids)
        grads = loss_gradient(base.model, ids)
        for seed in seeds:
            calibration = Calibration(CalibrationSpec(data, samples, seqlen, seed=seed), cache=False)
            p = {"baseline": baseline}
            t0 = time.perf_counter()
            for label, (method, table) in RUNS.items():
                table = _fill(table, seed0=seed, seed1=seed + 100, seed2=seed + 200, heal_steps=heal_steps)
                moe = compressed(base, method, table, Context(seed=seed, calibration=calibration, teacher=base))
                p[label] = perplexity(moe.model, ids)
                if label in KL_RUNS:
                    p["kl " + label] = kl_from(reference, moe.model, ids)
                if label in FIRST_ORDER_RUNS:
                    p["first " + label] = first_order(grads, base.model, moe.model)
                del moe
            for label, value in p.items():
                outcome.ppl[(domain, seed, label)] = value
            for check in checks_for(p):
                outcome.checks.append((domain, seed, check))
                log(f"{domain:5s} seed {seed}  {'ok  ' if check.ok else 'FAIL'}  {check.target}: {check.figures}")
            for line in net_lines(p):
                log(f"{domain:5s} seed {seed}  info  {line}")
            log(f"{domain:5s} seed {seed}  ({time.perf_counter() - t0:.0f} s)")
    return outcome


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:deepseek_v2")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--domains", nargs="+", default=["prose", "code"])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--heal-steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"model {args.model}; calibration embedded:DOMAIN train {args.samples}x{args.seqlen}, seeds {args.seeds}; "
          f"perplexity on embedded:DOMAIN test, {args.windows}x{args.seqlen}; threads {args.threads}", flush=True)
    t0 = time.perf_counter()
    outcome = measure(args.model, args.seeds, args.domains, args.samples, args.seqlen, args.windows, args.heal_steps,
                      args.threads, log=lambda line: print(line, flush=True))
    n, bad = len(outcome.checks), len(outcome.failed)
    print(f"{n - bad}/{n} checks hold ({time.perf_counter() - t0:.0f} s)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
