"""The CUDA branches' decisions, reached on the CPU (issue #19 item 6): each test runs the same code a GPU
machine runs and checks the branch it takes here; on a GPU machine the same tests take the CUDA side.

What no CPU test can run is the torch.cuda / faiss-GPU call inside each branch (they need a device); those
are exercised by ``bash bench/gpu_smoke.sh`` on a GPU, whose CPU dry run (tests/test_gpu_smoke.py) runs
the rest of the same code.
"""

from __future__ import annotations

import platform

import pytest
import torch

from moebench.memory import PeakMemory
from moebench.ray_executor import for_worker, run_resources
from moebench.runner import environment
from moebench.suite import parse_suite

GPU = torch.cuda.is_available()


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0"])
def test_peak_memory_uses_the_cuda_counter_only_where_a_gpu_is(device):
    with PeakMemory(device) as peak:
        block = torch.ones(1 << 20)  # 4 MiB, held across the measurement
    assert peak.kind == ("cuda_peak_allocated" if GPU and device != "cpu" else "process_peak_rss")
    assert peak.bytes and peak.bytes >= (block.numel() * 4 if peak.kind == "process_peak_rss" else 0)


def test_environment_names_the_gpu_or_the_cpu():
    env = environment("cuda")
    assert env["device"] == "cuda"
    assert env["device_name"] == (torch.cuda.get_device_name() if GPU else (platform.processor() or platform.machine()))


@pytest.mark.parametrize("device, hardware, cluster_gpus, wanted", [
    ("cuda", {}, 0, 1.0),                       # a cuda suite reserves one GPU per run
    ("cuda:1", {}, 4, 1.0),
    ("auto", {}, 2, 1.0),                       # auto: a GPU where the cluster has one
    ("auto", {}, 0, 0.0),
    ("cpu", {}, 8, 0.0),
    ("cuda", {"gpus_per_run": 0.5}, 8, 0.5),    # fractional GPUs as asked
])
def test_ray_reserves_gpus_by_the_suites_device(device, hardware, cluster_gpus, wanted):
    suite = parse_suite({"model": {"source": "zoo:deepseek_v2", "device": device}, "hardware": hardware})
    assert run_resources(suite, cluster_gpus)["num_gpus"] == wanted


def test_ray_workers_see_their_gpu_as_cuda():
    pinned = parse_suite({"model": {"source": "zoo:deepseek_v2", "device": "cuda:3"}})
    assert for_worker(pinned).model.device == "cuda" and pinned.model.device == "cuda:3"  # the suite itself unchanged
    plain = parse_suite({"model": {"source": "zoo:deepseek_v2", "device": "cpu"}})
    assert for_worker(plain) is plain


def test_premoe_searches_faiss_on_the_gpu_only_where_faiss_reports_one():
    faiss = pytest.importorskip("faiss")
    from moebench_plugins.premoe.index import faiss_device

    gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
    assert faiss_device() == ("gpu" if gpus > 0 else "cpu")
