"""PreMoe on the zoo DeepSeek-V2 model with the embedded corpus's two domains as tasks.

Prints, as Markdown tables:

1. retrieval accuracy: held-out queries of each domain (windows at seeded random offsets
   of its validation split) routed through the full model, and whether the FAISS index
   returns that domain's task; for several query lengths, key layers and distances;
2. test perplexity of each domain at the same expert count with: the full model;
   task-agnostic frequency expert drop calibrated on both domains in equal shares
   (``mix:``); PreMoe with the task's own pattern; PreMoe with the pattern retrieved
   from one held-out query of the task (what ``suites/premoe.toml`` runs), and from the
   first tokens of its validation split; and, for reference, PreMoe with the other
   task's pattern and frequency drop calibrated on the task's own text.

    python bench/premoe_tasks.py [--model zoo:deepseek_v2] [--keep 8 4] [--threshold 0.0] [--key-layer 0]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from moebench import models, premoe
from moebench.calibration import Calibration, CalibrationSpec
from moebench.data import encode, load_text, random_windows, windows
from moebench.method import Context
from moebench.plugins import host
from moebench_plugins.metrics import perplexity

TASKS = {"prose": premoe.TaskSpec("prose", "embedded:prose"), "code": premoe.TaskSpec("code", "embedded:code")}
MIX = "mix:embedded:prose,embedded:code"


def held_out_queries(model, task: premoe.TaskSpec, tokens: int, n: int, seed: int = 1) -> torch.Tensor:
    """``n`` query prompts of ``tokens`` tokens at seeded random offsets of the task's validation split."""
    return random_windows(encode(model.tokenizer, load_text(task.query_data, "validation")), tokens, n, seed)


def method_query(model, task: premoe.TaskSpec, tokens: int, seed: int = 0) -> torch.Tensor:
    """The prompt the premoe method routes for ``query = task``: a window at a seeded offset of the validation split."""
    return random_windows(encode(model.tokenizer, load_text(task.query_data, "validation")), tokens, 1, seed)


def first_query(model, task: premoe.TaskSpec, tokens: int) -> torch.Tensor:
    """The first ``tokens`` tokens of the validation split (the start of one document)."""
    return encode(model.tokenizer, load_text(task.query_data, "validation"))[:tokens][None]


def pruned(model, keep: dict[int, list[int]]):
    m = copy.deepcopy(model)
    for layer, experts in keep.items():
        m.keep_experts(layer, experts)
    return m


def expert_drop(model, keep: int, data: str, spec: CalibrationSpec):
    m = copy.deepcopy(model)
    method = host().method("expert_drop")()
    params = method.Params(keep=keep, keep_ratio=None, criterion="frequency")
    method.apply(m, params, Context(calibration=Calibration(CalibrationSpec(data, spec.samples, spec.seqlen, spec.seed))))
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:deepseek_v2")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows per task")
    ap.add_argument("--seqlen", type=int, default=128, help="calibration and evaluation window length")
    ap.add_argument("--eval-windows", type=int, default=40, help="test windows per domain")
    ap.add_argument("--queries", type=int, default=40, help="held-out queries per domain for retrieval accuracy")
    ap.add_argument("--query-tokens", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--retrieve-tokens", type=int, default=128, help="query length for the perplexity comparison (as the suite)")
    ap.add_argument("--key-layer", type=int, default=0, help="key layer for the perplexity comparison")
    ap.add_argument("--keep", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--threshold", type=float, default=0.0)
    args = ap.parse_args()
    torch.manual_seed(0)

    model = models.load(args.model)
    spec = CalibrationSpec(samples=args.samples, seqlen=args.seqlen)
    blocks = list(model.blocks())
    top_k, n_experts = blocks[0].top_k, blocks[0].num_experts
    print(f"model {args.model}: {len(blocks)} MoE layers x {n_experts} routed experts, top-{top_k}; faiss on {premoe.faiss_device()}")
    print(f"calibration per task: {args.samples} x {args.seqlen} tokens (train split); threshold r = {args.threshold}\n")

    # 1. retrieval accuracy: each query routed once, its scores tried against every index
    indexes = {
        (key_layer, metric): premoe.cached(model, TASKS, spec, premoe.IndexSettings(args.threshold, key_layer, metric))
        for key_layer in range(len(blocks))
        for metric in ("l2", "cosine")
    }
    hits = {(k, t): {name: 0 for name in TASKS} for k in indexes for t in args.query_tokens}
    for tokens in args.query_tokens:
        for name, task in TASKS.items():
            for q in held_out_queries(model, task, tokens, args.queries):
                scores = premoe.query_scores(model, q[None], args.threshold)
                for (key_layer, metric), index in indexes.items():
                    top = index.search(scores[blocks[key_layer].layer])[0][0]
                    hits[(key_layer, metric), tokens][name] += top == name
    print("retrieval accuracy (prose / code):\n")
    print("| key layer | distance | " + " | ".join(f"{t}-token queries" for t in args.query_tokens) + " |")
    print("|---|---|" + "---|" * len(args.query_tokens))
    for (key_layer, metric) in indexes:
        cells = [" / ".join(f"{hits[(key_layer, metric), t][n] / args.queries:.2f}" for n in TASKS) for t in args.query_tokens]
        print(f"| {key_layer} (layer {blocks[key_layer].layer}) | {metric} | " + " | ".join(cells) + " |")
    print(f"\n({args.queries} held-out queries per domain and length, at seeded random offsets of its validation split)\n")

    # 2. perplexity per task at the same expert count
    settings = premoe.IndexSettings(args.threshold, args.key_layer, "l2")
    index = premoe.cached(model, TASKS, spec, settings)
    evals = {name: windows(encode(model.tokenizer, load_text(t.data, "test")), args.seqlen, args.eval_windows) for name, t in TASKS.items()}

    def ppl(m) -> dict[str, float]:
        return {name: perplexity(m.model, ids) for name, ids in evals.items()}

    def per_task(make) -> dict[str, float]:
        """Each task evaluated on its own model (``make(task)``)."""
        return {name: ppl(make(name))[name] for name in TASKS}

    t0 = time.perf_counter()
    other = {a: next(b for b in TASKS if b != a) for a in TASKS}
    def retrieve(query) -> dict[str, str]:
        return {name: index.search(premoe.query_key(model, query(model, TASKS[name], args.retrieve_tokens), settings))[0][0] for name in TASKS}

    retrieved, from_start = retrieve(method_query), retrieve(first_query)
    rows = [("full model", f"{top_k}/{n_experts}", ppl(model))]
    for keep in args.keep:
        notation = f"{min(top_k, keep)}/{keep}"
        rows += [
            ("frequency drop, task-agnostic (both domains)", notation, ppl(expert_drop(model, keep, MIX, spec))),
            ("PreMoe, the task's own pattern", notation, per_task(lambda t, keep=keep: pruned(model, index.keep(t, keep)))),
            (
                "PreMoe, retrieved (" + ", ".join(f"{t} query -> {r}" for t, r in retrieved.items()) + ")",
                notation,
                per_task(lambda t, keep=keep: pruned(model, index.keep(retrieved[t], keep))),
            ),
            (
                "PreMoe, retrieved from the split's first tokens (" + ", ".join(f"{t} -> {r}" for t, r in from_start.items()) + ")",
                notation,
                per_task(lambda t, keep=keep: pruned(model, index.keep(from_start[t], keep))),
            ),
            ("PreMoe, the other task's pattern", notation, per_task(lambda t, keep=keep: pruned(model, index.keep(other[t], keep)))),
            ("frequency drop on the task's own text", notation, per_task(lambda t, keep=keep: expert_drop(model, keep, TASKS[t].data, spec))),
        ]
    print(f"test perplexity per task (PreMoe key layer {args.key_layer}, queries of {args.retrieve_tokens} tokens):\n")
    print("| experts kept per layer | active/kept | ppl prose | ppl code |")
    print("|---|---|---:|---:|")
    for label, notation, values in rows:
        print(f"| {label} | {notation} | {values['prose']:.3f} | {values['code']:.3f} |")
    print(f"\n(test split, {args.eval_windows} windows x {args.seqlen} tokens per domain; {time.perf_counter() - t0:.0f} s)")

if __name__ == "__main__":
    main()
