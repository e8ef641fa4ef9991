"""Plugin discovery: built-ins through entry points, a third-party package, a broken plugin."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from moebench.plugins import host

THIRD_PARTY = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "moebench-sharpen"
        version = "1.2.3"
        [project.entry-points.moebench]
        sharpen = "moebench_sharpen"
        broken = "moebench_broken"
        [tool.setuptools]
        py-modules = ["moebench_sharpen", "moebench_broken"]
    """,
    "moebench_sharpen.py": '''
        """A third-party method: scales every router's logits (a sharper or flatter routing)."""
        from dataclasses import dataclass
        import torch
        from moebench.hookspecs import hookimpl
        from moebench.method import Method
        from moebench.params import param

        @dataclass
        class SharpenParams:
            factor: float = param(2.0, help="router logit scale")

        class Sharpen(Method):
            """Scale router logits."""
            name = "sharpen"
            Params = SharpenParams

            def apply(self, model, params, ctx):
                for block in model.blocks():
                    with torch.no_grad():
                        block.router_weight.mul_(params.factor)
                return {"scaled_layers": model.moe_layers}

        @hookimpl
        def register_methods():
            return [Sharpen]
    ''',
    "moebench_broken.py": '''
        import this_module_does_not_exist  # a plugin whose dependency is missing
    ''',
}


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name, text in THIRD_PARTY.items():
        (src / name).write_text(textwrap.dedent(text))
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(src)],
        check=True,
        capture_output=True,
    )
    return target


def run_cli(args, plugin_path, **kw):
    env = {**os.environ, "PYTHONPATH": str(plugin_path), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "moebench.cli", *args], env=env, capture_output=True, text=True, timeout=600, **kw)


def test_builtins_are_entry_point_plugins():
    names = {p.name: p for p in host().plugins}
    for builtin in ("adapters", "trimming", "metrics", "statistics", "data_sources"):
        assert names[builtin].distribution == "moebench" and names[builtin].error is None
    assert {"expert_drop", "layer_drop", "block_drop"} <= set(host().methods)
    assert {"deepseek_v2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"} <= set(host().adapters)


def test_plugins_lists_third_party_and_broken(plugin_path):
    proc = run_cli(["plugins"], plugin_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    sharpen = next(line for line in out.splitlines() if line.strip("│ ").startswith("sharpen"))
    assert "moebench-sharpen" in sharpen and "1.2.3" in sharpen and "methods: sharpen" in sharpen
    broken = next(line for line in out.splitlines() if line.strip("│ ").startswith("broken"))
    assert "failed to load" in broken and "this_module_does_not_exist" in broken
    assert "expert_drop" in out, "the other plugins still load"


def test_methods_shows_parameters(plugin_path):
    proc = run_cli(["methods", "sharpen"], plugin_path)
    assert proc.returncode == 0, proc.stderr
    assert "factor" in proc.stdout and "float" in proc.stdout and "2.0" in proc.stdout and "router logit scale" in proc.stdout


@pytest.mark.slow  # 14-61 CPU s on the 2-core box (issue #13: the fast set under 5 minutes)
def test_suite_runs_a_third_party_method(plugin_path, checkpoint, tmp_path):
    suite = tmp_path / "s.toml"
    suite.write_text(textwrap.dedent(f"""
        [model]
        source = "{checkpoint('olmoe')}"
        [eval.perplexity]
        seqlen = 32
        max_samples = 4
        [[methods]]
        name = "sharp"
        method = "sharpen"
        params = {{ factor = 3.0 }}
    """))
    proc = run_cli(["run", str(suite), "--out", str(tmp_path / "out")], plugin_path)
    assert proc.returncode == 0, proc.stderr
    import json

    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert records[1]["pipeline"] == [{"method": "sharpen", "params": {"factor": 3.0}}]
    assert records[1]["changes"]["sharpen"]["scaled_layers"]
    assert records[1]["metrics"]["perplexity"]["value"] != records[0]["metrics"]["perplexity"]["value"]
