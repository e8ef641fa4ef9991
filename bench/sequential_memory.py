"""Peak memory of layer-sequential calibration on zoo-config models of 4 and 16 layers.

Each depth and pass runs in a fresh subprocess (so process peaks do not mix). The model is
the DeepSeek-V2 zoo config with random weights; the calibration windows are random tokens.
Two passes are measured:

- ``sequential``: :class:`moebench.sequential.Sequential` gathering GPTQ's statistics
  (per-expert Hessians of routed tokens) for every layer, holding one layer's inputs;
- ``all-layers``: for contrast, one ordinary forward that keeps every layer's input
  (what calibrating all layers from a single pass would hold).

Reported: the bytes the pass tracks (held hidden states and statistics) and the peak
resident set size above the level before the pass, sampled every 2 ms by a thread.

    python bench/sequential_memory.py [--samples 32] [--seqlen 256] [--depths 4 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

MIB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size in a thread; ``peak - start`` is what a block of code added."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def added(self) -> int:
        return self.peak - self.start


def child(depth: int, mode: str, samples: int, seqlen: int, batch_size: int) -> dict:
    import gc

    import torch

    from moebench import zoo
    from moebench.adapter import MoEModel
    from moebench.plugins import host
    from moebench.sequential import Sequential

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = zoo.entry("deepseek_v2").cls(zoo.config("deepseek_v2", num_hidden_layers=depth)).eval()
    moe = MoEModel(model, host().adapter_for(model))
    ids = torch.randint(3, zoo.VOCAB_SIZE, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    out = {"depth": depth, "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}

    gc.collect()
    if mode == "all_layers":
        with PeakRSS() as rss, torch.no_grad():
            held = []
            handles = [layer.register_forward_pre_hook(lambda m, a, k: held.append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
                       for layer in moe.layers]
            for batch in ids.split(batch_size):
                model.model(input_ids=batch, use_cache=False)  # the decoder stack only (no vocabulary logits)
            for h in handles:
                h.remove()
            tracked = sum(t.numel() * t.element_size() for t in held)
            del held
        out["all_layers"] = {"held_bytes": tracked, "peak_rss_added_bytes": rss.added}
        return out
    with PeakRSS() as rss:
        run = Sequential(moe, ids, targets=["experts"], collect=["hessian"], batch_size=batch_size)
        for _ in run:
            pass
        summary = run.summary()
        del run
    out["sequential"] = {
        "activation_bytes": summary["activation_bytes"],
        "peak_tracked_bytes": summary["peak_tracked_bytes"],
        "peak_rss_added_bytes": rss.added,
    }

    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="sequential", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.mode, args.samples, args.seqlen, args.batch_size)))
        return
    rows = []
    for depth in args.depths:
        row = {}
        for mode in ("sequential", "all_layers"):
            cmd = [sys.executable, __file__, "--child", str(depth), "--mode", mode, "--samples", str(args.samples),
                   "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row.update(json.loads(done.stdout.strip().splitlines()[-1]))
        rows.append(row)
    print(f"calibration: {args.samples} windows x {args.seqlen} tokens, batch {args.batch_size}; "
          f"zoo deepseek_v2 config (hidden 128), random weights, float32")
    print(f"{'layers':>6} {'weights MiB':>11} | {'seq: held acts':>14} {'tracked peak':>12} {'RSS added':>9} | "
          f"{'all-layers held':>15} {'RSS added':>9}")
    for r in rows:
        s, a = r["sequential"], r["all_layers"]
        print(f"{r['depth']:>6} {r['weights_bytes'] / MIB:>11.1f} | {s['activation_bytes'] / MIB:>14.1f} "
              f"{s['peak_tracked_bytes'] / MIB:>12.1f} {s['peak_rss_added_bytes'] / MIB:>9.1f} | "
              f"{a['held_bytes'] / MIB:>15.1f} {a['peak_rss_added_bytes'] / MIB:>9.1f}")
    if len(rows) >= 2:
        first, last = rows[0], rows[-1]
        print(f"sequential RSS added, {last['depth']} vs {first['depth']} layers: "
              f"{last['sequential']['peak_rss_added_bytes'] / max(1, first['sequential']['peak_rss_added_bytes']):.2f}x; "
              f"all-layers: {last['all_layers']['peak_rss_added_bytes'] / max(1, first['all_layers']['peak_rss_added_bytes']):.2f}x")


if __name__ == "__main__":
    main()
