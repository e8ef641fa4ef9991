"""The harness's overhead on perplexity: the metric as the runner calls it vs a bare loop of forward passes.

All sides see the same model and the same windows, and alternate, so drift in machine
load hits them alike; figures are ratios of median times from one process.

- harness: the whole ``perplexity`` metric as the runner calls it for each run (read the
  split, tokenize — cached after the first run of a process —, cut windows, forward,
  next-token NLL, progress, record).
- bare: a hand-written loop over pre-cut windows: forward pass, then the summed
  cross-entropy of the shifted logits — the least code that yields the same number.
- forward only: the loop with no loss at all, to show what the loss itself costs.

The first (cold) harness call of a process also tokenizes the split; it is printed apart.

    python bench/overhead.py                                   # trained zoo model, embedded prose
    python bench/overhead.py --data file:/work/shared/data/wikitext-2 --max-samples 40
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moebench.data import encode, load_text, windows
from moebench.method import Context
from moebench.models import load
from moebench_plugins.metrics import Perplexity, PerplexityParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:deepseek_v2")
    ap.add_argument("--data", default="embedded:prose")
    ap.add_argument("--split", default="test")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--max-samples", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load(args.model)
    model.model.eval()
    params = PerplexityParams(data=args.data, split=args.split, seqlen=args.seqlen, max_samples=args.max_samples, batch_size=args.batch_size)
    ids = windows(encode(model.tokenizer, load_text(args.data, args.split)), args.seqlen, args.max_samples)
    metric = Perplexity()

    def harness() -> float:
        return metric.measure(model, params, Context())["perplexity"]["value"]

    @torch.no_grad()
    def bare() -> float:
        nll = 0.0
        for batch in ids.split(args.batch_size):
            logits = model.model(input_ids=batch, use_cache=False).logits
            nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        return nll

    @torch.no_grad()
    def forward_only() -> None:
        for batch in ids.split(args.batch_size):
            model.model(input_ids=batch, use_cache=False)

    from moebench import data

    data._ENCODED.clear()
    t0 = time.perf_counter()
    harness()  # cold: tokenizes the split
    cold = time.perf_counter() - t0
    bare(), forward_only()  # warm-up
    times: dict[str, list[float]] = {"harness": [], "bare": [], "forward": []}
    for _ in range(args.repeats):
        for name, fn in (("harness", harness), ("bare", bare), ("forward", forward_only)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {args.model}  data {args.data}:{args.split}  windows {len(ids)}x{args.seqlen}  batch {args.batch_size}  "
          f"threads {torch.get_num_threads()}  repeats {args.repeats}")
    for name, values in times.items():
        print(f"{name:8s} median {med[name]:.3f}s  (min {min(values):.3f}s, max {max(values):.3f}s)")
    print(f"harness cold first call (tokenizes the split): {cold:.3f}s = {cold / med['bare']:.2f} x bare")
    print(f"perplexity {harness():.4f}")
    print(f"loss cost (bare / forward only): {med['bare'] / med['forward']:.3f}")
    print(f"overhead ratio (harness / bare forward loop): {med['harness'] / med['bare']:.3f}")


if __name__ == "__main__":
    main()
