"""Where a zoo build's training step spends its time: seconds per step and the top ops by self CPU time.

Builds the entry's untrained model as ``moebench zoo build`` does (eager per-expert loop,
the entry's batch of half prose, half code), runs ``--warmup`` steps, times ``--steps``
steps, then profiles ``--profile`` steps with ``torch.profiler``. docs/benchmarks.md
("Recipe 3", build times) quotes its output.

    python bench/zoo_train_profile.py [--name deepseek_v2] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import moebench  # noqa: F401  (OpenMP defaults before torch)
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from moebench import corpus, zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="deepseek_v2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = zoo.entry(args.name)
    streams = [zoo._stream(zoo.tokenizer(0), d, "train") for d in corpus.DOMAINS]
    torch.manual_seed(0)
    model = spec.cls(spec.config())
    model.set_experts_implementation("eager")
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    gen = torch.Generator().manual_seed(0)
    half, top_k = spec.batch_size // 2, model.config.num_experts_per_tok

    def step():
        batch = torch.cat([
            torch.stack([s[i : i + spec.seq_len] for i in torch.randint(0, s.numel() - spec.seq_len, (n,), generator=gen).tolist()])
            for s, n in zip(streams, (half, spec.batch_size - half))
        ])
        out = model(input_ids=batch, output_router_logits=True)
        logits = out.logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss = loss + spec.balance_coef * zoo._balance_loss(out.router_logits, top_k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    print(f"zoo:{args.name}, {args.threads} threads: {(time.perf_counter() - t0) / args.steps:.3f} s per step "
          f"({spec.batch_size} x {spec.seq_len} tokens)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
