"""Where a zoo build's training step spends its time: seconds per step and the top ops by self CPU time.

Builds the entry's untrained model as ``moebench zoo build`` does and steps it with the
build's own ``zoo.train_step`` (eager per-expert loop, half prose and half code per batch,
the build's optimizer groups and schedule), runs ``--warmup`` steps, times ``--steps``
steps, then profiles ``--profile`` steps with ``torch.profiler``. docs/benchmarks.md
("Recipe 3", build times) quotes its output.

    python bench/zoo_train_profile.py [--name deepseek_v2] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import moebench  # noqa: F401  (OpenMP defaults before torch)
import torch
from torch.profiler import ProfilerActivity, profile

from moebench import zoo


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
    streams = zoo.train_streams(zoo.tokenizer(0))
    model = zoo.init_model(spec, 0)
    opt, params = zoo.training_setup(spec, model)
    gen = torch.Generator().manual_seed(0)
    model.train()
    total = args.warmup + args.steps + args.profile
    done = iter(range(total))

    def step():  # the build's own step (batch, loss, schedule, update) over a run as long as this one
        zoo.train_step(spec, model, opt, params, streams, gen, next(done), total)

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
