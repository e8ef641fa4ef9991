"""moebench: one harness to compress and measure Mixture-of-Experts language models."""

import os as _os

__version__ = "0.1.0"


def _openmp_defaults() -> None:
    """Passive OpenMP waiting and a bounded thread count, unless the user chose otherwise.

    libgomp reads these once, when torch first loads it, so they must be in the
    environment before anything imports torch; importing this package (the CLI does it
    first, and so does the test suite) sets them. Without a passive policy, idle OpenMP
    threads spin between the many small parallel regions of a tiny model and steal the
    cores from the thread doing work: on a busy 2-core machine that made a zoo build 10-30x
    slower. The thread count defaults to the CPUs this process may use (at most 16: these
    models gain nothing from more); ``[hardware] threads`` in a suite narrows it further.
    """
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "OMP_NUM_THREADS" not in _os.environ:
        cpus = len(_os.sched_getaffinity(0)) if hasattr(_os, "sched_getaffinity") else (_os.cpu_count() or 1)
        _os.environ["OMP_NUM_THREADS"] = str(max(1, min(16, cpus)))


_openmp_defaults()
