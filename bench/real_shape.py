"""Per-layer cost of each method at real width: seconds, ratio to a layer forward, memory added.

Runs every method on a shape twin (``twin:NAME?layers=N``: the real model's width with
random weights; see moebench.twin) with the suite-default parameters, each method in a
fresh subprocess so process peaks do not mix. Per method it reports:

- ``s/layer``: CPU seconds of ``apply`` (calibration gather included, its statistics
  never cached) divided by the number of MoE layers. CPU time of this process, not wall
  time, so a busy machine slows both sides alike;
- ``x fwd``: that divided by the CPU seconds of one forward of the calibration tokens
  through one MoE decoder layer (timed by hooks during a plain forward of the model);
- ``mem x``: peak RSS added while applying (sampled every 2 ms), as a multiple of one
  layer's routed-expert bytes;
- whether the ratio and memory meet the budgets of issue #19.

    python bench/real_shape.py --model twin:deepseek_v2_lite?layers=2 [--samples 16 --seqlen 256]
        [--methods rtn magnitude ...] [--dtype bfloat16] [--json out.jsonl] [--set gptq.expert_chunk=8]

Twins measure time and memory, not quality: the methods' outputs are not scored here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

GIB = 2**30
METHODS = ["rtn", "bnb_4bit", "magnitude", "wanda", "merge", "premoe", "gptq", "awq", "sparsegpt"]
#: (time ratio, memory multiple) budgets from issue #19
BUDGETS = {
    "rtn": 2, "bnb_4bit": 2, "magnitude": 2, "wanda": 4, "gptq": 15, "sparsegpt": 15, "awq": 20, "merge": 5, "premoe": 5,
}
MEMORY_BUDGET = 1.5


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size in a thread; ``added`` is what the block added at its peak."""

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


def with_settings(params, method: str, settings: list[str]):
    """``params`` with each ``METHOD.FIELD=VALUE`` of ``settings`` that names ``method`` applied (typed like the default)."""
    import dataclasses

    changes = {}
    for item in settings:
        target, _, value = item.partition("=")
        name, _, field = target.partition(".")
        if name != method:
            continue
        default = getattr(params, field)  # AttributeError names a field the method does not have
        kind = type(default) if default is not None else int
        changes[field] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return dataclasses.replace(params, **changes)


def child(args) -> dict:
    import gc

    import torch

    from moebench.calibration import Calibration, CalibrationSpec
    from moebench.method import Context
    from moebench.models import load
    from moebench.plugins import host

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = load(args.model, dtype=args.dtype)
    moe_layers = model.moe_layers
    block = model.block(moe_layers[0])
    expert_bytes = sum(t.numel() * t.element_size() for t in (block.experts.gate_up_proj, block.experts.down_proj))
    cal = Calibration(CalibrationSpec(data=args.data, samples=args.samples, seqlen=args.seqlen, batch_size=args.batch_size), cache=False)
    windows = cal.windows(model.tokenizer)

    # one forward of the calibration tokens, timing each MoE decoder layer by hooks
    spent = {i: 0.0 for i in moe_layers}
    began: dict[int, float] = {}
    handles = []
    for i in moe_layers:
        layer = model.layers[i]
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: began.__setitem__(i, time.process_time())))
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: spent.__setitem__(i, spent[i] + time.process_time() - began[i])))
    with torch.no_grad():
        for start in range(0, len(windows), args.batch_size):
            model.model(input_ids=windows[start : start + args.batch_size], use_cache=False)
    for h in handles:
        h.remove()
    forward = sum(spent.values()) / len(moe_layers)

    method = host().method(args.child)()
    params = with_settings(host().method(args.child).Params(), args.child, args.set)
    ctx = Context(seed=0, calibration=cal, device="cpu", log=lambda *_: None)
    if args.child == "premoe":  # PreMoe indexes the suite's tasks (two, as in bench/gpu_smoke.py) and retrieves one
        import dataclasses
        import tempfile
        from pathlib import Path

        from moebench.suite import load_suite

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tasks.toml"
            path.write_text(f'[suite]\nname = "real_shape"\n[model]\nsource = "{args.model}"\ndtype = "{args.dtype}"\n'
                            '[tasks.prose]\ndata = "embedded:prose"\n[tasks.code]\ndata = "embedded:code"\n')
            ctx.suite = load_suite(path)
        params = dataclasses.replace(params, query="prose")
    gc.collect()
    with PeakRSS() as rss:
        t0 = time.process_time()
        w0 = time.perf_counter()
        method.apply(model, params, ctx)
        cpu = time.process_time() - t0
        wall = time.perf_counter() - w0
    per_layer = cpu / len(moe_layers)
    return {
        "method": args.child,
        "model": args.model,
        "dtype": args.dtype,
        "tokens": f"{args.samples}x{args.seqlen}",
        "settings": [item for item in args.set if item.startswith(args.child + ".")],
        "moe_layers": len(moe_layers),
        "expert_bytes": expert_bytes,
        "forward_s": round(forward, 3),
        "s_per_layer": round(per_layer, 2),
        "wall_s": round(wall, 1),
        "ratio": round(per_layer / forward, 2),
        "mem_added_bytes": rss.added,
        "mem_x": round(rss.added / expert_bytes, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="twin:deepseek_v2_lite?layers=2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--data", default="embedded:prose")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--json", help="append each method's row to this JSON-lines file")
    ap.add_argument("--timeout", type=float, default=3600, help="wall seconds a method's process may take before it is stopped")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                    help="a method parameter other than its default, e.g. gptq.expert_chunk=8 (repeatable)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("ROW " + json.dumps(child(args)), flush=True)
        return

    from moebench.models import resolve

    resolve(args.model, dtype=args.dtype)  # build the twin once, outside the timed children
    print(f"{args.model} ({args.dtype}), {args.samples} x {args.seqlen} calibration tokens, CPU, 1 thread")
    last = None
    print("| method | s / MoE layer | x layer forward | memory added (x expert bytes) | budget (x fwd / mem) | meets |")
    print("|---|---|---|---|---|---|")
    for name in args.methods:
        cmd = [sys.executable, __file__, "--child", name, "--model", args.model, "--dtype", args.dtype, "--data", args.data,
               "--samples", str(args.samples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size)]
        cmd += [f"--set={item}" for item in args.set]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"| {name} | not finished in {args.timeout} s (wall) | | | | |", flush=True)
            continue
        rows = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode or not rows:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"| {name} | failed: {tail} | | | | |", flush=True)
            continue
        row = last = json.loads(rows[-1])
        budget = BUDGETS.get(name)
        ok = budget is not None and row["ratio"] <= budget and row["mem_x"] <= MEMORY_BUDGET
        print(f"| {name} | {row['s_per_layer']} | {row['ratio']} | {row['mem_x']} ({row['mem_added_bytes'] / GIB:.2f} GiB) "
              f"| {budget} / {MEMORY_BUDGET} | {'yes' if ok else 'no'} | (wall {row['wall_s']} s)", flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    if last:
        print(f"(one MoE layer forward of the calibration tokens: {last['forward_s']} CPU s; "
              f"routed-expert bytes per layer: {last['expert_bytes'] / GIB:.2f} GiB)")


if __name__ == "__main__":
    main()
