"""Paper reference records: a suite's [[reference]] figures validate, show in report, never gate compare."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moebench.cli import app
from moebench.compare import compare
from moebench.errors import SuiteError
from moebench.render import render
from moebench.reference import suite_records
from moebench.suite import load_suite

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = """
[[reference]]
name = "baseline"
source = "paper"
paper = "Some MoE paper"
arxiv = "2406.02500"
table = "Table 2"
row = "Baseline"
setting = "0-shot"
metrics = { perplexity = 9.5, "lm_eval.pydoc_mc.acc" = 0.61 }
"""


def suite(tmp_path: Path, reference: str = REFERENCE, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent("""
        [suite]
        name = "ci"
        [model]
        source = "zoo:deepseek_v2"
        [calibration]
        samples = 4
        [eval.perplexity]
        seqlen = 32
        [[methods]]
        name = "drop"
        method = "expert_drop"
        params = { keep_ratio = 0.5 }
    """) + reference)
    return path


def record(name: str, ppl: float, acc: float) -> dict:
    return {"run_id": f"id-{name}", "suite": "ci", "name": name, "status": "ok",
            "pipeline": [] if name == "baseline" else [{"method": "expert_drop", "params": {}}],
            "model": {"source": "zoo:deepseek_v2", "dtype": "float32"},
            "metrics": {"perplexity": {"value": ppl}, "lm_eval": {"pydoc_mc": {"acc": acc}}}, "error": None}


RUNS = [record("baseline", 10.0, 0.60), record("drop", 12.0, 0.55)]


@pytest.mark.parametrize("name", ["deepseek_lite", "mixtral", "deepseek_v3"])
def test_gpu_suites_with_reference_records_validate(name):
    s = load_suite(ROOT / "suites" / f"{name}.toml")
    assert s.references and all(r.source == "paper" and r.arxiv and r.table and r.row for r in s.references)
    assert {r.name for r in s.references} <= {run.name for run in s.runs()}
    # every paper figure stands beside a column the suite measures (lm-eval tasks named in its [eval.lm_eval])
    tasks = set(getattr(s.evals.get("lm_eval"), "tasks", None) or [])
    for ref in s.references:
        for metric in ref.metrics:
            assert metric == "perplexity" or metric.split(".")[1] in tasks, (name, metric)


def test_references_do_not_change_run_ids(tmp_path):
    with_refs, without = load_suite(suite(tmp_path)), load_suite(suite(tmp_path, "", "plain.toml"))
    assert [r.run_id for r in with_refs.runs()] == [r.run_id for r in without.runs()]


@pytest.mark.parametrize("entry, field, wanted", [
    ('source = "paper"', "reference[0].source", "expected 'paper'"),
    ('arxiv = "2406.02500"', "reference[0].arxiv", "arXiv id"),
    ('name = "baseline"', "reference[0].name", "no run 'baselin'"),
    ('perplexity = 9.5', "reference[0].metrics.perplexity", "finite number"),
    ('table = "Table 2"\n', "reference[0].table", "missing"),
    ('row = "Baseline"', "reference[0].rows", "unknown field"),
])
def test_bad_reference_entries_give_one_line_errors(tmp_path, entry, field, wanted):
    bad = {
        "reference[0].source": 'source = "measured"',
        "reference[0].arxiv": 'arxiv = "soon"',
        "reference[0].name": 'name = "baselin"',
        "reference[0].metrics.perplexity": 'perplexity = "9.5"',
        "reference[0].table": "",
        "reference[0].rows": 'rows = "Baseline"',
    }[field]
    with pytest.raises(SuiteError) as exc:
        load_suite(suite(tmp_path, REFERENCE.replace(entry, bad)))
    message = str(exc.value)
    assert field in message and wanted in message and "\n" not in message


def test_report_shows_paper_rows_labelled_without_deltas(tmp_path):
    refs = [r.to_dict() for r in suite_records(load_suite(suite(tmp_path)))]
    md = render(RUNS + refs, "markdown")
    row = next(line for line in md.splitlines() if line.startswith("| baseline (paper"))
    assert "| paper |" in row and "9.5" in row and "%)" not in row  # no change against the measured baseline
    assert "Some MoE paper, arXiv 2406.02500, Table 2, row Baseline; setting: 0-shot" in md
    assert "Failed runs" not in md
    html = render(RUNS + refs, "html")
    assert 'class="paper"' in html and "Some MoE paper" in html
    result = CliRunner().invoke(app, ["report", str(_write(tmp_path, RUNS)), "--suite", str(suite(tmp_path))], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "│ paper │" in text and "Some MoE paper, arXiv 2406.02500, Table 2, row Baseline" in text


def test_compare_lists_paper_figures_but_never_gates_on_them(tmp_path):
    refs = [r.to_dict() for r in suite_records(load_suite(suite(tmp_path)))]
    # paper figures far from the measured ones, in the new results and the baseline: still a pass
    result = compare(RUNS + refs, RUNS + refs, references=refs)
    assert result.passed and result.runs == 2
    papers = result.of("paper")
    assert {(f.run, f.metric, f.base, f.new) for f in papers} == {("baseline", "perplexity", 9.5, 10.0), ("baseline", "lm_eval.pydoc_mc.acc", 0.61, 0.60)}
    assert not any(f.blocking for f in papers) and "2 paper figure(s) shown, not gated" in result.summary()
    # a reference is never a baseline run, so it is never missing from the new results
    assert compare(RUNS, refs).passed and compare(RUNS, refs).runs == 0
    out = CliRunner().invoke(app, ["compare", str(_write(tmp_path, RUNS)), str(_write(tmp_path, RUNS, "b.jsonl")), "--suite", str(suite(tmp_path))], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    assert "paper figure (not gated)" in out.output and "paper 9.5 → 10" in out.output


def _write(tmp_path: Path, records: list[dict], name: str = "r.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_leaderboard_shows_paper_rows_beside_measured_ones_never_ranked(tmp_path):
    from moebench import leaderboard

    refs = [r.to_dict() for r in suite_records(load_suite(suite(tmp_path)))]
    (board,) = leaderboard.boards(RUNS + refs)
    assert [e.config for e in board.entries] == ["baseline", "expert_drop()"]  # ranked: measured runs only
    assert [e.config for e in board.papers] == ["baseline (paper, arXiv 2406.02500)"]
    assert board.papers[0].delta is None and not board.papers[0].front
    md = leaderboard.markdown([board])
    row = next(line for line in md.splitlines() if "(paper, arXiv" in line)
    assert row.startswith("| paper | baseline (paper, arXiv 2406.02500) | 9.5 |") and "%)" not in row
    assert "- baseline (paper, arXiv 2406.02500): Some MoE paper, arXiv 2406.02500, Table 2, row Baseline" in md
    assert 'class="paper"' in leaderboard.html([board])
    # a model no measured run has: its paper figures get a board of their own
    other = [{**r, "model": {"source": "mistralai/Mixtral-8x7B-v0.1", "dtype": "bfloat16"}} for r in refs]
    boards = leaderboard.boards(RUNS + other)
    assert [(b.model, len(b.entries), len(b.papers)) for b in boards] == [("zoo:deepseek_v2", 2, 0), ("mistralai/Mixtral-8x7B-v0.1 (bfloat16)", 0, 1)]
    # the CLI reads them from --suite
    out = CliRunner().invoke(app, ["leaderboard", str(_write(tmp_path, RUNS)), "--suite", str(suite(tmp_path))])
    assert out.exit_code == 0, out.output
    assert "| paper | baseline (paper, arXiv 2406.02500) | 9.5 |" in out.output
