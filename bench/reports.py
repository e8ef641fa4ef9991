"""How long the result tools take as results pile up: report formats, compare, leaderboard, merge.

Replicates a results file (default: the committed CI baseline) as if it came from many
commits and machines, then times each tool on the whole pile in this process.

    python bench/reports.py [RESULTS] [--copies 1 10 100]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from moebench import leaderboard, render
from moebench.compare import compare
from moebench.record import records_of
from moebench.shard import merge
from moebench.store import read_records

ROOT = Path(__file__).resolve().parents[1]


def pile(records: list[dict], copies: int) -> list[dict]:
    out = []
    for i in range(copies):
        for r in records_of(copy.deepcopy(records)):
            r.env = {**r.environment, "git_commit": f"{i:07x}", "device_name": f"machine-{i % 3}"}
            out.append(r.to_dict())
    return out


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default=str(ROOT / "reports" / "baselines" / "ci.jsonl"))
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 10, 100])
    args = parser.parse_args()
    base = list(read_records(args.results))
    print(f"{args.results}: {len(base)} records per copy")
    print(f"{'copies':>7} {'records':>8} {'markdown':>9} {'csv':>7} {'html':>7} {'html KiB':>9} {'compare':>8} {'leaderbd':>9} {'merge':>7}")
    for n in args.copies:
        records = pile(base, n)
        t_md, _ = timed(render.markdown, records)
        t_csv, _ = timed(render.csv, records)
        t_html, page = timed(render.html, records)
        t_cmp, _ = timed(compare, records, base)
        t_lb, _ = timed(lambda r: leaderboard.html(leaderboard.boards(r)), records)
        t_merge, _ = timed(merge, [records[: len(records) // 2], records[len(records) // 2 :]])
        print(f"{n:>7} {len(records):>8} {t_md:>8.2f}s {t_csv:>6.2f}s {t_html:>6.2f}s {len(page) / 1024:>9.0f} {t_cmp:>7.3f}s {t_lb:>8.2f}s {t_merge:>6.3f}s")


if __name__ == "__main__":
    main()
