"""Suite parsing: the schema, grid expansion, and one-line errors that name file, field and expectation."""

from __future__ import annotations

import textwrap

import pytest

from moebench.errors import MoebenchError
from moebench.suite import load_suite

BASE = """
[suite]
name = "t"
[model]
source = "zoo:deepseek_v2"
[calibration]
samples = 4
seqlen = 32
[eval.perplexity]
seqlen = 32
max_samples = 4
"""


def write(tmp_path, text: str):
    path = tmp_path / "suite.toml"
    path.write_text(textwrap.dedent(text))
    return path


def suite_error(tmp_path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(MoebenchError) as info:
        load_suite(path)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    assert str(path) in message, "errors name the file"
    return message


def test_grid_and_pipeline_expansion(tmp_path):
    s = load_suite(write(tmp_path, BASE + """
        [[methods]]
        name = "drop"
        method = "expert_drop"
        params = { keep_ratio = [0.75, 0.5], criterion = ["frequency", "score"] }

        [[methods]]
        name = "drop-then-block"
        pipeline = [{ method = "expert_drop", keep_ratio = 0.5 }, { method = "block_drop", n = [1, 2] }]
    """))
    runs = s.runs()
    assert runs[0].name == "baseline" and runs[0].is_baseline
    assert [r.name for r in runs[1:5]] == [
        "drop[keep_ratio=0.75,criterion=frequency]",
        "drop[keep_ratio=0.75,criterion=score]",
        "drop[keep_ratio=0.5,criterion=frequency]",
        "drop[keep_ratio=0.5,criterion=score]",
    ]
    assert [r.pipeline[1].params.n for r in runs[5:]] == [1, 2]
    assert runs[5].pipeline[0].params.keep_ratio == 0.5
    ids = [r.run_id for r in runs]
    assert len(set(ids)) == len(ids), "run ids are distinct"
    assert ids == [r.run_id for r in load_suite(write(tmp_path, s.raw and open(s.path).read())).runs()], "and stable"


def test_run_id_changes_with_what_shapes_the_numbers(tmp_path):
    a = load_suite(write(tmp_path, BASE)).runs()[0].run_id
    b = load_suite(write(tmp_path, BASE.replace("max_samples = 4", "max_samples = 5"))).runs()[0].run_id
    assert a != b


@pytest.mark.parametrize(
    "snippet, field, expected",
    [
        ("[[methods]]\nname='x'\nmethod='expert_dorp'\n", "methods[0].method", "did you mean 'expert_drop'"),
        ("[[methods]]\nname='x'\nmethod='expert_drop'\nparams={keep_ratoi=0.5}\n", "methods[0].params.keep_ratoi", "did you mean 'keep_ratio'"),
        ("[[methods]]\nname='x'\nmethod='expert_drop'\nparams={keep_ratio='half'}\n", "methods[0].params.keep_ratio", "expected float"),
        ("[[methods]]\nname='x'\nmethod='expert_drop'\nparams={keep_ratio=1.5}\n", "methods[0].params.keep_ratio", "(0, 1]"),
        ("[[methods]]\nname='x'\nmethod='expert_drop'\nparams={criterion='freq'}\n", "methods[0].params.criterion", "'frequency'"),
        ("[[methods]]\nname='x'\npipeline=[{method='layer_drop', n=0}]\n", "methods[0].pipeline[0].n", ">= 1"),
        ("[[methods]]\nname='x'\n", "methods[0]", "exactly one of method"),
        ("[[methods]]\nname='x'\nmethod='layer_drop'\n[[methods]]\nname='x'\nmethod='block_drop'\n", "methods[1].name", "duplicate"),
        ("[evals.perplexity]\n", "evals", "did you mean 'eval'"),
        ("[eval.perplexty]\n", "eval.perplexty", "did you mean 'perplexity'"),
    ],
)
def test_errors_name_field_and_expectation(tmp_path, snippet, field, expected):
    message = suite_error(tmp_path, BASE + snippet)
    assert f": {field}: " in message
    assert expected in message


@pytest.mark.parametrize(
    "old, new, field, expected",
    [
        ('source = "zoo:deepseek_v2"', 'source = "zoo:deepsek_v2"', "model.source", "did you mean 'deepseek_v2'"),
        ('source = "zoo:deepseek_v2"', 'source = "./no/such/folder"', "model.source", "neither zoo:NAME"),
        ('source = "zoo:deepseek_v2"', 'source = "zoo:deepseek_v2?step=9"', "model.source", "zoo:NAME?steps=N"),
        ('[model]\n', '[model]\ndtype = "fp32"\n', "model.dtype", "expected one of float32"),
        ('[model]\n', '[model]\ndevice = "gpu"\n', "model.device", "cpu | cuda"),
        ('[model]\n', '[model]\nsorce = "x"\n', "model.sorce", "did you mean 'source'"),
        ('samples = 4', 'samples = 0', "calibration.samples", "positive integer"),
        ('[calibration]\n', '[calibration]\ndata = "embeded:prose"\n', "calibration.data", "did you mean 'embedded'"),
        ('[calibration]\n', '[calibration]\ndata = "prose"\n', "calibration.data", "SCHEME:ARG"),
    ],
)
def test_model_and_data_errors(tmp_path, old, new, field, expected):
    message = suite_error(tmp_path, BASE.replace(old, new, 1))
    assert f": {field}: " in message and expected in message


def test_missing_model_table_and_calibration(tmp_path):
    assert "missing [model] table" in suite_error(tmp_path, "[suite]\nname='x'\n")
    text = BASE.split("[calibration]")[0] + "[[methods]]\nname='d'\nmethod='expert_drop'\n"
    assert "needs calibration data" in suite_error(tmp_path, text)


def test_toml_syntax_error_names_file(tmp_path):
    assert "not valid TOML" in suite_error(tmp_path, "[suite\nname=")


def test_missing_file(tmp_path):
    with pytest.raises(MoebenchError, match="suite file not found"):
        load_suite(tmp_path / "nope.toml")


def test_list_typed_parameter_is_a_value_not_an_axis():
    """A list for a parameter whose type is a list stays one value; other lists are grid axes."""
    from moebench.params import is_list_type

    assert is_list_type(list[str]) and is_list_type(list[str] | None)
    assert not is_list_type(float | None) and not is_list_type(int)


def test_shipped_suites_validate():
    from pathlib import Path

    suites = sorted((Path(__file__).parent.parent / "suites").glob("*.toml"))
    assert any(p.name == "quickstart.toml" for p in suites)
    for path in suites:
        load_suite(path)
