"""Calibration by layer streaming vs on the loaded model: peak memory of gathering router statistics.

The checkpoint is the one ``bench/partial_load.py`` writes (the real transformers
DeepSeek-V2 class, DeepSeek-V2-Lite's expert shape, bfloat16, ~660 MiB). Each mode runs
in a fresh process. The calibration windows are tokenized first (tokenizing the
corpus split costs the same in both modes and is not what streaming saves), then the
peak resident memory is reset and the ``router_logits`` statistic (what PreMoe's task
patterns are built from) is gathered over the windows:

- ``loaded``: the whole model loaded (``moebench.checkpoint.load``), one forward pass per
  batch through the calibration service;
- ``streamed``: ``moebench.checkpoint.LayerStream``: one decoder layer read, run over all
  windows and dropped before the next, as ``moebench premoe index --stream`` does.

With ``--layers 3 5`` it writes a checkpoint per depth (2 and 4 MoE layers): the loaded
mode's peak grows with the model, the streamed mode's by far less.

    python bench/streaming_calibration.py [--dir /var/tmp/premoe_bench] [--layers 3 5] [--samples 16] [--seqlen 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from partial_load import evict, make, peak_bytes, peak_reset  # noqa: E402  (the same checkpoint and meters)

MODES = ("loaded", "streamed")


def child(mode: str, folder: Path, samples: int, seqlen: int) -> dict:
    from moebench import checkpoint as ck
    from moebench.calibration import Calibration, CalibrationSpec
    from moebench.plugins import host

    host()
    spec = CalibrationSpec("embedded:prose", samples, seqlen, seed=0, batch_size=4)
    from transformers import AutoTokenizer

    calibration = Calibration(spec, cache=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    windows = calibration.windows(tokenizer)  # tokenized once, before the measurement
    evict(folder)
    peak_reset()
    rss0 = peak_bytes()
    t0 = time.perf_counter()
    if mode == "loaded":
        moe, _ = ck.load(folder, dtype="bfloat16")
        moe.tokenizer = tokenizer  # the same windows, not tokenized again
        logits = calibration.stats(moe, ["router_logits"])["router_logits"]
    else:
        stream = ck.LayerStream(folder, dtype="bfloat16")
        logits = stream.statistics(["router_logits"], windows, spec.batch_size, spec.seed)["router_logits"]
    seconds = time.perf_counter() - t0
    tokens = sum(t.shape[0] for t in logits.values()) // max(len(logits), 1)
    return {"mode": mode, "peak_bytes": peak_bytes() - rss0, "seconds": seconds, "tokens": tokens, "layers": len(logits)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="folder holding (or to hold) partial_load.py's checkpoint, reused between runs")
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 5], help="decoder layers of each checkpoint (the first is dense)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.samples, args.seqlen)))
        return
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        print(f"calibration {args.samples} x {args.seqlen} tokens of embedded:prose; bfloat16")
        print("| checkpoint MiB | decoder layers | mode | peak during calibration MiB | seconds |")
        print("|---:|---:|---|---:|---:|")
        for layers in args.layers:
            # the depth partial_load.py uses (3 layers) shares its folder
            folder = Path(args.dir or tmp) / ("ckpt" if layers == 3 else f"ckpt-{layers}layers")
            if not (folder / "config.json").exists():
                make(folder, argparse.Namespace(layers=layers, hidden=2048, inter=1408, experts=16))
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            for mode in MODES:
                res = subprocess.run([sys.executable, __file__, "--samples", str(args.samples), "--seqlen", str(args.seqlen),
                                      "--child", mode, str(folder)], capture_output=True, text=True, check=False)
                if res.returncode != 0:
                    print(res.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"mode {mode} failed")
                r = json.loads(res.stdout.strip().splitlines()[-1])
                print(f"| {size / 2**20:.1f} | {layers} | {r['mode']} | {r['peak_bytes'] / 2**20:.1f} | {r['seconds']:.1f} |", flush=True)

if __name__ == "__main__":
    main()
