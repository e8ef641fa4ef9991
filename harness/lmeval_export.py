"""lm-eval's results JSON, one file per run, from moebench records (``moebench report --format lm-eval``).

Tools built around lm-evaluation-harness read its ``results_<date>.json``: ``results``
(``{task: {"metric,filter": value, "metric_stderr,filter": value}}``), ``versions``,
``n-shot``, ``n-samples`` and ``config``. A record's ``lm_eval`` scores hold the same
numbers under moebench's names (``acc``, ``acc_stderr``; a non-default filter as
``acc/<filter>``), so the file is rebuilt from the record; ``config.moebench`` says which
run, pipeline and model it came from. lm-eval's own ``make_table`` renders it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .model_card import folder_name


def results_json(record: dict[str, Any]) -> dict[str, Any] | None:
    """lm-eval's results dict for one record, or None when the record has no lm-eval scores."""
    scores = (record.get("metrics") or {}).get("lm_eval")
    if not isinstance(scores, dict) or not scores:
        return None
    info = (record.get("metrics") or {}).get("lm_eval_info") or {}
    env = record.get("env") or {}
    results = {}
    for task, row in scores.items():
        out: dict[str, Any] = {"alias": task}
        for name, value in (row or {}).items():
            metric, _, filt = name.partition("/")
            out[f"{metric},{filt or 'none'}"] = "N/A" if value is None else value
        results[task] = out
    model = record.get("model") or {}
    params = (record.get("evals") or {}).get("lm_eval") or {}
    return {
        "results": results,
        "versions": {task: None for task in results},
        "n-shot": {t: n for t, n in (info.get("num_fewshot") or {}).items() if t in results},
        "n-samples": {t: {"original": n, "effective": n} for t, n in (info.get("samples") or {}).items() if t in results},
        "config": {
            "model": "hf",
            "model_args": f"pretrained={model.get('source')},dtype={model.get('dtype')}",
            "batch_size": params.get("batch_size"),
            "limit": info.get("limit", params.get("limit")),
            "bootstrap_iters": params.get("bootstrap_iters"),
            "moebench": {k: record.get(k) for k in ("suite", "name", "run_id", "pipeline", "status")},
        },
        "git_hash": env.get("git_commit"),
        "date": record.get("finished"),
        "model_name": f"{model.get('source')} [{record.get('name')}]",
        "transformers_version": env.get("transformers"),
        "lm_eval_version": env.get("lm_eval"),
    }


def write(records: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """``out_dir/<run name>-<run id>/results_<finished>.json`` for every record with lm-eval scores."""
    written = []
    for record in records:
        data = results_json(record)
        if data is None:
            continue
        folder = Path(out_dir) / folder_name(str(record.get("name")), str(record.get("run_id")))
        folder.mkdir(parents=True, exist_ok=True)
        stamp = str(record.get("finished") or "unknown").replace(":", "-")
        path = folder / f"results_{stamp}.json"
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        written.append(path)
    return written
