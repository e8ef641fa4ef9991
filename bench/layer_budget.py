"""Per-layer cost of the slimming and quantization methods at real width, with fewer experts.

bench/real_shape.py measures whole twins (64 experts per DeepSeek-V2-Lite layer); on a
shared 1-core machine its slow methods take hours. This script keeps everything of
twin:deepseek_v2_lite's MoE layer at real width (hidden 2048, experts of width 1408,
top-6, 2 shared experts, bfloat16) but builds it with ``--experts`` routed experts and
scales the calibration tokens with them (16 x 256 tokens at 64 experts), so each expert
sees as many routed tokens as in the real model and the ratios carry over: per-expert
work and the layer forward both scale with the number of experts. Each method runs in a
fresh subprocess, through its real ``apply`` (calibration gather included), and reports:

- ``s/layer``: CPU seconds per MoE layer; ``x fwd``: that over the CPU seconds of one
  forward of the same tokens through the MoE decoder layer (attention included);
- ``mem x``: peak RSS added while applying, as a multiple of the layer's routed-expert bytes.

    python bench/layer_budget.py [--experts 8] [--methods magnitude wanda ...] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_shape import BUDGETS, GIB, MEMORY_BUDGET, PeakRSS  # noqa: E402

METHODS = ["rtn", "bnb_4bit", "magnitude", "wanda", "gptq", "sparsegpt", "awq"]


def build(experts: int, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    from moebench import twin, zoo
    from moebench.adapter import MoEModel
    from moebench.plugins import host

    cfg = twin.config("deepseek_v2_lite", layers=2)
    cfg.n_routed_experts = experts
    cfg.n_group = 1
    cfg.topk_group = 1
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    twin.initialize(model, seed)
    return MoEModel(model, host().adapter_for(model), tokenizer=zoo.tokenizer())


def child(args) -> dict:
    import gc

    import torch

    from moebench.calibration import Calibration, CalibrationSpec
    from moebench.method import Context
    from moebench.params import parse
    from moebench.plugins import host

    torch.set_num_threads(1)
    model = build(args.experts)
    layer = model.moe_layers[0]
    block = model.block(layer)
    expert_bytes = sum(t.numel() * t.element_size() for t in (block.experts.gate_up_proj, block.experts.down_proj))
    samples = max(1, round(args.samples * args.experts / 64))
    cal = Calibration(CalibrationSpec(data=args.data, samples=samples, seqlen=args.seqlen, batch_size=args.batch_size), cache=False)
    windows = cal.windows(model.tokenizer)
    began, spent = {}, [0.0]
    h1 = model.layers[layer].register_forward_pre_hook(lambda m, a: began.__setitem__(0, time.process_time()))
    h2 = model.layers[layer].register_forward_hook(lambda m, a, o: spent.__setitem__(0, spent[0] + time.process_time() - began[0]))
    with torch.no_grad():
        for start in range(0, len(windows), args.batch_size):
            model.model(input_ids=windows[start : start + args.batch_size], use_cache=False)
    h1.remove()
    h2.remove()
    cls = host().method(args.child)
    params = parse(cls.Params, json.loads(args.params or "{}"))
    ctx = Context(seed=0, calibration=cal, device="cpu", log=lambda *_: None)
    gc.collect()
    with PeakRSS() as rss:
        t0 = time.process_time()
        cls().apply(model, params, ctx)
        cpu = time.process_time() - t0
    return {"method": args.child, "params": args.params or "{}", "experts": args.experts, "tokens": f"{samples}x{args.seqlen}",
            "forward_s": round(spent[0], 3), "s_per_layer": round(cpu, 2), "ratio": round(cpu / spent[0], 2),
            "expert_bytes": expert_bytes, "mem_added_bytes": rss.added, "mem_x": round(rss.added / expert_bytes, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--data", default="embedded:prose")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows at 64 experts (scaled with --experts)")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=METHODS, help="method names, or name:JSON-params")
    ap.add_argument("--json", help="append each row to this JSON-lines file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("ROW " + json.dumps(child(args)), flush=True)
        return
    print(f"deepseek_v2_lite-shaped MoE layer with {args.experts} experts (bfloat16), CPU, 1 thread")
    print("| method | s / MoE layer | x layer forward | memory added (x expert bytes) | budget (x fwd / mem) | meets |")
    print("|---|---|---|---|---|---|")
    for spec in args.methods:
        name, _, params = spec.partition(":")
        cmd = [sys.executable, __file__, "--child", name, "--experts", str(args.experts), "--data", args.data,
               "--samples", str(args.samples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size)]
        if params:
            cmd += ["--params", params]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode or not rows:
            print(f"| {spec} | failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]} | | | | |", flush=True)
            continue
        row = json.loads(rows[-1])
        budget = BUDGETS.get(name)
        ok = budget is not None and row["ratio"] <= budget and row["mem_x"] <= MEMORY_BUDGET
        print(f"| {spec} | {row['s_per_layer']} | {row['ratio']} | {row['mem_x']} ({row['mem_added_bytes'] / GIB:.2f} GiB) "
              f"| {budget} / {MEMORY_BUDGET} | {'yes' if ok else 'no'} | (fwd {row['forward_s']} s, {row['tokens']} tokens)", flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
