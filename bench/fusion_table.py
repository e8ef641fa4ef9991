"""The fusion table: top-k drop vs every merge operator and fusion variant, with and without healing.

Runs one suite through the ordinary runner (so every figure is a normal record) on the
zoo DeepSeek-V2 model at two target expert counts, then prints a Markdown table:
perplexity (and its change against the unpruned baseline), weight bytes, compression
wall time (merging, healing, and any recalibration inside a method; the one shared
calibration pass before the runs is timed apart) and, for healed runs, the
distillation loss before and after on a fixed batch. Rows marked "(old: ...)" run the
earlier behaviour that issue #16 kept as a named option beside the reference default
(mergekit SCE, neuron alignment, spectral clustering, per-member fused LoRA adapters,
expert drop by mean routing score).

    python bench/fusion_table.py                       # keep 8 and 4 of 16, 100 healing steps
    python bench/fusion_table.py --keep 8 4 --steps 100 --out reports/fusion-table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moebench.record import Record, records_of
from moebench.runner import RunOptions, run_suite
from moebench.suite import parse_suite

#: (run name, method, params without keep); heal = None marks a run without healing
ROWS = [
    ("top-k drop (frequency)", "expert_drop", {"criterion": "frequency"}),
    ("top-k drop (mean routing score, reference)", "expert_drop", {"criterion": "score"}),
    ("merge: average", "merge", {"operator": "average"}),
    ("merge: frequency_average", "merge", {"operator": "frequency_average"}),
    ("merge: slerp", "merge", {"operator": "slerp"}),
    ("merge: sce", "merge", {"operator": "sce"}),
    ("merge: sce (old: moebench variant)", "merge", {"operator": "sce", "operator_args": {"variant": "moebench"}}),
    ("merge: frequency_average (old: no neuron alignment)", "merge", {"operator": "frequency_average", "align": False}),
    ("merge: frequency_average, act_cl grouping", "merge", {"operator": "frequency_average", "grouping": "act_cl"}),
    ("merge: frequency_average, state_cl grouping", "merge", {"operator": "frequency_average", "grouping": "state_cl"}),
    ("merge: frequency_average, act_cl grouping (old: greedy)", "merge", {"operator": "frequency_average", "grouping": "act_cl", "clustering": "greedy"}),
    ("merge: frequency_average, state_cl grouping (old: greedy)", "merge", {"operator": "frequency_average", "grouping": "state_cl", "clustering": "greedy"}),
    ("merge: frequency_average, row_average router", "merge", {"operator": "frequency_average", "router": "row_average"}),
    ("merge: frequency_average + heal", "merge", {"operator": "frequency_average", "heal": "experts"}),
    ("progressive merge (sce)", "progressive_merge", {}),
    ("progressive merge (sce) + heal", "progressive_merge", {"heal": "experts-stepwise"}),
    ("multiplexage", "multiplexage", {"operator": "frequency_average"}),
    ("multiplexage + heal", "multiplexage", {"operator": "frequency_average", "heal": "all"}),
    ("fused LoRA r8", "fused_lora", {"operator": "frequency_average", "rank": 8}),
    ("fused LoRA r8 + heal", "fused_lora", {"operator": "frequency_average", "rank": 8, "heal": "adapters"}),
    ("fused LoRA r8 (old: latent adapters)", "fused_lora", {"operator": "frequency_average", "rank": 8, "adapters": "latent"}),
    ("fused LoRA r8 (old: latent adapters) + heal", "fused_lora", {"operator": "frequency_average", "rank": 8, "adapters": "latent", "heal": "adapters"}),
    ("mixture of LoRA r8 (keep = cores)", "mixture_of_lora", {"rank": 8}),
    ("mixture of LoRA r8 + heal", "mixture_of_lora", {"rank": 8, "heal": "adapters"}),
]


def heal_table(kind: str, steps: int, lr_experts: float, lr_adapters: float) -> dict:
    if kind == "experts":
        return {"steps": steps, "lr": lr_experts, "train": "experts"}
    if kind == "experts-stepwise":  # spread the same budget over the halving steps
        return {"steps": max(1, steps // 2), "lr": lr_experts, "train": "experts"}
    if kind == "all":
        return {"steps": steps, "lr": lr_adapters, "train": "all"}
    return {"steps": steps, "lr": lr_adapters, "train": "adapters"}


def suite(args) -> dict:
    methods = []
    for label, method, params in ROWS:
        params = dict(params)
        if "heal" in params:
            params["heal"] = heal_table(params["heal"], args.steps, args.lr_experts, args.lr_adapters)
        methods.append({"name": label, "method": method, "params": {"keep": list(args.keep), **params}})
    return {
        "suite": {"name": "fusion-table", "seed": 0},
        "model": {"source": args.model, "dtype": "float32", "device": "cpu"},
        "hardware": {"threads": args.threads},
        "calibration": {"data": args.data, "samples": args.samples, "seqlen": args.seqlen},
        "eval": {"perplexity": {"data": args.data, "split": "test", "seqlen": args.seqlen, "max_samples": args.eval_windows}},
        "methods": methods,
    }


def table(records: list[Record], keeps: list[int]) -> str:
    base = next(r for r in records if r.name == "baseline")
    base_ppl = base.metrics["perplexity"]["value"]
    lines = [
        f"Baseline (16 experts per MoE layer): perplexity {base_ppl:.3f}, weights {base.metrics['weight_bytes'] / 2**20:.2f} MiB.",
        "",
        "| keep | method | experts | perplexity | Δ ppl | weights MiB | compress s | heal loss before → after |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for keep in keeps:
        for label, _, _ in ROWS:
            r = next((r for r in records if r.entry == label and r.grid.get("keep") == keep), None)
            if r is None:
                continue
            if not r.ok:
                lines.append(f"| {keep} | {label} | failed: {r.error} |")
                continue
            m = r.metrics
            changes = next(iter(r.changes.values()))
            heal = changes.get("healing")
            heal_text = f"{heal['loss_before']:.4g} → {heal['loss_after']:.4g}" if heal else "–"
            ppl = m["perplexity"]["value"]
            lines.append(
                f"| {keep} | {label} | {changes.get('experts_after', '')} | {ppl:.3f} | {(ppl - base_ppl) / base_ppl:+.1%} "
                f"| {m['weight_bytes'] / 2**20:.2f} | {m.get('compress_seconds', 0):.1f} | {heal_text} |"
            )
    return "\n".join(lines)


def time_calibration(s) -> float:
    """Seconds of one uncached pass gathering what every row reads (the runner does it once, before the runs)."""
    import time

    import torch
    from moebench.calibration import Calibration
    from moebench.plugins import host
    from moebench.runner import load_model

    torch.set_num_threads(s.hardware.threads or torch.get_num_threads())
    needs = sorted({n for r in s.runs() for step in r.pipeline for n in host().method(step.method)().needs(step.params)})
    model = load_model(s)
    cal = Calibration(s.calibration, cache=False)
    cal.windows(model.tokenizer)
    t0 = time.perf_counter()
    cal.stats(model, needs)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:deepseek_v2")
    ap.add_argument("--data", default="embedded:prose")
    ap.add_argument("--keep", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--steps", type=int, default=100, help="healing steps for the healed rows")
    # tuned on this toy model (100 steps; 1e-4/3e-4 for experts and 1e-3 for adapters heal less):
    # larger than the healing defaults, which are meant to be safe on real checkpoints
    ap.add_argument("--lr-experts", type=float, default=1e-3, help="healing learning rate when merged expert weights train")
    ap.add_argument("--lr-adapters", type=float, default=3e-3, help="healing learning rate when only new adapters train")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("reports/fusion-table"))
    ap.add_argument("--resume", action="store_true", help="reuse finished runs in --out")
    args = ap.parse_args()

    s = parse_suite(suite(args), "bench/fusion_table.py")
    calibration_seconds = time_calibration(s)
    result = run_suite(s, RunOptions(out=args.out, resume=args.resume, log=lambda m: print(m, flush=True)))
    from moebench.store import read_records

    records = records_of(read_records(args.out / "results.jsonl"))
    text = table(records, args.keep) + f"\n\nOne calibration pass gathering every statistic above, shared by all runs: {calibration_seconds:.1f} s."
    print()
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "suite.json").write_text(json.dumps(suite(args), indent=2))
    failed = [r.name for r in result.records if not r.ok]
    if failed:
        print("failed:", ", ".join(failed))


if __name__ == "__main__":
    main()
