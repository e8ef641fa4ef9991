"""bench/gpu_smoke.sh's CPU dry run: the GPU smoke suite's code, every method family, on a small twin."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "bench" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_suite_names_every_family_and_validates(tmp_path):
    from moebench.suite import load_suite

    smoke = _script()
    for cpu in (True, False):
        path = tmp_path / f"smoke-{cpu}.toml"
        path.write_text(smoke.suite_text(cpu))
        suite = load_suite(path)
        assert suite.model.dtype == "bfloat16" and suite.model.device == ("cpu" if cpu else "cuda")
        assert [r.name for r in suite.runs()][1:] == [m for m, _ in smoke.METHODS]


@pytest.mark.slow  # the CI dry run of bench/gpu_smoke.sh: every family through the GPU smoke's code, on the CPU
def test_gpu_smoke_dry_run_on_the_cpu(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_smoke.sh"), "--cpu", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| run | status | compress s | x27 layers s |")
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table[2:]]
    assert [r[0] for r in rows] == ["baseline"] + [m for m, _ in _script().METHODS]
    assert all(r[1] == "ok" for r in rows), table
    assert all(r[2] != "-" and r[4] != "-" for r in rows[1:]), table  # every method timed and its peak measured
    assert "x27 layers: compress seconds x 26/2" in proc.stdout  # the extrapolation to the full model
