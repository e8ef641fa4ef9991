"""The third-party plugin kit: `moebench new-plugin` and the `moebench.testing` conformance checks."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass

import pytest
import torch

from moebench.adapter import MoEModel
from moebench.cli_reports import scaffold
from moebench.errors import MoebenchError
from moebench.method import Context, Method
from moebench.params import param
from moebench.testing import ConformanceError, check_method, check_params, check_registered

ARCH = ["qwen3_moe"]  # one architecture keeps the negative checks fast


def test_scaffold_writes_a_package(tmp_path):
    root = scaffold("my_prune", tmp_path)
    assert root.name == "moebench-my-prune"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["README.md", "pyproject.toml", "src/moebench_my_prune/__init__.py", "suite.toml", "tests/test_moebench_my_prune.py"]
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["moebench"] == {"my_prune": "moebench_my_prune"}
    suite = tomllib.loads((root / "suite.toml").read_text())
    assert suite["methods"][0]["method"] == "my_prune"
    for py in root.rglob("*.py"):
        compile(py.read_text(), str(py), "exec")
    assert "class MyPrune(Method)" in (root / "src/moebench_my_prune/__init__.py").read_text()


@pytest.mark.parametrize("name, message", [("My-Plugin", "expected lowercase letters"), ("expert_drop", "already installed"), ("1x", "starting with a letter")])
def test_scaffold_rejects_bad_names(tmp_path, name, message):
    with pytest.raises(MoebenchError, match=message):
        scaffold(name, tmp_path)


def test_scaffold_refuses_to_overwrite(tmp_path):
    scaffold("twice", tmp_path)
    with pytest.raises(MoebenchError, match="already exists"):
        scaffold("twice", tmp_path)


def test_a_built_in_method_conforms():
    (outcome,) = check_method("expert_drop", {"keep_ratio": 0.5}, ARCH)
    assert outcome.ok and outcome.changes["experts_after"] == outcome.changes["experts_before"] // 2


# -- methods that break the contract, each caught --------------------------------------
@dataclass
class ScaleParams:
    factor: float = param(0.5, help="scale applied to the first MoE block's experts")


class Scale(Method):
    """Scales experts; the subclasses below each break one rule."""

    name = "scale"
    Params = ScaleParams

    def apply(self, model: MoEModel, params, ctx: Context) -> dict:
        block = next(model.blocks())
        with torch.no_grad():
            block.down_proj.mul_(params.factor)
        return {"scaled_layer": block.layer}


class SaysNothing(Scale):
    def apply(self, model, params, ctx):
        super().apply(model, params, ctx)
        return {}


class ChangesNothing(Scale):
    def apply(self, model, params, ctx):
        return {"scaled_layer": 0}


class UnrecordableChanges(Scale):
    def apply(self, model, params, ctx):
        super().apply(model, params, ctx)
        return {"model": model}


class Doubled(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, *args, **kwargs):
        return 2 * self.inner(x, *args, **kwargs)


class BypassesTheAdapter(Scale):
    """Swaps a module by plain setattr: the saved checkpoint no longer matches what reloads."""

    def apply(self, model, params, ctx):
        layer = model.layers[-1]
        layer.mlp = Doubled(layer.mlp)
        return {"wrapped": len(model.layers) - 1}


class Undocumented(Scale):
    @dataclass
    class Params:
        factor: float = 0.5


@pytest.mark.parametrize(
    "method, expect",
    [
        (SaysNothing, "returned no changes"),
        (ChangesNothing, "the model is unchanged"),
        (UnrecordableChanges, "cannot be written to the record"),
        (BypassesTheAdapter, "save or reload fails|reloads with different outputs"),
    ],
)
def test_contract_violations_are_reported(method, expect):
    with pytest.raises(ConformanceError, match=expect) as info:
        check_method(method, {}, ARCH)
    assert "qwen3_moe" in str(info.value)


def test_parameter_problems_are_reported():
    assert check_params(Scale, {"factor": 2})[1] == []
    _, problems = check_params(Undocumented, {})
    assert problems == ["parameter 'factor' has no help text (declare it with moebench.params.param(default, help=...))"]
    with pytest.raises(ConformanceError, match="do not parse: factr: unknown parameter"):
        check_method(Scale, {"factr": 2}, ARCH)


def test_unregistered_method_is_reported():
    with pytest.raises(ConformanceError, match="no installed moebench plugin provides method 'scale'"):
        check_registered(Scale)
    assert check_registered("expert_drop").distribution == "moebench"


@pytest.mark.slow  # builds a wheel, runs the generated tests on every architecture and the generated suite
def test_new_plugin_installs_passes_conformance_and_runs_in_its_suite(tmp_path, trained_zoo):
    cli = [sys.executable, "-m", "moebench.cli"]
    made = subprocess.run([*cli, "new-plugin", "kit_demo", "--dir", str(tmp_path)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    root = tmp_path / "moebench-kit-demo"
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(site), str(root)]
    done = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "250"}  # entry points found there; the venv stays clean

    listed = subprocess.run([*cli, "plugins"], capture_output=True, text=True, env=env)
    assert listed.returncode == 0
    row = next(line for line in listed.stdout.splitlines() if "kit_demo" in line)
    assert "moebench-kit-demo" in row and "methods: kit_demo" in row

    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=root, capture_output=True, text=True, env=env, timeout=900)
    assert tests.returncode == 0, tests.stdout[-3000:]
    assert "3 passed" in tests.stdout

    ran = subprocess.run([*cli, "run", "suite.toml", "--out", str(tmp_path / "out")], cwd=root, capture_output=True, text=True, env=env, timeout=900)
    assert ran.returncode == 0, ran.stderr[-3000:]
    from moebench.store import read_records

    records = list(read_records(tmp_path / "out"))
    assert [r["status"] for r in records] == ["ok"] * 3
    assert records[2]["changes"]["kit_demo"]["experts_after"] < records[0]["metrics"]["experts"]
