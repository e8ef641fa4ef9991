"""The Ray executor: each run of a suite as a Ray task with the resources the suite declares.

``moebench run SUITE --executor ray [--address ADDR]`` connects to a running cluster
(``ray start --head`` on one node, ``ray start --address HEAD`` on the others) or, without
an address, starts a small local one for the command. Each run reserves
``[hardware] cpus_per_run`` CPUs and ``gpus_per_run`` GPUs (defaults: 1 CPU; 1 GPU when
the model's device is ``cuda``, or ``auto`` on a cluster that has GPUs).

The driver (this process) plans, and alone writes ``results.jsonl``, one record at a time
as tasks finish, so the file stays valid and ``--resume`` works as with the serial runner.
Calibration is gathered once, by one task, into the calibration cache under
``MOEBENCH_HOME`` (forwarded to the workers); every run then reads it from there. A shared
directory rather than Ray's object store: the cache already keys each statistic by model,
edits and data, survives the command (a resumed or later suite reuses it), and a worker
reads only the statistics its method needs. On a multi-node cluster put MOEBENCH_HOME on a
shared filesystem; otherwise each node recomputes what it lacks (same numbers, more time).

A worker that dies mid-run (killed, out of memory, node lost) is retried ``retries`` times
by Ray; after that the run gets a failed record naming the cause, and ``--resume`` retries
it. Closing the run iterator (Ctrl-C) cancels every task still queued or running.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from typing import TYPE_CHECKING, Any

from .errors import MoebenchError

if TYPE_CHECKING:
    from .record import Record

#: environment the workers need to find the same caches and stay offline
FORWARDED_ENV = (
    "MOEBENCH_HOME", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_WAIT_POLICY",
    "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE",  # as the CLI sets them
)
#: object store of a local cluster: only small records and jobs pass through it
LOCAL_OBJECT_STORE_BYTES = 100 * 2**20


def run_resources(suite, cluster_gpus: float) -> dict[str, float]:
    """What one run reserves: ``{"num_cpus": c, "num_gpus": g}`` from ``[hardware]``, defaults from the device."""
    hw, device = suite.hardware, suite.model.device
    if hw.gpus_per_run is not None:
        gpus = hw.gpus_per_run
    elif device.startswith("cuda"):
        gpus = 1.0
    elif device == "auto":
        gpus = 1.0 if cluster_gpus else 0.0
    else:
        gpus = 0.0
    return {"num_cpus": hw.cpus_per_run if hw.cpus_per_run is not None else 1.0, "num_gpus": gpus}


def for_worker(suite):
    """The suite as a worker runs it: Ray exposes a task's GPUs as ``cuda:0..``, so ``cuda:N`` becomes ``cuda``."""
    if not suite.model.device.startswith("cuda:"):
        return suite
    suite = copy.copy(suite)
    suite.model = dataclasses.replace(suite.model, device="cuda")
    return suite


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # stdout of the command is the results table


def _run(job) -> "Record":
    from .runner import run_job

    job = dataclasses.replace(job, suite=for_worker(job.suite))
    return run_job(job, _log)


def _precalibrate(suite, todo, spec) -> dict[str, Any]:
    from .calibration import Calibration
    from .runner import precalibrate

    calibration = Calibration(spec)
    precalibrate(for_worker(suite), todo, calibration, _log)
    return calibration.summary()


def _measure(suite, spec, names, calibration) -> dict[str, Any]:
    from .runner import measure_only

    return measure_only(for_worker(suite), spec, names, calibration)


def cause(exc: BaseException) -> str:
    """One line for a record's ``error``: the exception's class and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _check_reachable(address: str) -> None:
    """Fail in a second, not after Ray's minutes of retries, when ``host:port`` does not answer."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "//" in host:  # "auto", ray:// client addresses: left to Ray
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as exc:
        raise MoebenchError(f"--address {address}: could not connect to a Ray cluster ({exc.strerror or exc}); expected the head's host:port from `ray start --head`") from None


class RayExecutor:
    """Runs as Ray tasks, at most as many at once as the cluster's resources allow."""

    def __init__(self, address: str | None = None, retries: int = 1):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise MoebenchError("--executor ray needs Ray: pip install 'moebench[ray]'") from None
        if retries < 0:
            raise MoebenchError(f"--retries {retries}: expected 0 or more")
        self.address = address
        self.retries = retries
        self._owned = False
        self._remotes: dict[Any, Any] = {}

    # lifetime: connect (or start a local cluster) on enter, disconnect (or stop it) on exit
    def __enter__(self) -> "RayExecutor":
        import ray

        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env} if env else None, "logging_level": "ERROR", "log_to_driver": True}
        if self.address:
            _check_reachable(self.address)
            try:
                ray.init(address=self.address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise MoebenchError(f"--address {self.address}: could not connect to a Ray cluster ({cause(exc)})") from None
        else:
            # a busy machine can take longer than Ray's default to start the node's agents
            os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES, **kwargs)
        self._owned = True
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if self._owned:
            ray.shutdown()
            self._owned = False

    def _options(self, suite, name: str, retries: int) -> dict[str, Any]:
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        res = run_resources(suite, max((n.get("GPU", 0) for n in nodes), default=0))
        if not any(n.get("CPU", 0) >= res["num_cpus"] and n.get("GPU", 0) >= res["num_gpus"] for n in nodes):
            have = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes) or "no live nodes"
            raise MoebenchError(
                f"{suite.path}: [hardware] asks {res['num_cpus']:g} CPU(s) and {res['num_gpus']:g} GPU(s) per run "
                f"(cpus_per_run / gpus_per_run), but no node of the Ray cluster has that ({have})"
            )
        return {**res, "name": name, "max_retries": retries, "retry_exceptions": False}

    def _call(self, fn, suite, name: str, *args):
        import ray

        opts = self._options(suite, name, self.retries)
        if fn not in self._remotes:
            self._remotes[fn] = ray.remote(fn)
        return self._remotes[fn].options(**opts).remote(*args)

    def _get(self, ref):
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the task's own exception, as the serial runner would raise it
            raise (exc.cause or exc) from None

    def precalibrate(self, suite, todo, calibration, log) -> None:
        summary = self._get(self._call(_precalibrate, suite, "moebench calibration", suite, todo, calibration.spec))
        calibration.passes += summary["passes"]
        calibration.computed.extend(summary["computed"])
        calibration.reused.extend(summary["reused"])
        log(f"calibration (ray task): {summary['passes']} pass(es); computed {', '.join(summary['computed']) or 'nothing'}; "
            f"reused from cache {', '.join(summary['reused']) or 'nothing'}")

    def measure(self, suite, spec, names, calibration) -> dict[str, Any]:
        return self._get(self._call(_measure, suite, "moebench baseline", suite, spec, names, calibration))

    def run(self, jobs, started, log):
        import ray

        from .runner import failed_record

        pending: dict[Any, Any] = {}
        try:
            for job in jobs:
                started(job.spec)
                pending[self._call(_run, job.suite, f"moebench {job.spec.name}", job)] = job
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(done[0])
                try:
                    record = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:  # raised outside the run's own error handling
                    record = failed_record(job.suite, job.spec, cause(exc.cause or exc))
                except ray.exceptions.RayError as exc:  # the worker died, after its retries
                    record = failed_record(job.suite, job.spec, f"{cause(exc)} (tried {self.retries + 1} time(s))")
                yield job.spec, record
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
