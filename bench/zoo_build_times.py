"""Wall time of each zoo build from scratch, on a quiet machine or beside other CPU-bound jobs.

Runs ``moebench zoo build NAME --threads T`` for each name in a fresh, temporary
``MOEBENCH_HOME`` (the BPE tokenizer is copied in when this machine's cache has it, so
every build pays the same), one after the other, and prints per build: wall seconds of
the command, the training seconds and steps its ``zoo.json`` records, seconds per step,
and the validation perplexities. ``--load N`` keeps N single-threaded matmul loops running
beside each build (another user's jobs on a shared machine), ended when the build ends.
Issue #13 asks for at most 3 minutes per build on 2 quiet cores; docs/benchmarks.md quotes
this script's output.

    python bench/zoo_build_times.py [--names deepseek_v2 mixtral ...] [--threads 2] [--load 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import moebench  # noqa: F401  (OpenMP defaults before torch)
from moebench import zoo
from moebench.paths import cache_dir

LOAD = "import torch; torch.set_num_threads(1); a = torch.randn(256, 256)\nwhile True: a = (a @ a).tanh()"


def build_once(name: str, threads: int, load: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix="moebench-buildtime-"))
    try:
        tokenizers = cache_dir("tokenizers")
        if any(tokenizers.glob("*.json")):
            shutil.copytree(tokenizers, home / "tokenizers")
        env = {**os.environ, "MOEBENCH_HOME": str(home)}
        loads = [subprocess.Popen([sys.executable, "-c", LOAD], env=env) for _ in range(load)]
        try:
            start = time.perf_counter()
            subprocess.run(["moebench", "zoo", "build", name, "--threads", str(threads)], env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - start
        finally:
            for proc in loads:
                proc.kill()
                proc.wait()
        info = json.loads(next((home / "zoo").glob(f"{name}-*/zoo.json")).read_text())
        return {"wall": wall, **info}
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--names", nargs="+", default=zoo.names())
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--load", type=int, default=0, help="single-threaded CPU-bound jobs running beside each build")
    args = ap.parse_args()
    print(f"threads {args.threads}, {args.load} other CPU-bound job(s) running; fresh MOEBENCH_HOME per build", flush=True)
    print("| build | steps | wall | training | s/step | val ppl prose / code | key |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for name in args.names:
        r = build_once(name, args.threads, args.load)
        ppl = r["trained"]["perplexity"]
        print(f"| {name} | {r['steps']} | {r['wall']:.0f} s | {r['train_seconds']:.0f} s | {r['train_seconds'] / r['steps']:.3f} | "
              f"{ppl['prose']:.1f} / {ppl['code']:.1f} | `{r['key']}` |", flush=True)


if __name__ == "__main__":
    main()
