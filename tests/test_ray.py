"""The Ray executor on a real local cluster: a head and one worker node, 1 CPU each.

suites/ci.toml through ``--executor ray`` gives the serial runner's records (metrics equal,
timings aside), a run whose worker is killed is retried, and with no retries it gets a
failed record naming the cause that ``--resume`` then completes. The cluster's processes
are started by this module and stopped by their ids (``Cluster.shutdown``), also on failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray executor needs the ray extra: pip install -e '.[test,ray]'")

from moebench.ray_executor import RayExecutor  # noqa: E402
from moebench.record import model_metrics  # noqa: E402
from moebench.runner import RunOptions, run_suite  # noqa: E402
from moebench.store import read_records  # noqa: E402
from moebench.suite import load_suite  # noqa: E402

pytestmark = pytest.mark.slow
CI_SUITE = Path(__file__).resolve().parent.parent / "suites" / "ci.toml"
STORE = 100 * 2**20


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")  # a busy machine starts agents slowly
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "object_store_memory": STORE})
    try:
        c.add_node(num_cpus=1, object_store_memory=STORE)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()


def _descends_from_us(pid: int) -> bool:
    me = os.getpid()
    while pid > 1:
        if pid == me:
            return True
        try:
            with open(f"/proc/{pid}/stat") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


class Killer(threading.Thread):
    """SIGKILLs, once, the Ray worker process executing the task named ``moebench RUN`` (found by its title)."""

    def __init__(self, run: str):
        super().__init__(daemon=True)
        self.title = f"ray::moebench {run}"
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.killed is None:
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                except OSError:
                    continue
                if argv0.startswith(self.title) and _descends_from_us(int(entry.name)):
                    os.kill(int(entry.name), signal.SIGKILL)
                    self.killed = int(entry.name)
                    return
            time.sleep(0.2)


def comparable(record: dict) -> dict:
    """What must not depend on the executor: identity, status, changes and metrics less timings and process memory."""
    return {k: record[k] for k in ("run_id", "name", "status", "pipeline", "changes", "notes")} | {"metrics": model_metrics(record["metrics"])}


def _ray_run(cluster, out: Path, retries: int, kill: str | None = None, **options) -> tuple[list[dict], Killer | None]:
    killer = Killer(kill) if kill else None
    if killer:
        killer.start()
    try:
        with RayExecutor(address=cluster.address, retries=retries) as executor:
            run_suite(load_suite(CI_SUITE), RunOptions(out=out, executor=executor, log=lambda m: None, **options))
    finally:
        if killer:
            killer.stop.set()
            killer.join(timeout=10)
    return list(read_records(out / "results.jsonl")), killer


def test_ray_matches_serial_and_survives_killed_workers(cluster, tmp_path, isolated_cache):
    run_suite(load_suite(CI_SUITE), RunOptions(out=tmp_path / "serial", log=lambda m: None))
    serial = {r["run_id"]: comparable(r) for r in read_records(tmp_path / "serial" / "results.jsonl")}
    assert len(serial) == 4 and all(r["status"] == "ok" for r in serial.values())

    # every run as a task on the two nodes; one worker killed mid-run is retried
    records, killer = _ray_run(cluster, tmp_path / "ray", retries=1, kill="expert-drop[keep_ratio=0.5]")
    assert killer.killed, "the run's worker process was found and killed"
    assert sorted(r["run_id"] for r in records) == sorted(serial), "one record per run, none lost"
    assert {r["run_id"]: comparable(r) for r in records} == serial

    # without retries the killed run is a failed record naming the cause; --resume completes it
    out = tmp_path / "noretry"
    only = lambda runs: [r for r in runs if r.name == "layer-drop"]  # noqa: E731  (plus the baseline)
    records, killer = _ray_run(cluster, out, retries=0, kill="layer-drop", select=only)
    assert killer.killed
    failed = [r for r in records if r["status"] != "ok"]
    assert [r["name"] for r in failed] == ["layer-drop"]
    assert "died" in failed[0]["error"].lower() or "crash" in failed[0]["error"].lower(), failed[0]["error"]
    assert all(comparable(r) == serial[r["run_id"]] for r in records if r["status"] == "ok")
    resumed, _ = _ray_run(cluster, out, retries=0, resume=True, select=only)
    assert len(resumed) == len(records) + 1, "resume ran only the failed run"
    assert comparable(resumed[-1]) == serial[resumed[-1]["run_id"]]


def test_cli_ray_address_errors_are_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "moebench.cli", "run", str(CI_SUITE), "--out", str(tmp_path), "--executor", "ray", "--address", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--address 127.0.0.1:1: could not connect to a Ray cluster" in proc.stderr
    assert "Traceback" not in proc.stderr


def _our_tasks() -> list[str]:
    titles = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if argv0.startswith("ray::moebench") and _descends_from_us(int(entry.name)):
                titles.append(argv0)
    return titles


def test_ctrl_c_cancels_outstanding_tasks_and_keeps_finished_records(cluster, tmp_path, isolated_cache):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moebench.cli", "run", str(CI_SUITE), "--out", str(out), "--executor", "ray", "--address", cluster.address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 900
        while not ((out / "results.jsonl").exists() and (out / "results.jsonl").read_text().count("\n") >= 1):
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "no record appeared"
            time.sleep(0.5)
        assert _our_tasks(), "runs were still queued or running when Ctrl-C came"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, proc.stderr.read()
    assert "--resume" in proc.stderr.read()
    records = list(read_records(out / "results.jsonl"))
    assert 1 <= len(records) < 4 and all(r["status"] == "ok" for r in records), "finished records kept, whole"
    deadline = time.time() + 60
    while _our_tasks() and time.time() < deadline:
        time.sleep(0.5)
    assert not _our_tasks(), "no task of the interrupted suite runs on"
