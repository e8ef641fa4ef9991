"""lm-eval's results JSON, one file per run, from moebench records (``moebench report --format lm-eval``,
an export format the lm-eval metric registers with ``register_export_formats``).

Tools built around lm-evaluation-harness read its ``results_<date>.json``: ``results``
(``{task: {"metric,filter": value, "metric_stderr,filter": value}}``), ``versions``,
``n-shot``, ``n-samples`` and ``config``. A record's ``lm_eval`` scores hold the same
numbers under moebench's names (``acc``, ``acc_stderr``; a non-default filter as
``acc/<filter>``), so the file is rebuilt from the record; ``config.moebench`` says which
run, pipeline and model it came from. lm-eval's own ``make_table`` renders it. A run
measured with ``log_samples = true`` also gets its ``samples_<task>_<date>.jsonl`` copied
beside that file, as lm-eval lays out its own output folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from moebench.model_card import folder_name
from moebench.record import Record, records_of


def results_json(record: Record | dict[str, Any]) -> dict[str, Any] | None:
    """lm-eval's results dict for one record, or None when the record has no lm-eval scores."""
    rec = Record.from_dict(record)
    scores = rec.metrics.get("lm_eval")
    if not isinstance(scores, dict) or not scores:
        return None
    info = rec.metrics.get("lm_eval_info") or {}
    env = rec.environment
    results = {}
    for task, row in scores.items():
        out: dict[str, Any] = {"alias": task}
        for name, value in (row or {}).items():
            metric, _, filt = name.partition("/")
            out[f"{metric},{filt or 'none'}"] = "N/A" if value is None else value
        results[task] = out
    params = (rec.evals or {}).get("lm_eval") or {}
    return {
        "results": results,
        "versions": {task: None for task in results},
        "n-shot": {t: n for t, n in (info.get("num_fewshot") or {}).items() if t in results},
        "n-samples": {t: {"original": n, "effective": n} for t, n in (info.get("samples") or {}).items() if t in results},
        "config": {
            "model": "hf",
            "model_args": f"pretrained={rec.source},dtype={rec.dtype}",
            "batch_size": params.get("batch_size"),
            "limit": info.get("limit", params.get("limit")),
            "bootstrap_iters": params.get("bootstrap_iters"),
            "moebench": {"suite": rec.suite, "name": rec.name, "run_id": rec.run_id, "pipeline": rec.pipeline, "status": rec.status},
        },
        "git_hash": env.get("git_commit"),
        "date": rec.finished,
        "model_name": f"{rec.source} [{rec.name}]",
        "transformers_version": env.get("transformers"),
        "lm_eval_version": env.get("lm_eval"),
    }


def write(records: list[Record | dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """``out_dir/<run name>-<run id>/results_<finished>.json`` for every record with lm-eval scores."""
    written = []
    for rec in records_of(records):
        data = results_json(rec)
        if data is None:
            continue
        folder = Path(out_dir) / folder_name(str(rec.name), str(rec.run_id))
        folder.mkdir(parents=True, exist_ok=True)
        stamp = str(rec.finished or "unknown").replace(":", "-")
        path = folder / f"results_{stamp}.json"
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        written.append(path)
        for task, source in (((rec.metrics.get("lm_eval_info") or {}).get("files") or {}).get("samples") or {}).items():
            if Path(source).is_file():  # lm-eval's per-sample log of the run ([eval.lm_eval] log_samples), beside its results
                shutil.copyfile(source, folder / f"samples_{task}_{stamp}.jsonl")
    return written
