"""Executors: where a suite's runs execute. The runner plans, records and resumes; an executor
only turns jobs into records.

``moebench.runner.SerialExecutor`` runs them in this process, one after another (the default).
``moebench.ray_executor.RayExecutor`` submits each as a Ray task. Either way the driver
alone appends to ``results.jsonl``, one record at a time as runs finish. An executor is a
context manager: ``with make_executor("ray") as ex: run_suite(suite, RunOptions(..., executor=ex))``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from .errors import MoebenchError

if TYPE_CHECKING:
    from .calibration import Calibration
    from .record import Record
    from .runner import Job
    from .suite import RunSpec, Suite

EXECUTORS = ("serial", "ray")


class Executor(Protocol):
    def precalibrate(self, suite: "Suite", todo: list["RunSpec"], calibration: "Calibration", log: Callable[[str], None]) -> None:
        """Gather the statistics the runs' first steps read, into ``calibration`` and its disk cache."""

    def measure(self, suite: "Suite", spec: "RunSpec", names: list[str], calibration: "Calibration | None") -> dict[str, Any]:
        """Re-measure only the named metrics of ``spec`` (the baseline, on resume, for relative metrics)."""

    def run(self, jobs: list["Job"], started: Callable[["RunSpec"], None], log: Callable[[str], None]) -> Iterator[tuple["RunSpec", "Record"]]:
        """Each job's ``(spec, record)``, in the order they finish; closing the iterator cancels the rest."""


def __getattr__(name: str):
    if name == "SerialExecutor":  # it lives with the per-run code it calls (moebench.runner)
        from .runner import SerialExecutor

        return SerialExecutor
    raise AttributeError(name)


def make_executor(name: str, address: str | None = None, retries: int = 1):
    """The executor ``--executor NAME`` names; a one-line error for an unknown one or a missing extra."""
    if name == "serial":
        if address is not None:
            raise MoebenchError("--address: only meaningful with --executor ray")
        from .runner import SerialExecutor

        return SerialExecutor()
    if name == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(address=address, retries=retries)
    raise MoebenchError(f"--executor {name!r}: expected one of {', '.join(EXECUTORS)}")
