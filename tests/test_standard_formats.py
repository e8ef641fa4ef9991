"""Standard formats for quantized models: compressed-tensors checkpoints that transformers alone loads.

A packed int4 result with symmetric groups is saved as llm-compressor's ``pack-quantized``
layout (``quantization_config`` in config.json, per-expert ``weight_packed`` tensors made by
compressed-tensors); a fresh process that never imports moebench loads it with
``AutoModelForCausalLM.from_pretrained`` and must reproduce the in-memory moebench model's
logits. What the format cannot state keeps moebench's layout, refused by plain loaders.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from moebench.models import LOADER
from moebench.testing import plain_loads
from test_saved_models import _compressed

IDS = torch.arange(3, 67).reshape(2, 32)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.model(input_ids=IDS, use_cache=False).logits.float()


def _keys(folder) -> set[str]:
    keys = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            keys |= set(f.keys())
    return keys


def test_symmetric_rtn_quant_math():
    from moebench_plugins.quantization.quant import rtn, theoretical_bits

    w = torch.randn(3, 8, 64)
    q = rtn(w, 4, 32, symmetric=True)
    assert torch.all(q.zero == 8)
    assert int(q.codes.max()) <= 15
    err = (q.dequantize() - w).abs()
    assert torch.all(err <= q.scale.repeat_interleave(32, -1) * 0.51)  # half a step (+max clipped to 7 steps, float16 scale)
    assert theoretical_bits(4, 32, 64, symmetric=True) == 4 + 16 * 2 / 64


def _check_compressed_tensors(tmp_path, cases: dict) -> None:
    """Run, save and load each case with transformers alone; the logits must be moebench's in-memory ones."""
    expected = {}
    for key, (method, params, arch) in cases.items():
        model = _compressed(method, params, arch)
        expected[key] = _logits(model)
        model.save(tmp_path / key)
        assert model.saved_format == "compressed-tensors"
        config = json.loads((tmp_path / key / "config.json").read_text())
        assert "moebench" not in config
        qc = config["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
        schemes = list(qc["config_groups"].values())
        bits = params.get("bits", 4)
        assert all(s["weights"]["num_bits"] == bits and s["weights"]["symmetric"] for s in schemes)
        keys = _keys(tmp_path / key)
        assert any(".experts.0." in k and k.endswith(".weight_packed") for k in keys)
        assert not any("qweight" in k or k.endswith("_zeros") for k in keys)
    plain = plain_loads({k: tmp_path / k for k in cases}, IDS)
    for key, result in plain.items():
        assert result.error is None, result.error
        diff = (result.logits - expected[key]).abs().max().item()
        assert diff <= 1e-5 * expected[key].abs().max().item(), (key, diff)


def test_symmetric_rtn_int4_saves_as_compressed_tensors_that_transformers_loads(tmp_path):
    """Fast: transformers' from_pretrained in this process (the fresh-process check is the slow test below)."""
    from transformers import AutoModelForCausalLM

    # experts and attention, per-row groups (128 >= every row): the "channel" strategy
    model = _compressed("rtn", {"storage": "int4", "symmetric": True, "targets": ["experts", "attention"]})
    expected = _logits(model)
    model.save(tmp_path)
    assert model.saved_format == "compressed-tensors"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.config.quantization_config.quant_method == "compressed-tensors"
    with torch.no_grad():
        got = loaded(input_ids=IDS, use_cache=False).logits
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


@pytest.mark.slow
def test_symmetric_rtn_int4_compressed_tensors_loads_in_a_process_without_moebench(tmp_path):
    _check_compressed_tensors(tmp_path, {"rtn": ("rtn", {"storage": "int4", "symmetric": True,
                                                         "targets": ["experts", "attention"]}, "deepseek_v2")})


@pytest.mark.slow
def test_symmetric_gptq_int4_and_rtn_int8_in_groups_save_as_compressed_tensors_on_every_family(tmp_path):
    # groups of 32 (the "group" strategy), and families with other original names (mixtral: experts.N.w1/w2/w3)
    from conftest import ARCHS

    params = {"storage": "int4", "symmetric": True, "group_size": 32, "targets": ["experts", "attention", "shared", "dense"]}
    cases = {arch: ("gptq", params, arch) for arch in ARCHS}
    # 8-bit codes (storage = "int8"), packed by compressed-tensors the same way
    cases["rtn_int8"] = ("rtn", {**params, "bits": 8, "storage": "int8"}, "qwen3_moe")
    _check_compressed_tensors(tmp_path, cases)


def test_int4_the_format_cannot_state_keeps_moebench_layout_with_the_reason(tmp_path):
    from moebench_plugins.quantization.export import blockers

    asym = _compressed("rtn", {"storage": "int4"})
    assert any("asymmetric" in b and "symmetric = true" in b for b in blockers(asym))
    asym.save(tmp_path / "asym")
    assert asym.saved_format == "moebench"
    assert LOADER in json.loads((tmp_path / "asym" / "config.json").read_text())["model_type"]
    awq = _compressed("awq", {"storage": "int4", "symmetric": True, "grid": 2})
    assert any("AWQ per-input-channel scales" in b for b in blockers(awq))


@pytest.mark.slow
def test_bnb_4bit_linear_layers_save_in_transformers_bitsandbytes_serialization(tmp_path):
    from transformers import AutoModelForCausalLM

    from moebench_plugins.quantization.export import bnb_blockers

    model = _compressed("bnb_4bit", {"targets": ["attention", "shared"]})
    expected = _logits(model)
    model.save(tmp_path)
    assert model.saved_format == "bitsandbytes"
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert any(k.endswith("q_proj.weight.quant_state.bitsandbytes__nf4") for k in _keys(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, device_map="cpu")
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        got = loaded(input_ids=IDS, use_cache=False).logits
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    experts = _compressed("bnb_4bit", {})  # routed experts are fused 3-D parameters: no bitsandbytes form
    assert any("fused 3-D" in b for b in bnb_blockers(experts))
    experts.save(tmp_path / "experts")
    assert experts.saved_format == "moebench"


@pytest.mark.slow
def test_run_save_models_records_the_standard_format_and_its_card_says_how_to_load(checkpoint, tmp_path):
    from conftest import suite_file

    from moebench.runner import RunOptions, run_suite
    from moebench.store import read_records
    from moebench.suite import load_suite

    methods = """
        [[methods]]
        name = "rtn-sym"
        method = "rtn"
        params = { storage = "int4", symmetric = true }
        [[methods]]
        name = "rtn-asym"
        method = "rtn"
        params = { storage = "int4" }
    """
    path = suite_file(tmp_path, checkpoint("qwen3_moe"), methods, max_samples=2)
    logged = []
    run_suite(load_suite(path), RunOptions(out=tmp_path / "out", save_models=tmp_path / "models", log=logged.append))
    _, sym, asym = list(read_records(tmp_path / "out"))
    assert sym["status"] == asym["status"] == "ok", (sym.get("error"), asym.get("error"))
    assert sym["saved_model"]["format"] == "compressed-tensors" and sym["saved_model"]["loader"] == "transformers"
    assert asym["saved_model"]["format"] == "moebench" and asym["saved_model"]["loader"] == LOADER
    card = (tmp_path / "models" / f"{sym['name']}-{sym['run_id']}" / "README.md").read_text()
    assert "compressed-tensors" in card and "AutoModelForCausalLM.from_pretrained" in card
