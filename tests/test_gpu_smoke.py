"""bench/gpu_smoke.sh's CPU dry run: the GPU smoke suite's code, every method family, on a small twin."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
