"""Hostile and careless input: each class of bad input gets a one-line error before any work.

Covers: code named by a checkpoint (never imported or run), paths outside the output
folder, inputs only found mid-run before, runs that would do nothing, tracebacks
instead of one line, silent skipping in reports, and a full disk mid-suite. Ends with a
fuzz test that mutates a valid suite 520 times (fixed seed) and runs ``validate``.
"""

from __future__ import annotations

import copy
import importlib.metadata as md
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moebench import cli
from moebench.errors import MoebenchError
from moebench.store import ResultStore, read_records

from conftest import make_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore")


# --------------------------------------------------------------------------- helpers


def moebench(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    """Run the console entry point in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["moebench", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str, *needles: str) -> str:
    """Assert a user error: exit 2, no traceback, one line saying ``error:`` and each needle."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


ZOO_SUITE = """
[suite]
name = "h"
[model]
source = "zoo:deepseek_v2"
[calibration]
samples = 4
seqlen = 32
[eval.perplexity]
seqlen = 32
max_samples = 4
"""


# --------------------------------------------------------------------------- 1. code from a checkpoint


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small real qwen2_moe checkpoint (3 layers) to make hostile copies of."""
    return make_checkpoint(tmp_path_factory.mktemp("hostile_ckpt"), "qwen2_moe", num_hidden_layers=3)


def hostile_copy(saved: Path, folder: Path, structure: dict) -> Path:
    import shutil

    dest = folder / "ckpt"
    shutil.copytree(saved, dest)
    config = json.loads((dest / "config.json").read_text())
    config["moebench"] = structure
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """An importable module that writes a marker file the moment it is imported."""
    marker = tmp_path / "IMPORTED"
    pkg = tmp_path / "evilpath"
    pkg.mkdir()
    (pkg / "moebench_evil_probe.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\nclass Thing:\n    def __init__(self, **kw):\n        open({str(marker)!r}, 'w').write('called')\n"
    )
    monkeypatch.syspath_prepend(str(pkg))
    return marker


def _entries(marker: Path) -> list[dict]:
    return [
        {"class": "moebench_evil_probe:Thing", "init": {}},
        {"class": "subprocess:Popen", "init": {"args": ["touch", str(marker)]}},
        {"class": "os:system", "init": {"command": f"touch {marker}"}},
        {"class": "builtins:eval", "init": {"source": f"open({str(marker)!r}, 'w')"}},
        {"class": "torch.nn:Linear", "init": {"in_features": 2, "out_features": 2}},  # harmless, still not registered
    ]


@pytest.mark.parametrize("i", range(5))
@pytest.mark.parametrize("loader", ["load_pretrained", "skeleton"])
def test_hostile_module_class_is_refused_without_importing_or_running_anything(saved, tmp_path, evil_module, i, loader):
    from moebench import checkpoint, models

    entry = _entries(evil_module)[i]
    ckpt = hostile_copy(saved, tmp_path, {"modules": {"model.layers.0.mlp": entry}})
    before = set(sys.modules)
    with pytest.raises(MoebenchError) as info:
        models.load_pretrained(ckpt) if loader == "load_pretrained" else checkpoint.skeleton(ckpt)
    message = str(info.value)
    assert "\n" not in message
    assert "model.layers.0.mlp" in message and entry["class"] in message and "allow-list" in message
    assert not evil_module.exists(), "the hostile entry ran code"
    assert "moebench_evil_probe" not in sys.modules
    assert set(sys.modules) - before <= {m for m in sys.modules if m.startswith(("transformers", "torch", "moebench"))}


def test_fused_block_naming_foreign_code_is_refused(saved, tmp_path, evil_module):
    """FusedMoE is on the allow-list, but its ``block`` argument may only name the model's own transformers class."""
    from moebench import models

    config = {"model_type": "qwen2_moe", **{k: v for k, v in json.loads((saved / "config.json").read_text()).items() if k in ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok", "num_attention_heads", "num_key_value_heads", "vocab_size", "shared_expert_intermediate_size")}}
    for block in ("moebench_evil_probe:Thing", "subprocess:Popen", "os:system", "transformers.models.qwen2_moe.modeling_qwen2_moe:__import__"):
        init = {"block": block, "config": json.dumps(config), "router": "{}", "experts": "GroupedExperts", "experts_init": {}}
        ckpt = hostile_copy(saved, tmp_path / block.replace(":", "_"), {"modules": {"model.layers.0.mlp": {"class": "moebench_plugins.fusion:FusedMoE", "init": init}}})
        with pytest.raises(MoebenchError, match="expected a module class of transformers.models.qwen2_moe") as info:
            models.load_pretrained(ckpt)
        assert "\n" not in str(info.value)
    assert not evil_module.exists()
    assert "moebench_evil_probe" not in sys.modules


@pytest.mark.parametrize(
    "structure, needle",
    [
        ({"modules": {"model.layers.0.mlp": {"class": "moebench_plugins.fusion:FusedMoE", "init": {"_inner": None}}}}, "private argument '_inner'"),
        ({"modules": {"model.layers.0.mlp": {"class": "moebench_plugins.fusion:FusedMoE", "init": {"nope": 1}}}}, "init arguments do not fit"),
        ({"modules": {"__class__": {"class": "moebench_plugins.fusion:FusedMoE"}}}, "dotted module path"),
        ({"modules": {"model.layers.0.mlp": "subprocess:Popen"}}, "expected {class"),
        ({"num_experts": {"0": "8"}}, "num_experts.0: expected a positive integer"),
        ({"num_experts": {"x": 2}}, "not a layer index"),
        ({"num_experts": {"99": 2}}, "layer 99 has no MoE block"),
        ({"router": {"0": {"__class__": 1}}}, "public attribute"),
        ({"skip_moe": ["0"]}, "skip_moe: expected a list of layer indices"),
        ({"exec": "print(1)"}, "exec: unknown field"),
        ([1, 2], "expected a table"),
    ],
)
def test_malformed_structure_is_one_line(saved, tmp_path, structure, needle):
    from moebench import models

    ckpt = hostile_copy(saved, tmp_path, structure)
    with pytest.raises(MoebenchError) as info:
        models.load_pretrained(ckpt)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_init_arguments_must_be_plain_data():
    from moebench.models import check_structure

    with pytest.raises(MoebenchError, match="plain data"):
        check_structure({"modules": {"a": {"class": "x:Y", "init": {"f": print}}}})
    with pytest.raises(MoebenchError, match="plain data"):
        check_structure({"modules": {"a": {"class": "x:Y", "init": {"f": [1, {"g": object()}]}}}})


def test_fused_moe_is_registered_under_its_saved_name():
    from moebench.plugins import host
    from moebench_plugins.fusion import CLASS_PATH, FusedMoE

    classes = host().module_classes
    assert classes[CLASS_PATH] is FusedMoE
    assert all(isinstance(c, type) for c in classes.values())


# --------------------------------------------------------------------------- 2. paths


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", "..", ".", "a b", "x\\y", "ünï", ""])
def test_unsafe_suite_names_are_refused(tmp_path, capsys, monkeypatch, name):
    suite = write(tmp_path / "s.toml", ZOO_SUITE.replace('name = "h"', f"name = {json.dumps(name)}"))
    code, _, err = moebench(capsys, monkeypatch, "validate", suite)
    one_line_error(code, err, "suite.name")


def test_default_name_from_an_odd_file_name_is_made_safe(tmp_path):
    from moebench.suite import load_suite

    suite = write(tmp_path / "my suite (v2).toml", ZOO_SUITE.replace('name = "h"\n', ""))
    assert load_suite(suite).name == "my_suite__v2_"


def test_inside_refuses_paths_that_resolve_outside(tmp_path):
    from moebench.preflight import inside

    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(tmp_path)
    assert inside(out, out / "results.jsonl", "results file") == (out / "results.jsonl").resolve()
    for bad in (out / ".." / "x", out / "link" / "x", Path("/etc/passwd")):
        with pytest.raises(MoebenchError, match="outside the output folder"):
            inside(out, bad, "results file")


def test_run_out_naming_an_existing_file(tmp_path, capsys, monkeypatch):
    suite = write(tmp_path / "s.toml", ZOO_SUITE)
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    code, _, err = moebench(capsys, monkeypatch, "run", suite, "--out", target)
    one_line_error(code, err, "--out", "existing file")
    assert target.read_text() == "keep me"


# --------------------------------------------------------------------------- 3. checked before work starts


def _validate(tmp_path, capsys, monkeypatch, text: str, *extra: str):
    suite = write(tmp_path / "s.toml", text)
    return moebench(capsys, monkeypatch, "validate", suite, "--out", tmp_path / "out", *extra)


@pytest.mark.slow  # lm-eval indexes its ~10k task configs first (14 s)
@pytest.mark.parametrize("tasks", ['["no_such_task_xyz"]', '["pydoc_mc", "arc_easyy"]'])
def test_unknown_lm_eval_task(tmp_path, capsys, monkeypatch, tasks):
    code, _, err = _validate(tmp_path, capsys, monkeypatch, ZOO_SUITE + f"[eval.lm_eval]\ntasks = {tasks}\nlimit = 4\n")
    one_line_error(code, err, "eval.lm_eval.tasks", "unknown lm-eval task")


def test_known_lm_eval_task_passes(tmp_path, capsys, monkeypatch):
    code, out, err = _validate(tmp_path, capsys, monkeypatch, ZOO_SUITE + '[eval.lm_eval]\ntasks = ["pydoc_mc"]\nlimit = 4\n')
    assert code == 0, err


@pytest.mark.parametrize(
    "files, where, split",
    [
        (["test.txt"], "calibration.data", "train"),  # calibration reads train
        (["train.txt"], "eval.perplexity.data", "test"),
        ([], "calibration.data", "train"),
    ],
)
def test_data_folder_without_the_split_file(tmp_path, capsys, monkeypatch, files, where, split):
    data = tmp_path / "data"
    data.mkdir()
    for f in files:
        (data / f).write_text("some text " * 50)
    text = ZOO_SUITE.replace("[calibration]\n", f'[calibration]\ndata = "file:{data}"\n').replace("[eval.perplexity]\n", f'[eval.perplexity]\ndata = "file:{data}"\n')
    code, _, err = _validate(tmp_path, capsys, monkeypatch, text)
    one_line_error(code, err, where, f"no file for split {split!r}")


@pytest.mark.parametrize("spec, needle", [("file:/no/such/place", "no such file or folder"), ("embedded:poetry", "no such domain")])
def test_missing_data_source(tmp_path, capsys, monkeypatch, spec, needle):
    code, _, err = _validate(tmp_path, capsys, monkeypatch, ZOO_SUITE.replace("[calibration]\n", f'[calibration]\ndata = "{spec}"\n'))
    one_line_error(code, err, "calibration.data", needle)


@pytest.mark.parametrize("threads", ["-1", "0", "100000"])
def test_bad_thread_counts(tmp_path, capsys, monkeypatch, threads):
    code, _, err = _validate(tmp_path, capsys, monkeypatch, ZOO_SUITE + f"[hardware]\nthreads = {threads}\n")
    one_line_error(code, err, "hardware.threads")


def test_unwritable_output_folder(tmp_path, capsys, monkeypatch):
    suite = write(tmp_path / "s.toml", ZOO_SUITE)
    code, _, err = moebench(capsys, monkeypatch, "validate", suite, "--out", "/sys/moebench-not-here")  # sysfs refuses new folders, even to root
    one_line_error(code, err, "--out /sys/moebench-not-here")
    code, _, err = moebench(capsys, monkeypatch, "run", suite, "--out", "/sys/moebench-not-here")
    one_line_error(code, err, "--out", "cannot write there")


def test_output_disk_without_free_space(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEBENCH_MIN_FREE_MB", str(2**40))  # more than any disk has
    code, _, err = _validate(tmp_path, capsys, monkeypatch, ZOO_SUITE)
    one_line_error(code, err, "--out", "free on its disk")


def test_checkpoint_folder_without_tokenizer(saved, tmp_path, capsys, monkeypatch):
    import shutil

    ckpt = tmp_path / "bare"
    shutil.copytree(saved, ckpt)
    for f in ckpt.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    code, _, err = _validate(tmp_path, capsys, monkeypatch, ZOO_SUITE.replace('"zoo:deepseek_v2"', json.dumps(str(ckpt))))
    one_line_error(code, err, "model.source", "has no tokenizer files")
    (ckpt / "config.json").unlink()
    code, _, err = _validate(tmp_path, capsys, monkeypatch, ZOO_SUITE.replace('"zoo:deepseek_v2"', json.dumps(str(ckpt))))
    one_line_error(code, err, "model.source", "no config.json")


@pytest.mark.parametrize(
    "method, field",
    [
        ('method = "expert_drop"\nparams = { keep = 16 }', "methods[0].params.keep"),  # zoo deepseek_v2: 16 experts, 4 layers (3 MoE)
        ('method = "expert_drop"\nparams = { keep = [4, 64] }', "methods[0].params.keep"),
        ('method = "expert_drop"\nparams = { keep_ratio = 1.0 }', "methods[0].params.keep_ratio"),
        ('method = "layer_drop"\nparams = { n = 3 }', "methods[0].params.n"),
        ('method = "block_drop"\nparams = { n = 4 }', "methods[0].params.n"),
        ('pipeline = [{ method = "layer_drop", n = 9 }]', "methods[0].pipeline[0].n"),
    ],
)
def test_parameters_against_the_model_shape(tmp_path, capsys, monkeypatch, method, field):
    code, _, err = _validate(tmp_path, capsys, monkeypatch, ZOO_SUITE + f'[[methods]]\nname = "m"\n{method}\n')
    one_line_error(code, err, field)


def test_keep_all_with_lower_top_k_is_a_real_change(tmp_path, capsys, monkeypatch):
    code, _, err = _validate(tmp_path, capsys, monkeypatch, ZOO_SUITE + '[[methods]]\nname = "m"\nmethod = "expert_drop"\nparams = { keep = 16, top_k = 1 }\n')
    assert code == 0, err


@pytest.mark.parametrize(
    "methods",
    [
        '[[methods]]\nname = "a"\nmethod = "expert_drop"\nparams = { keep_ratio = [0.5, 0.5] }\n',
        '[[methods]]\nname = "a"\nmethod = "expert_drop"\nparams = { keep = 4 }\n[[methods]]\nname = "b"\nmethod = "expert_drop"\nparams = { keep = 4 }\n',
        '[[methods]]\nname = "a"\nmethod = "layer_drop"\nparams = { n = [1, 2, 1] }\n',
    ],
)
def test_duplicate_run_ids_after_grid_expansion(tmp_path, capsys, monkeypatch, methods):
    code, _, err = _validate(tmp_path, capsys, monkeypatch, ZOO_SUITE + methods)
    one_line_error(code, err, "methods[", "same run id")


def test_method_of_a_plugin_that_failed_to_load(tmp_path, capsys, monkeypatch):
    from moebench import plugins

    broken = md.EntryPoint("shiny", "moebench_no_such_plugin_module:plugin", plugins.GROUP)
    real = list(plugins._entry_points())
    monkeypatch.setattr(plugins, "_entry_points", lambda: [*real, broken])
    plugins.host.cache_clear()
    try:
        code, _, err = _validate(tmp_path, capsys, monkeypatch, ZOO_SUITE + '[[methods]]\nname = "m"\nmethod = "shiny_drop"\n')
        one_line_error(code, err, "unknown method 'shiny_drop'", "shiny (moebench_no_such_plugin_module:plugin)", "ModuleNotFoundError")
        with pytest.raises(MoebenchError, match="failed to load"):
            plugins.host().method("shiny_drop")
    finally:
        plugins.host.cache_clear()


def test_expert_drop_that_keeps_everything_fails_instead_of_recording_a_compression(tmp_path):
    """Even past validation (e.g. a later pipeline step), a drop that changes nothing is refused at run time."""
    import torch
    from moebench.adapter import MoEModel
    from moebench.method import Context
    from moebench.plugins import host
    from moebench_plugins.trimming import ExpertDrop, ExpertDropParams

    model = make_checkpoint(tmp_path, "qwen2_moe", num_hidden_layers=2)
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model)
    moe = MoEModel(hf, host().adapter_for(hf))
    n = moe.block(moe.moe_layers[0]).num_experts
    with pytest.raises(ValueError, match="keep every expert"):
        ExpertDrop().apply(moe, ExpertDropParams(keep=n, criterion="random"), Context())
    assert isinstance(torch.zeros(1), torch.Tensor)


# --------------------------------------------------------------------------- 4. one line, never a traceback


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "empty file"),
        (b"   \n# only a comment\n\n", "empty file"),
        (b"[model]\nsource = \"zoo:deepseek_v2\"\n# caf\xe9\n", "not UTF-8"),
        (b"\xff\xfe[\x00m\x00", "not UTF-8"),
        (b"[model\nsource=1", "not valid TOML"),
    ],
)
def test_bad_suite_files(tmp_path, capsys, monkeypatch, content, needle):
    suite = tmp_path / "s.toml"
    suite.write_bytes(content)
    code, _, err = moebench(capsys, monkeypatch, "validate", suite)
    one_line_error(code, err, str(suite), needle)


def test_suite_path_that_is_a_folder(tmp_path, capsys, monkeypatch):
    code, _, err = moebench(capsys, monkeypatch, "validate", tmp_path)
    one_line_error(code, err, "is a folder")


GOOD = {"run_id": "r1", "suite": "s", "name": "baseline", "entry": "baseline", "status": "ok", "pipeline": [], "metrics": {"perplexity": 10.0}, "changes": {}, "grid": {}}


@pytest.mark.parametrize("bad", ["null", "[1, 2]", "42", '"text"', '{"run_id": 3}', '{"run_id": "x"}', '{"run_id": "x", "name": "y", "status": "ok", "metrics": []}', "{not json"])
def test_report_and_merge_skip_non_records_and_say_so(tmp_path, capsys, monkeypatch, bad):
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(GOOD) + "\n" + bad + "\n" + json.dumps({**GOOD, "run_id": "r2", "name": "other", "entry": "other"}) + "\n")
    code, out, err = moebench(capsys, monkeypatch, "report", results, "--format", "csv")
    assert code == 0, err
    assert "Traceback" not in err
    assert "skipped 1 line(s)" in err and f"{results}:2" in err
    assert "other" in out
    code, out, err = moebench(capsys, monkeypatch, "merge", results, "--out", tmp_path / "merged.jsonl")
    assert code == 0, err
    assert "skipped 1 line(s)" in err
    assert len(list(read_records(tmp_path / "merged.jsonl"))) == 2


def test_report_of_only_non_records(tmp_path, capsys, monkeypatch):
    results = tmp_path / "results.jsonl"
    results.write_text("null\n[]\n")
    code, _, err = moebench(capsys, monkeypatch, "report", results)
    assert code == 2 and "Traceback" not in err
    assert "skipped 2 line(s)" in err and "error: no records" in err


def test_report_out_naming_a_folder(tmp_path, capsys, monkeypatch):
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(GOOD) + "\n")
    code, _, err = moebench(capsys, monkeypatch, "report", results, "--format", "csv", "--out", tmp_path)
    one_line_error(code, err, "--out", "is a folder")


# --------------------------------------------------------------------------- 5. a full disk mid-suite


def _limited(limit: int):
    def setup():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return setup


def test_store_refusing_a_record_leaves_whole_lines_and_resumes(tmp_path):
    path = tmp_path / "results.jsonl"
    script = textwrap.dedent(f"""
        import json, sys
        from moebench.store import ResultStore, DiskFull
        store = ResultStore({str(path)!r})
        for i in range(100):
            try:
                store.append({{"run_id": f"r{{i}}", "name": f"run{{i}}", "status": "ok", "pad": "x" * 700}})
            except DiskFull as exc:
                print(i, exc, file=sys.stderr)
                sys.exit(2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, preexec_fn=_limited(2500), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "refused the record of run 'run3'" in proc.stderr and "--resume" in proc.stderr
    data = path.read_bytes()
    assert data.endswith(b"\n") and len(data) <= 2500
    assert [r["run_id"] for r in read_records(path)] == ["r0", "r1", "r2"]
    ResultStore(path).append({"run_id": "r3", "name": "run3", "status": "ok"})  # space again: it goes on
    assert [r["run_id"] for r in read_records(path)] == ["r0", "r1", "r2", "r3"]


@pytest.mark.slow
def test_full_disk_mid_suite_stops_with_one_line_and_resume_finishes(tmp_path, saved):
    suite = write(tmp_path / "s.toml", f"""
        [suite]
        name = "disk"
        [model]
        source = "{saved}"
        [eval.perplexity]
        seqlen = 16
        max_samples = 2
        [[methods]]
        name = "drop"
        method = "expert_drop"
        params = {{ keep = [2, 3], criterion = "random" }}
    """)
    out = tmp_path / "out"
    env = {**os.environ, "MOEBENCH_MIN_FREE_MB": "0"}
    exe = [sys.executable, "-m", "moebench.cli", "run", str(suite), "--out", str(out)]
    first = subprocess.run([*exe], capture_output=True, text=True, env=env, timeout=600, preexec_fn=_limited(4000))
    assert first.returncode == 2, first.stderr
    error = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "refused the record" in error[0] and "Traceback" not in first.stderr
    done = list(read_records(out / "results.jsonl"))
    assert (out / "results.jsonl").read_bytes().endswith(b"\n") and 1 <= len(done) < 3
    second = subprocess.run([*exe, "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr
    records = list(read_records(out / "results.jsonl"))
    assert [r["name"] for r in records][: len(done)] == [r["name"] for r in done]
    assert len({r["run_id"] for r in records}) == 3 and all(r["status"] == "ok" for r in records)


# --------------------------------------------------------------------------- 6. fuzz


BASE = {
    "suite": {"name": "fz", "seed": 0, "description": "fuzz base"},
    "model": {"source": "zoo:deepseek_v2", "dtype": "float32", "device": "cpu"},
    "hardware": {"threads": 2},
    "calibration": {"data": "embedded:prose", "samples": 4, "seqlen": 32},
    "eval": {"perplexity": {"data": "embedded:prose", "split": "test", "seqlen": 32, "max_samples": 4}, "flops": {"seqlen": 32}},
    "methods": [
        {"name": "ed", "method": "expert_drop", "params": {"keep_ratio": [0.75, 0.5], "criterion": "frequency"}},
        {"name": "ld", "method": "layer_drop", "params": {"n": 1}},
        {"name": "p", "pipeline": [{"method": "expert_drop", "keep": 4}, {"method": "layer_drop", "n": 1}]},
    ],
}

SWAPS = ["", "x", "../../etc", "/abs/path", "zoo:nope", "file:/nope", 0, -1, -7, 1, 2**31, 10**18, 0.0, -0.5, 1.5, 1e308, math.inf, -math.inf, math.nan, True, False, [], [1, 2], ["a"], {}, {"a": 1}]


def _toml(value) -> str:
    """Inline TOML for one value (every table inline, so any nesting is one line)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"


def _slots(node, path=()):
    """Every (container, key) in the tree, for mutation."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield node, key
        yield from _slots(value, (*path, key))


def mutate(rng: random.Random) -> dict:
    suite = json.loads(json.dumps(BASE))
    for _ in range(rng.choice((1, 1, 2, 3))):
        slots = list(_slots(suite))
        container, key = rng.choice(slots)
        op = rng.random()
        if op < 0.3:
            del container[key]
        elif op < 0.55 and isinstance(container[key], (int, float)) and not isinstance(container[key], bool):
            container[key] = rng.choice([-1, 0, -(10**9), 10**9, 2**63 - 1, 1e-300, math.nan, container[key] * 1000 + 1])
        elif op < 0.65 and isinstance(container, dict):
            container[rng.choice(["bogus", "nmae", "keep", "n", "threads", "source", "class", "__init__"])] = copy.deepcopy(rng.choice(SWAPS))
        else:
            container[key] = copy.deepcopy(rng.choice(SWAPS))
    return suite


def validate_in_process(suite: Path, out: Path) -> tuple[int, str]:
    """``moebench validate SUITE --out OUT`` without typer's per-call command building: the
    command's function with :func:`moebench.cli.main`'s handling of user errors."""
    import io
    from contextlib import redirect_stdout

    try:
        with redirect_stdout(io.StringIO()):
            cli.validate(suite, out)
    except MoebenchError as exc:
        return 2, f"error: {exc}\n"
    return 0, ""


def test_fuzzed_suites_fail_with_one_line_naming_a_field(tmp_path, monkeypatch):
    rng = random.Random(1234)
    root = tmp_path / "fuzz"
    root.mkdir()
    monkeypatch.chdir(root)  # anything written relative to the working directory would show up here
    out = root / "out"
    failures = 0
    for i in range(520):
        raw = mutate(rng)
        suite = root / "suite.toml"
        suite.write_text("\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in raw.items()) + "\n")
        code, err = validate_in_process(suite, out)  # any other exception fails the test with its traceback
        if code == 0:
            continue
        failures += 1
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, (i, raw, err)
        assert lines[0].startswith(f"error: {suite}: "), (i, raw, err)
        field = lines[0][len(f"error: {suite}: ") :].split(":", 1)[0]
        assert field and " " not in field.strip(), (i, raw, err)  # a field path such as methods[0].params.keep
        assert sorted(p.name for p in root.iterdir()) == ["suite.toml"], (i, raw, sorted(root.iterdir()))
    assert failures >= 260, failures  # most mutations break the suite; the rest must still validate cleanly
