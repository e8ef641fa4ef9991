"""device = "auto": accelerate's device map over CPU memory and disk, for every model source.

On the CPU a small ``max_memory`` forces part of a zoo-architecture model to disk: it
loads, evaluates, compresses (whole-model, layer-sequential and fusion methods), saves with
a moebench structure, and reloads that structure with a forced offload.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from moebench import placement
from moebench.errors import MoebenchError
from moebench.models import load, load_pretrained
from moebench.runner import RunOptions, run_suite
from moebench.store import read_records
from moebench.suite import load_suite, parse_suite
from conftest import suite_file

#: about half of the 5-layer test checkpoint (10.7 MB): the rest goes to disk
SPLIT = {"cpu": "6MB"}


def _without_bytes(value):
    """``changes`` less the process-memory readings a layer-sequential pass records (``*_bytes``)."""
    if isinstance(value, dict):
        return {k: _without_bytes(v) for k, v in value.items() if not k.endswith("bytes")}
    return value


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_forced_disk_offload_loads_runs_and_becomes_editable(checkpoint):
    path = checkpoint("deepseek_v2")
    ids = torch.randint(3, 200, (2, 16))
    reference = _logits(load(str(path)).model, ids)
    moe = load(str(path), device="auto", max_memory=SPLIT)
    assert {"cpu", "disk"} <= set(moe.model.hf_device_map.values()), moe.model.hf_device_map
    assert placement.offloaded(moe.model), "some weights live on disk"
    torch.testing.assert_close(_logits(moe.model, ids), reference)
    moved = placement.materialize(moe.model)
    assert moved and not placement.offloaded(moe.model)
    assert all(p.device.type == "cpu" for p in moe.model.parameters()), "no meta weights left to edit"
    torch.testing.assert_close(_logits(moe.model, ids), reference)


@pytest.mark.slow
def test_auto_device_compresses_evaluates_and_reloads_saved_structure(tmp_path, checkpoint, isolated_cache):
    methods = """
        [[methods]]
        name = "drop"
        method = "expert_drop"
        params = { keep_ratio = 0.5, scope = "global" }   # expert counts differ per layer
        [[methods]]
        name = "wanda"
        method = "wanda"
        params = { sparsity = 0.5 }
        [[methods]]
        name = "multiplex"
        method = "multiplexage"
        params = { keep_ratio = 0.5 }
    """
    results = {}
    for device in ("cpu", "auto"):
        folder = tmp_path / device
        folder.mkdir()
        path = suite_file(folder, checkpoint("deepseek_v2"), methods)
        text = open(path).read().replace("[model]\n", f'[model]\ndevice = "{device}"\n')
        if device == "auto":
            text = text.replace("[calibration]", '[hardware]\nmax_memory = { cpu = "6MB" }\n[calibration]')
        open(path, "w").write(text)
        run_suite(load_suite(path), RunOptions(out=folder / "out", save_models=folder / "models", log=lambda m: None))
        results[device] = list(read_records(folder / "out" / "results.jsonl"))
    for cpu, auto in zip(results["cpu"], results["auto"]):
        assert auto["status"] == "ok", auto["error"]
        assert _without_bytes(auto["changes"]) == _without_bytes(cpu["changes"])
        assert auto["metrics"]["perplexity"]["value"] == pytest.approx(cpu["metrics"]["perplexity"]["value"], rel=1e-4)
        if auto["pipeline"]:
            assert any("offloaded layers" in n for n in auto["notes"])

    # models moebench saved with per-layer expert counts, and with fusion modules, reload under a forced offload
    ids = torch.randint(3, 200, (2, 16))
    for record in (results["auto"][1], results["auto"][3]):
        saved = record["saved_model"]
        assert saved["loader"] == "moebench.models.load_pretrained", record["name"]
        whole = load_pretrained(saved["path"])
        spread = load_pretrained(saved["path"], device="auto", max_memory={"cpu": "4MB"})
        assert "disk" in spread.hf_device_map.values()
        torch.testing.assert_close(_logits(spread, ids), _logits(whole, ids))


@pytest.mark.parametrize("hardware, device, field, message", [
    ({"max_memory": {"gpu0": "1GiB"}}, "auto", "hardware.max_memory", "expected a GPU index"),
    ({"max_memory": {"cpu": "lots"}}, "auto", "hardware.max_memory", "expected a size such as"),
    ({"max_memory": {"cpu": "1GiB"}}, "cpu", "hardware.max_memory", "only used with model.device = 'auto'"),
    ({"gpus_per_run": 1}, "cpu", "hardware.gpus_per_run", "uses none"),
    ({"gpus_per_run": 0}, "cuda", "hardware.gpus_per_run", "expected at least 1"),
    ({"cpus_per_run": 0}, "cpu", "hardware.cpus_per_run", "expected a number > 0"),
    ({"gpus_per_run": "one"}, "cuda", "hardware.gpus_per_run", "expected float"),
])
def test_hardware_fields_are_checked(hardware, device, field, message):
    raw = {"model": {"source": "zoo:deepseek_v2", "device": device}, "hardware": hardware}
    with pytest.raises(MoebenchError) as info:
        parse_suite(raw, "s.toml")
    assert field in str(info.value) and message in str(info.value), str(info.value)


def test_max_memory_keys_become_accelerate_devices():
    assert placement.parse_max_memory({"0": "20GiB", "1": 10**9, "cpu": "60GiB"}) == {0: "20GiB", 1: 10**9, "cpu": "60GiB"}
    parsed = parse_suite({"model": {"source": "zoo:deepseek_v2", "device": "auto"}, "hardware": {"max_memory": {"cpu": "1GB"}, "gpus_per_run": 2}}, "s.toml")
    assert parsed.hardware.gpus_per_run == 2.0 and parsed.hardware.max_memory == {"cpu": "1GB"}
