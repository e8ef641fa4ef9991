"""Peak memory of a block of work: CUDA peak allocated on a GPU, else the process peak RSS.

Used by the runner to record what compressing took (``compress_peak_bytes``), which
differs from the inference peak the ``memory`` metric measures.
"""

from __future__ import annotations

import torch


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmHWM``, ``VmRSS``); None where there is no such file."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes`` and ``peak.kind`` (None where unmeasurable).

    On CUDA: ``torch.cuda.max_memory_allocated`` after a reset. On the CPU: the kernel's
    peak-RSS mark (VmHWM) after resetting it through ``/proc/self/clear_refs`` (Linux).
    """

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.kind: str | None = None
        self.bytes: int | None = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.kind = "cuda_peak_allocated"
            return self
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.kind = "process_peak_rss"
        except OSError:
            self.kind = None
        return self

    def __exit__(self, *exc):
        if self.kind == "cuda_peak_allocated":
            torch.cuda.synchronize()
            self.bytes = int(torch.cuda.max_memory_allocated())
        elif self.kind == "process_peak_rss":
            kib = status_kib("VmHWM")
            self.bytes = None if kib is None else kib * 1024
        return False
