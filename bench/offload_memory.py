"""Peak memory of compression with ``[model] offload = "disk"``: flat in depth, and one DeepSeek-V3 layer.

Two measurements, each run in a fresh process (peak RSS is a high-water mark of a whole
process), on shape twins (real width, random weights; see moebench.twin):

1. Depth: streamed WANDA on ``twin:deepseek_v2_lite?layers=N&experts=E`` for N = 4 and
   16: peak RSS, checkpoint bytes and the largest layer's bytes. The goal (issue #19):
   peak(16) - peak(4) <= one layer's bytes, and peak(16) < checkpoint(16) / 2.
2. DeepSeek-V3: streamed GPTQ (int4 storage, experts only) on
   ``twin:deepseek_v3?layers=2&experts=E`` (layer 0 dense, layer 1 MoE) for a few expert
   counts E, with the routed experts' Hessians gathered ``--expert-chunk`` experts at a
   time; the peak is fitted as ``a + b * E`` and extrapolated to the real 256 experts,
   against an 80 GB GPU. A full 256-expert layer is ~22 GB of bf16 weights alone, more
   than this machine's memory, so it is extrapolated, not measured.

    python bench/offload_memory.py                      # both, prints the tables
    python bench/offload_memory.py --layers 16 --json   # one depth measurement (a child)
    python bench/offload_memory.py --v3-experts 8 --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class LayerPeaks:
    """Peak RSS while each decoder layer is in memory: the kernel's high-water mark (VmHWM) is reset
    (``/proc/self/clear_refs``, 5) when the layer loop reads a layer and read when it writes it."""

    def __init__(self, stream):
        self.peaks: dict[int, int] = {}
        load, done = stream.load, stream.done

        def load_reset(i):
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            load(i)

        def done_read(i):
            self.peaks[i] = _status_kib("VmHWM") * 1024
            done(i)

        stream.load, stream.done = load_reset, done_read


def _context(samples: int, seqlen: int, batch: int):
    from moebench.calibration import Calibration, CalibrationSpec
    from moebench.method import Context

    return Context(calibration=Calibration(CalibrationSpec(samples=samples, seqlen=seqlen, batch_size=batch), cache=False))


def _checkpoint_bytes(path: Path) -> tuple[int, int]:
    """(all weight bytes, the largest decoder layer's bytes): the twin's shards are one per layer, then one
    for embeddings, final norm and head (the last); sizes on disk (the headers are a few KiB)."""
    files = sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))
    sizes = [(path / f).stat().st_size for f in files]
    return sum(sizes), max(sizes[:-1])


def _twin(args) -> tuple[str, int, int, str]:
    """(twin name, layers, routed experts, dtype) of one measurement."""
    if args.v3_experts:
        return "deepseek_v3", 2, args.v3_experts, "bfloat16"
    return "deepseek_v2_lite", args.layers, args.experts, args.dtype


def child(args) -> dict:
    """One streamed compression in this process; its figures as a dict."""
    import torch

    torch.set_num_threads(args.threads)
    from moebench import offload, twin
    from moebench.params import parse
    from moebench.plugins import host

    name, layers, experts, dtype = _twin(args)
    if not args.build:  # built in a process of its own: writing a twin holds a layer too, and peaks are per process
        done = subprocess.run([sys.executable, __file__, "--build", *sys.argv[1:]], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"building the twin failed:\n{done.stderr[-3000:]}")
    path = twin.build(name, layers=layers, experts=experts, dtype=dtype)
    if args.build:
        return {"built": str(path)}
    if args.v3_experts:
        method, table = "gptq", {"storage": "int4", "expert_chunk": args.expert_chunk}
    else:
        method, table = "wanda", {"sparsity": 0.5}
    total, layer = _checkpoint_bytes(path)
    start = time.perf_counter()
    model = offload.open_model(path, dtype=dtype)
    opened = peak_rss()
    out = Path(args.out or tempfile.mkdtemp(prefix="offload-bench-"))
    model.stream.begin(out)
    peaks = LayerPeaks(model.stream)
    cls = host().method(method)
    changes = cls().apply(model, parse(cls.Params, table), _context(args.samples, args.seqlen, args.batch))
    model.stream.end(method)
    seconds = time.perf_counter() - start
    if not args.out:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    return {
        "model": str(path.name), "method": method, "params": table, "layers": len(model.layers),
        "experts": args.v3_experts or args.experts, "checkpoint_bytes": total, "layer_bytes": layer,
        "peak_rss_bytes": peak_rss(), "peak_after_open_bytes": opened, "seconds": round(seconds, 1),
        "layer_peak_rss_bytes": peaks.peaks, "moe_layer_peak_rss_bytes": max(peaks.peaks[i] for i in model.moe_layers),
        "tokens": args.samples * args.seqlen, "calibration": changes.get("calibration", {}),
    }


def run_child(extra: list[str], args) -> dict:
    cmd = [sys.executable, __file__, "--json", "--threads", str(args.threads), "--samples", str(args.samples),
           "--seqlen", str(args.seqlen), "--batch", str(args.batch), "--experts", str(args.experts), "--dtype", args.dtype,
           "--expert-chunk", str(args.expert_chunk), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"child {' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, help="one depth measurement (decoder layers of the deepseek_v2_lite twin)")
    ap.add_argument("--v3-experts", type=int, help="one DeepSeek-V3 measurement with this many routed experts")
    ap.add_argument("--experts", type=int, default=4, help="routed experts per layer of the deepseek_v2_lite twin")
    ap.add_argument("--dtype", default="float32", help="dtype of the deepseek_v2_lite twin (float32: 4 bytes a weight, "
                    "so a layer's bytes dominate the noise at half the compute of bfloat16 on a CPU)")
    ap.add_argument("--expert-chunk", type=int, default=2, help="experts whose Hessians are gathered at a time (V3)")
    ap.add_argument("--v3", type=int, nargs="*", default=[2, 4], help="expert counts of the V3 fit")
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="keep the written checkpoint here")
    ap.add_argument("--json", action="store_true", help="print one JSON line (what a child prints)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.layers or args.v3_experts:
        result = child(args)
        print(json.dumps(result))
        return
    print(f"# streamed WANDA on twin:deepseek_v2_lite?experts={args.experts} ({args.dtype}), {args.samples} x {args.seqlen} "
          f"calibration tokens, {args.threads} threads")
    print("| layers | checkpoint | one layer | peak RSS | s |")
    print("|---|---|---|---|---|")
    depth = {}
    for n in (4, 16):
        r = depth[n] = run_child(["--layers", str(n)], args)
        print(f"| {n} | {r['checkpoint_bytes'] / GIB:.2f} GiB | {r['layer_bytes'] / GIB:.3f} GiB | {r['peak_rss_bytes'] / GIB:.2f} GiB | {r['seconds']} |")
    grow = depth[16]["peak_rss_bytes"] - depth[4]["peak_rss_bytes"]
    print(f"growth 4 -> 16 layers: {grow / GIB:+.3f} GiB (goal <= one layer, {depth[16]['layer_bytes'] / GIB:.3f} GiB: "
          f"{'met' if grow <= depth[16]['layer_bytes'] else 'NOT met'}); peak at 16 layers = "
          f"{depth[16]['peak_rss_bytes'] / depth[16]['checkpoint_bytes']:.2f} x checkpoint (goal < 0.5: "
          f"{'met' if depth[16]['peak_rss_bytes'] < depth[16]['checkpoint_bytes'] / 2 else 'NOT met'})")
    if not args.v3:
        return
    print(f"\n# streamed GPTQ (int4, experts) on twin:deepseek_v3?layers=2&experts=E, Hessians {args.expert_chunk} experts at a time")
    print("| E | checkpoint | MoE layer bytes | peak RSS while the MoE layer is in memory | process peak RSS | s |")
    print("|---|---|---|---|---|---|")
    v3 = {}
    for e in args.v3:
        r = v3[e] = run_child(["--v3-experts", str(e)], args)
        print(f"| {e} | {r['checkpoint_bytes'] / GIB:.2f} GiB | {r['layer_bytes'] / GIB:.2f} GiB | "
              f"{r['moe_layer_peak_rss_bytes'] / GIB:.2f} GiB | {r['peak_rss_bytes'] / GIB:.2f} GiB | {r['seconds']} |")
    if len(v3) >= 2:
        (e0, r0), (e1, r1) = sorted(v3.items())[0], sorted(v3.items())[-1]
        per = (r1["moe_layer_peak_rss_bytes"] - r0["moe_layer_peak_rss_bytes"]) / (e1 - e0)
        base = r0["moe_layer_peak_rss_bytes"] - per * e0
        full = base + per * 256
        print(f"fit: peak = {base / GIB:.2f} GiB + {per / 2**20:.0f} MiB x E; at E = 256: {full / GIB:.1f} GiB "
              f"({full / 1e9:.1f} GB; {'fits' if full < 80e9 else 'does NOT fit'} an 80 GB GPU)")


if __name__ == "__main__":
    main()
