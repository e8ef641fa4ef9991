"""GPU smoke test: every method family on a DeepSeek-V2-Lite shape twin, one suite, one table.

On one CUDA GPU, offline: ``twin:deepseek_v2_lite?layers=4`` in bfloat16 (1 dense + 3 MoE
layers at the real width), calibrated on 16 x 256 embedded tokens, with expert/layer/block
drop, WANDA, SparseGPT, GPTQ, AWQ, bnb 4-bit (bitsandbytes' CUDA kernels), SLERP merge and
PreMoe (its FAISS index on the GPU where faiss reports one). Each run records compression
time, the CUDA peak while compressing, the inference peak, prefill/decode speed and
perplexity (meaningless on random weights: it only shows the model still runs). The table
ends with an extrapolation to the full 27-layer model: compression seconds times
26 / (MoE layers here), and the weights of the full model (from its config, on the meta
device) plus the peak the method added over this twin's weights.

``--cpu`` is the dry run: the same suite and code on the CPU, with a 3-layer twin (1 dense +
2 MoE layers, the fewest layer_drop accepts) of 4 routed experts (``experts=4``; width
unchanged) and a few calibration tokens.

    bash bench/gpu_smoke.sh            # on a GPU box
    bash bench/gpu_smoke.sh --cpu      # the CI dry run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30
FULL_MOE_LAYERS = 26  # DeepSeek-V2-Lite: 27 layers, the first dense

METHODS = [
    ("expert_drop", {"keep_ratio": 0.5}),
    ("layer_drop", {"n": 1}),
    ("block_drop", {"n": 1}),
    ("wanda", {"sparsity": 0.5}),
    ("sparsegpt", {"sparsity": 0.5}),
    ("gptq", {"bits": 4}),
    ("awq", {"bits": 4}),
    ("bnb_4bit", {}),
    ("merge", {"keep_ratio": 0.5, "operator": "slerp"}),
    ("premoe", {"keep_ratio": 0.5, "task": "retrieve", "query": "prose"}),
]


def suite_text(cpu: bool) -> str:
    source = "twin:deepseek_v2_lite?layers=3&experts=4" if cpu else "twin:deepseek_v2_lite?layers=4"
    samples, seqlen = (2, 32) if cpu else (16, 256)
    ppl = (32, 2) if cpu else (256, 8)
    speed = "prefill = 16\ndecode = 2\nwarmup = 0\nrepeats = 1" if cpu else "prefill = 256\ndecode = 32\nwarmup = 1\nrepeats = 3"
    lines = [
        "[suite]", 'name = "gpu_smoke"', "seed = 0",
        "[model]", f'source = "{source}"', 'dtype = "bfloat16"', f'device = "{"cpu" if cpu else "cuda"}"',
        "[calibration]", 'data = "embedded:prose"', f"samples = {samples}", f"seqlen = {seqlen}",
        "[tasks.prose]", 'data = "embedded:prose"', "[tasks.code]", 'data = "embedded:code"',
        "[eval.perplexity]", 'data = "embedded:prose"', 'split = "test"', f"seqlen = {ppl[0]}", f"max_samples = {ppl[1]}",
        "[eval.memory]", "checkpoint = false", f"seqlen = {16 if cpu else 256}", f"decode = {2 if cpu else 32}",
        "[eval.speed]", speed,
    ]
    for method, params in METHODS:
        body = ", ".join(f"{k} = {json.dumps(v)}" for k, v in params.items())
        lines += ["[[methods]]", f'name = "{method}"', f'method = "{method}"', f"params = {{ {body} }}"]
    return "\n".join(lines) + "\n"


def full_weight_bytes() -> int:
    """Bytes of the full 27-layer DeepSeek-V2-Lite twin in bfloat16 (meta device: nothing allocated)."""
    import math

    from moebench import twin

    shapes = twin._shapes(twin.config("deepseek_v2_lite"))
    return sum(math.prod(s) for s in shapes.values()) * 2


def table(records: list[dict], moe_layers: int, twin_bytes: int, full_bytes: int) -> str:
    rows = ["| run | status | compress s | x27 layers s | CUDA peak compressing GiB | full-model peak GiB (est.) "
            "| inference peak GiB | prefill tok/s | decode tok/s | ppl |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        m = r.get("metrics", {})
        secs = m.get("compress_seconds")
        peak = m.get("compress_peak_bytes")
        extra = None if peak is None else max(0, peak - twin_bytes)
        speed = m.get("speed", {})
        ppl = (m.get("perplexity") or {}).get("value")
        cells = [
            r["name"], r["status"] if r["status"] == "ok" else f"FAILED {str(r.get('error'))[:60]}",
            f"{secs:.1f}" if secs is not None else "-",
            f"{secs * FULL_MOE_LAYERS / moe_layers:.0f}" if secs is not None else "-",
            f"{peak / GIB:.2f}" if peak is not None else "-",
            f"{(full_bytes + extra) / GIB:.1f}" if extra is not None else f"{full_bytes / GIB:.1f}",
            f"{m['peak_memory_bytes'] / GIB:.2f}" if m.get("peak_memory_bytes") else "-",
            f"{speed['prefill_tok_s']:.0f}" if speed.get("prefill_tok_s") else "-",
            f"{speed['decode_tok_s']:.1f}" if speed.get("decode_tok_s") else "-",
            f"{ppl:.0f}" if ppl else "-",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU: 3-layer, 4-expert twin, few tokens")
    ap.add_argument("--out", help="results folder (default: a temporary one)")
    args = ap.parse_args()

    import torch

    from moebench.runner import RunOptions, run_suite
    from moebench.suite import load_suite

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA GPU visible; run with --cpu for the CPU dry run", file=sys.stderr)
        return 2
    try:
        import faiss

        faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        faiss_gpus = 0
    import bitsandbytes

    print(f"torch {torch.__version__}, device {'cpu' if args.cpu else torch.cuda.get_device_name(0)}, "
          f"faiss GPUs {faiss_gpus}, bitsandbytes {bitsandbytes.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="moebench-gpu-smoke-") as tmp:
        path = Path(tmp) / "gpu_smoke.toml"
        path.write_text(suite_text(args.cpu))
        suite = load_suite(path)
        out = Path(args.out) if args.out else Path(tmp) / "out"
        start = time.perf_counter()
        result = run_suite(suite, RunOptions(out=out, log=lambda m: print(m, flush=True)))
        seconds = time.perf_counter() - start
    from moebench import twin

    name, options = twin.parse_source(suite.model.source[5:])
    cfg = twin.config(name, options.get("layers"), experts=options.get("experts"))
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    twin_bytes = sum(__import__("math").prod(s) for s in twin._shapes(cfg).values()) * 2
    print()
    print(table(result.records, moe_layers, twin_bytes, full_weight_bytes()))
    print(f"\n{suite.model.source} ({moe_layers} MoE layers), whole suite {seconds:.0f} s; "
          f"x27 layers: compress seconds x {FULL_MOE_LAYERS}/{moe_layers}; full-model peak: its bf16 weights "
          f"({full_weight_bytes() / GIB:.1f} GiB) plus what the method added over this twin's weights ({twin_bytes / GIB:.2f} GiB)")
    failed = [r["name"] for r in result.records if r["status"] != "ok"]
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
