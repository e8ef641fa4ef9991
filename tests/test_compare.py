"""The regression gate: directions, tolerance kinds, missing and failed runs, the CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moebench.compare import CompareSpec, Tolerance, compare, compare_spec_from_suite, parse_compare, parse_tolerance_arg
from moebench.errors import MoebenchError, SuiteError
from moebench.runner import RunOptions, run_suite
from moebench.store import read_records
from moebench.suite import load_suite
from conftest import suite_file


def record(name, ppl=10.0, acc=0.5, weight_bytes=1000, status="ok", run_id=None, **extra):
    """A result record shaped like the runner's (figures chosen by each test)."""
    metrics = {
        "perplexity": {"value": ppl, "data": "embedded:prose", "seqlen": 128},
        "lm_eval": {"pydoc_mc": {"acc": acc, "acc_stderr": 0.02}},
        "weight_bytes": weight_bytes,
        "params": {"total": weight_bytes // 4, "active": weight_bytes // 8},
        "compress_seconds": 1.0,
        "speed": {"decode_tok_s": 100.0},
        **extra,
    }
    return {
        "run_id": run_id or f"id-{name}",
        "suite": "ci",
        "name": name,
        "status": status,
        "pipeline": [] if name == "baseline" else [{"method": "expert_drop", "params": {}}],
        "metrics": metrics if status == "ok" else {},
        "error": None if status == "ok" else "RuntimeError: boom",
    }


BASE = [record("baseline", 10.0, 0.60, 1000), record("drop", 12.0, 0.55, 600), record("layer", 11.0, 0.58, 800)]


def kinds(result, blocking_only=False):
    return sorted((f.kind, f.run, f.metric) for f in result.findings if f.kind != "same" and (f.blocking or not blocking_only))


def test_identical_results_pass():
    result = compare(copy.deepcopy(BASE), BASE)
    assert result.passed and not result.improvements
    assert result.runs == 3 and result.gated > 0
    assert "PASS" in result.summary()


def test_perplexity_worse_than_tolerance_regresses_and_better_improves():
    new = copy.deepcopy(BASE)
    new[1]["metrics"]["perplexity"]["value"] = 12.0 * 1.05  # +5% against the default 1%
    new[2]["metrics"]["perplexity"]["value"] = 11.0 * 0.9  # lower perplexity: better
    result = compare(new, BASE)
    assert not result.passed
    assert [(f.run, f.metric) for f in result.regressions] == [("drop", "perplexity")]
    assert [(f.run, f.metric) for f in result.improvements] == [("layer", "perplexity")]
    assert "+5.00%" in result.regressions[0].change


def test_direction_higher_accuracy_is_better():
    new = copy.deepcopy(BASE)
    new[1]["metrics"]["lm_eval"]["pydoc_mc"]["acc"] = 0.50  # -0.05, default abs tolerance 0.02
    new[2]["metrics"]["lm_eval"]["pydoc_mc"]["acc"] = 0.65  # +0.07
    new[2]["metrics"]["lm_eval"]["pydoc_mc"]["acc_stderr"] = 0.5  # error bars are never gated
    result = compare(new, BASE)
    assert [(f.run, f.metric) for f in result.regressions] == [("drop", "lm_eval.pydoc_mc.acc")]
    assert [(f.run, f.metric) for f in result.improvements] == [("layer", "lm_eval.pydoc_mc.acc")]
    # a declared direction overrides the built-in one
    spec = CompareSpec().with_overrides([Tolerance("lm_eval.*", abs=0.02, better="lower")])
    flipped = compare(new, BASE, spec)
    assert [(f.run) for f in flipped.regressions] == ["layer"]


def test_relative_and_absolute_tolerance_kinds():
    new = copy.deepcopy(BASE)
    new[1]["metrics"]["perplexity"]["value"] = 12.0 + 0.5  # +4.2%, +0.5 absolute
    rel_tight = CompareSpec().with_overrides([Tolerance("perplexity", rel=0.03)])
    rel_loose = CompareSpec().with_overrides([Tolerance("perplexity", rel=0.05)])
    abs_tight = CompareSpec().with_overrides([Tolerance("perplexity", abs=0.4)])
    abs_loose = CompareSpec().with_overrides([Tolerance("perplexity", abs=0.6)])
    both = CompareSpec().with_overrides([Tolerance("perplexity", rel=0.01, abs=0.6)])  # the larger allowance wins
    assert not compare(new, BASE, rel_tight).passed
    assert compare(new, BASE, rel_loose).passed
    assert not compare(new, BASE, abs_tight).passed
    assert compare(new, BASE, abs_loose).passed
    assert compare(new, BASE, both).passed


def test_sizes_are_exact_and_timings_not_gated_by_default():
    new = copy.deepcopy(BASE)
    new[1]["metrics"]["weight_bytes"] = 601  # one byte more than the baseline: a regression
    new[1]["metrics"]["compress_seconds"] = 100.0
    new[1]["metrics"]["speed"]["decode_tok_s"] = 1.0
    result = compare(new, BASE)
    assert [(f.run, f.metric) for f in result.regressions] == [("drop", "weight_bytes")]
    assert "compress_seconds" in result.ungated and "speed.decode_tok_s" in result.ungated
    gated = compare(new, BASE, CompareSpec().with_overrides([Tolerance("speed.*", rel=0.5)]))
    assert ("drop", "speed.decode_tok_s") in [(f.run, f.metric) for f in gated.regressions]


def test_missing_new_failed_runs_and_missing_metrics():
    new = [record("baseline", 10.0, 0.60, 1000), record("drop", status="failed"), record("extra", 9.0)]
    result = compare(new, BASE)
    assert kinds(result, blocking_only=True) == [("failed", "drop", ""), ("missing_run", "layer", "")]
    assert ("new_run", "extra", "") in kinds(result)
    warned = compare(new, BASE, CompareSpec(missing="warn"))
    assert kinds(warned, blocking_only=True) == [("failed", "drop", "")]  # a failure still fails
    no_ppl = copy.deepcopy(BASE)
    del no_ppl[2]["metrics"]["perplexity"]
    assert kinds(compare(no_ppl, BASE), blocking_only=True) == [("missing_metric", "layer", "perplexity")]
    # a run that failed in the baseline and works now is an improvement, not a comparison
    fixed = compare(BASE, [BASE[0], record("drop", status="failed"), BASE[2]])
    assert fixed.passed and [f.kind for f in fixed.improvements] == ["fixed"]


def test_non_finite_perplexity_regresses():
    new = copy.deepcopy(BASE)
    new[1]["metrics"]["perplexity"]["value"] = float("inf")
    assert [(f.run, f.metric) for f in compare(new, BASE).regressions] == [("drop", "perplexity")]


def test_changed_configuration_is_flagged_but_compared():
    new = copy.deepcopy(BASE)
    new[1]["run_id"] = "other"
    result = compare(new, BASE)
    assert result.passed and [f.run for f in result.of("config_changed")] == ["drop"]


def test_precedence_command_line_then_suite_then_defaults_exact_before_glob():
    spec = parse_compare({"tolerances": {"lm_eval.*": {"abs": 0.1}, "lm_eval.pydoc_mc.acc": {"abs": 0.3}, "perplexity": {"ignore": True}}})
    assert spec.tolerance_for("lm_eval.pydoc_mc.acc").abs == 0.3  # exact name before an earlier glob
    assert spec.tolerance_for("lm_eval.other.acc").abs == 0.1
    assert spec.tolerance_for("perplexity").ignore
    assert spec.tolerance_for("weight_bytes").source == "default"
    cli = spec.with_overrides([parse_tolerance_arg("lm_eval.*=abs:0.5")])
    assert cli.tolerance_for("lm_eval.other.acc").abs == 0.5
    assert parse_compare({"defaults": False, "tolerances": {"perplexity": {"rel": 0.1}}}).tolerance_for("weight_bytes") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("perplexity=rel:0.02", Tolerance("perplexity", rel=0.02, source="command line")),
        ("perplexity=2%", Tolerance("perplexity", rel=0.02, source="command line")),
        ("lm_eval.*.acc=abs:0.01", Tolerance("lm_eval.*.acc", abs=0.01, source="command line")),
        ("score=abs:0.1,higher", Tolerance("score", abs=0.1, better="higher", source="command line")),
        ("speed.*=ignore", Tolerance("speed.*", ignore=True, source="command line")),
    ],
)
def test_tolerance_arguments(text, expected):
    assert parse_tolerance_arg(text) == expected


@pytest.mark.parametrize("text", ["perplexity", "perplexity=", "perplexity=0.02", "perplexity=rel:x", "perplexity=rel:-1", "=rel:0.1"])
def test_bad_tolerance_arguments(text):
    with pytest.raises(MoebenchError, match="--tol"):
        parse_tolerance_arg(text)


@pytest.mark.parametrize(
    "table, field",
    [
        ({"tolerances": {"perplexity": {"rell": 0.1}}}, "compare.tolerances.perplexity.rell"),
        ({"tolerances": {"perplexity": {"rel": -0.1}}}, "compare.tolerances.perplexity.rel"),
        ({"tolerances": {"perplexity": 0.1}}, "compare.tolerances.perplexity"),
        ({"tolerances": {"perplexity": {}}}, "compare.tolerances.perplexity"),
        ({"tolerances": {"x": {"abs": 1, "better": "up"}}}, "compare.tolerances.x.better"),
        ({"missing": "ignore"}, "compare.missing"),
        ({"tolerance": {}}, "compare.tolerance"),
    ],
)
def test_bad_compare_tables_name_the_field(table, field):
    with pytest.raises(SuiteError) as info:
        parse_compare(table, "s.toml")
    assert info.value.field == field and str(info.value).startswith(f"s.toml: {field}: ")


def test_suite_compare_table_is_read(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[model]\nsource = "zoo:deepseek_v2"\n[compare]\nmissing = "warn"\n[compare.tolerances]\nperplexity = { rel = 0.05 }\n')
    spec = compare_spec_from_suite(path)
    assert spec.missing == "warn" and spec.tolerance_for("perplexity").rel == 0.05


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.slow  # 14-61 CPU s on the 2-core box (issue #13: the fast set under 5 minutes)
def test_cli_exit_codes_and_markdown(tmp_path):
    base = _write(tmp_path / "base.jsonl", BASE)
    same = _write(tmp_path / "same.jsonl", copy.deepcopy(BASE))
    worse = copy.deepcopy(BASE)
    worse[1]["metrics"]["perplexity"]["value"] *= 1.05
    worse = _write(tmp_path / "worse.jsonl", worse)
    suite = tmp_path / "s.toml"
    suite.write_text(textwrap.dedent("""
        [model]
        source = "zoo:deepseek_v2"
        [compare.tolerances]
        perplexity = { rel = 0.10 }
    """))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "moebench.cli", "compare", *args], capture_output=True, text=True)

    ok = cli(same, base)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS" in ok.stdout
    bad = cli(worse, base, "--markdown", str(tmp_path / "summary.md"))
    assert bad.returncode == 1 and "regressed" in bad.stdout and "perplexity" in bad.stdout
    assert "FAIL" in (tmp_path / "summary.md").read_text()
    assert cli(worse, base, "--suite", str(suite)).returncode == 0  # the suite allows 10%
    assert cli(worse, base, "--suite", str(suite), "--tol", "perplexity=rel:0.01").returncode == 1  # the command line wins
    usage = cli(worse, base, "--tol", "perplexity")
    assert usage.returncode == 2 and "error: --tol 'perplexity'" in usage.stderr


ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "reports" / "baselines" / "ci.jsonl"


def test_committed_ci_baseline_catches_a_planted_regression(tmp_path):
    base = list(read_records(COMMITTED))
    assert [r["name"] for r in base][0] == "baseline" and all(r["status"] == "ok" for r in base)
    spec = compare_spec_from_suite(ROOT / "suites" / "ci.toml")
    assert compare(copy.deepcopy(base), base, spec).passed
    planted = copy.deepcopy(base)
    planted[1]["metrics"]["perplexity"]["value"] *= 1 + 2 * spec.tolerance_for("perplexity").rel
    result = compare(planted, base, spec)
    assert [(f.run, f.metric) for f in result.regressions] == [(base[1]["name"], "perplexity")]
    lost = copy.deepcopy(base)[:-1]  # a run that vanished (e.g. a method that now fails to register)
    assert [f.kind for f in compare(lost, base, spec).regressions] == ["missing_run"]


def test_an_identical_rerun_passes_the_gate(tmp_path, checkpoint):
    path = suite_file(tmp_path, checkpoint("olmoe"), max_samples=4, methods="""
        [[methods]]
        name = "drop"
        method = "expert_drop"
        params = { keep_ratio = 0.5 }
        [compare.tolerances]
        perplexity = { rel = 0.0 }
    """)
    for out in ("a", "b"):
        run_suite(load_suite(path), RunOptions(out=tmp_path / out, log=lambda m: None))
    spec = compare_spec_from_suite(path)
    result = compare(list(read_records(tmp_path / "b")), list(read_records(tmp_path / "a")), spec)
    assert result.passed and result.gated >= 10 and not result.improvements, result.summary()
