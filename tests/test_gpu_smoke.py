"""bench/gpu_smoke.sh's CPU dry run: the GPU smoke suite's code, every method family, on a small twin."""

from __future__ import annotations

import importlib.util
import subprocess
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


@pytest.mark.slow
def test_gpu_smoke_dry_run_on_the_cpu(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_smoke.sh"), "--cpu", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    names = [line.split("|")[1].strip() for line in table[2:]]
    assert names == ["baseline"] + [m for m, _ in _script().METHODS]
    assert all("FAILED" not in line for line in table)
    assert "x27 layers" in proc.stdout
