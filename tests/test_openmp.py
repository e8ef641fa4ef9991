"""The OpenMP guard: importing moebench (or running its CLI) makes libgomp start passive.

libgomp prints the settings it started with when ``OMP_DISPLAY_ENV=VERBOSE``; a passive
wait policy shows as ``GOMP_SPINCOUNT = '0'`` (unset, libgomp spins 300,000 times
before sleeping, and its display says PASSIVE either way, so the spin count is the proof).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _libgomp_start(code: list[str], **env: str) -> dict[str, str]:
    """Run ``code`` in a fresh interpreter without any OMP_ setting but ``env``; libgomp's start-up values."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    done = subprocess.run(code, env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    shown = {}
    for line in done.stderr.splitlines():
        key, sep, value = line.strip().partition(" = ")
        if sep and key.startswith(("OMP_", "GOMP_")):
            shown[key] = value.strip("'")
    if "GOMP_SPINCOUNT" not in shown:
        pytest.skip("this torch build's OpenMP runtime is not libgomp (it displays no GOMP_SPINCOUNT)")
    return shown


MATMUL = "torch.ones(64, 64) @ torch.ones(64, 64)"


def test_the_cli_starts_openmp_passive_with_a_bounded_thread_count():
    # `zoo list` imports torch (through the zoo module) after the package, like every command that works
    shown = _libgomp_start([sys.executable, "-m", "moebench.cli", "zoo", "list"])
    assert shown["GOMP_SPINCOUNT"] == "0"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert shown["OMP_NUM_THREADS"] == str(min(16, cpus))


def test_the_users_own_openmp_settings_win():
    shown = _libgomp_start([sys.executable, "-c", f"import moebench, torch; {MATMUL}"], OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1")
    assert (shown["OMP_WAIT_POLICY"], shown["OMP_NUM_THREADS"]) == ("ACTIVE", "1")
    assert shown["GOMP_SPINCOUNT"] != "0"


@pytest.mark.slow
def test_without_the_guard_libgomp_spins():
    """The control: torch alone starts libgomp spinning, so the test above can fail."""
    shown = _libgomp_start([sys.executable, "-c", f"import torch; {MATMUL}"])
    assert shown["GOMP_SPINCOUNT"] != "0"
