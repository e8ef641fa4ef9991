"""Harness costs at real scale: calibration sampling on a large file, and a suite's model reload.

1. ``calibration``: 128 x 2048 calibration windows (the papers' setting) from a local text
   file of ``--mb`` megabytes (the embedded corpus repeated; a stand-in for a C4 shard or
   WikiText-2 where there is no network), with the zoo tokenizer, in a fresh process:
   seconds and peak RSS. ``--whole-mb`` also times the previous behaviour (tokenize the
   whole split, then cut windows) on a smaller file, for the trend.
2. ``reload``: on a shape twin, seconds of ``moebench.models.load`` (what every run of a
   suite used to do) against restoring a clean copy from the host-memory snapshot.

    python bench/harness_costs.py [--mb 1024] [--whole-mb 16 64] [--model twin:deepseek_v2_lite?layers=2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MIB = 2**20


def make_file(path: Path, mb: int) -> None:
    from moebench import corpus

    if path.exists() and path.stat().st_size >= mb * MIB:
        return
    block = ("\n\n".join(corpus.documents("prose", "train") + corpus.documents("code", "train")) + "\n\n").encode()
    with open(path, "wb") as fh:
        written = 0
        while written < mb * MIB:
            fh.write(block)
            written += len(block)


def child_calibration(path: str, whole: bool) -> dict:
    from moebench import data, zoo

    tok = zoo.tokenizer()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if whole:  # the previous behaviour: the whole split tokenized, then windows cut
        ids = data.encode(tok, data.load_text(f"file:{path}", "train"))
        out = data.random_windows(ids, 2048, 128, 0)
    else:
        out = data.calibration_windows(f"file:{path}", tok, 2048, 128, 0)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"shape": list(out.shape), "seconds": round(seconds, 2), "peak_added_mib": round((peak - base) / 1024, 1)}


def reload_costs(source: str) -> dict:
    from moebench.models import load, restore, snapshot

    t0 = time.perf_counter()
    model = load(source, dtype="bfloat16")
    loaded = time.perf_counter() - t0
    pristine = snapshot(model)
    t0 = time.perf_counter()
    restore(pristine, "cpu")
    restored = time.perf_counter() - t0
    bytes_ = sum(p.numel() * p.element_size() for p in model.model.parameters())
    return {"model": source, "weights_gib": round(bytes_ / 2**30, 2), "load_s": round(loaded, 2), "restore_s": round(restored, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--whole-mb", type=int, nargs="*", default=[16, 64])
    ap.add_argument("--model", default="twin:deepseek_v2_lite?layers=2")
    ap.add_argument("--dir", default="/tmp/moebench-harness-costs")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_calibration(args.child[0], args.child[1] == "whole")))
        return
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    print("| file | method | seconds | peak RSS added (MiB) |\n|---|---|---|---|")
    for mb, mode in [(m, "whole") for m in args.whole_mb] + [(m, "sampled") for m in sorted({*args.whole_mb, args.mb})]:
        path = folder / f"text-{mb}mb.txt"
        make_file(path, mb)
        proc = subprocess.run([sys.executable, __file__, "--child", str(path), mode], capture_output=True, text=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"seconds": "failed", "peak_added_mib": proc.stderr[-200:]}
        print(f"| {mb} MB | {mode} | {row['seconds']} | {row['peak_added_mib']} |", flush=True)
    if args.model:
        r = reload_costs(args.model)
        print(f"\n{r['model']} ({r['weights_gib']} GiB of weights): load {r['load_s']} s, restore from the snapshot {r['restore_s']} s")


if __name__ == "__main__":
    main()
