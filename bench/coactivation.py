"""Co-activation analysis speed: the zoo DeepSeek-V2 model over ~100k calibration tokens.

Times three things, each the median of ``--repeats`` in one process:

- pass: the calibration service gathering ``coactivation`` for every MoE layer over
  ``samples x seqlen`` tokens (the forward pass plus the statistic's hooks; no cache);
- forward: the same forward pass with no statistic attached (what the pass costs anyway);
- accumulate: ``coactivation_counts`` alone on the router choices the pass saw, for all
  layers, and on synthetic 64- and 256-expert layers at top-8 (the DeepSeek-V2-Lite and
  DeepSeek-V3 shapes) to show it scales past the zoo's 16 experts.

    python bench/coactivation.py                          # 392 x 256 = 100,352 tokens
    python bench/coactivation.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from moebench_plugins.fusion.analysis import coactivation_counts
from moebench.calibration import Calibration, CalibrationSpec
from moebench.models import load


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:deepseek_v2")
    ap.add_argument("--data", default="embedded:prose")
    ap.add_argument("--samples", type=int, default=392)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load(args.model)
    spec = CalibrationSpec(data=args.data, samples=args.samples, seqlen=args.seqlen, batch_size=args.batch_size)
    cal = Calibration(spec, cache=False)
    windows = cal.windows(model.tokenizer)  # tokenized once, outside the timings
    tokens = windows.numel()

    def forward():
        with torch.no_grad():
            for start in range(0, len(windows), spec.batch_size):
                model.model(input_ids=windows[start : start + spec.batch_size], use_cache=False)

    def full_pass():
        return cal.run(model, ["coactivation"])["coactivation"]

    # the router choices of the same pass, to time the accumulation on its own
    choices: dict[int, list[torch.Tensor]] = {b.layer: [] for b in model.blocks()}
    handles = []
    for block in model.blocks():
        def hook(module, args_, output, layer=block.layer):
            choices[layer].append(model.adapter.route(output)[2].detach())

        handles.append(block.router.register_forward_hook(hook))
    forward()
    for h in handles:
        h.remove()
    picks = {layer: torch.cat(chunks) for layer, chunks in choices.items()}

    t_forward, _ = timed(forward, args.repeats)
    t_pass, counts = timed(full_pass, args.repeats)
    experts = {b.layer: b.num_experts for b in model.blocks()}
    t_acc, _ = timed(lambda: [coactivation_counts(picks[layer], experts[layer]) for layer in picks], args.repeats)
    assert all(torch.equal(counts[layer], coactivation_counts(picks[layer], experts[layer])) for layer in picks)

    g = torch.Generator().manual_seed(0)
    synthetic = {}
    for e in (64, 256):
        idx = torch.rand(tokens, e, generator=g).topk(8, dim=1).indices
        synthetic[e], _ = timed(lambda idx=idx, e=e: coactivation_counts(idx, e), args.repeats)

    layers = len(picks)
    top_k = next(iter(picks.values())).shape[1]
    print(f"model {args.model}: {layers} MoE layers x {experts[next(iter(experts))]} experts, top-{top_k}; "
          f"{tokens:,} calibration tokens ({args.samples} x {args.seqlen}); threads {torch.get_num_threads()}")
    print(f"co-activation pass (forward + hooks):  {t_pass:7.2f} s")
    print(f"forward pass alone:                    {t_forward:7.2f} s")
    print(f"accumulation alone, all {layers} layers:     {t_acc * 1000:7.1f} ms")
    for e, t in synthetic.items():
        print(f"accumulation, one {e}-expert top-8 layer: {t * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
