"""The saved-model contract: never silently wrong in plain transformers.

Every built-in method's output, saved with ``MoEModel.save`` (what ``run --save-models``
calls), either loads in ``transformers.AutoModelForCausalLM.from_pretrained`` alone (a
fresh process that never imports moebench) to the logits moebench's own loader gives,
or plain transformers refuses it with an error naming ``moebench.models.load_pretrained``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moebench.models import LOADER, load_config, load_pretrained
from moebench.testing import CALIBRATION, _model, check_saved

# every built-in method, with parameters small enough for a random toy model; keys name the case
CASES = {
    "expert_drop": ("expert_drop", {"keep_ratio": 0.5}),
    "expert_drop_global": ("expert_drop", {"keep_ratio": 0.5, "scope": "global"}),
    "layer_drop": ("layer_drop", {"n": 1}),
    "block_drop": ("block_drop", {"n": 1}),
    "reap": ("reap", {"keep_ratio": 0.5}),
    "naee": ("naee", {"keep_ratio": 0.5, "max_combinations": 200}),
    "dynamic_topk": ("dynamic_topk", {"p": 0.5}),
    "expert_skip": ("expert_skip", {}),
    "magnitude": ("magnitude", {"sparsity": 0.5}),
    "wanda": ("wanda", {"sparsity": 0.5}),
    "sparsegpt_2of4": ("sparsegpt", {"nm": "2:4"}),
    "rtn": ("rtn", {}),
    "gptq": ("gptq", {}),
    "gptq_int4": ("gptq", {"storage": "int4"}),
    "gptq_int4_symmetric": ("gptq", {"storage": "int4", "symmetric": True}),  # compressed-tensors
    "awq_int4": ("awq", {"storage": "int4", "grid": 4}),
    "rtn_int4": ("rtn", {"storage": "int4", "targets": ["experts", "attention"]}),
    "bnb_4bit": ("bnb_4bit", {}),
    "bnb_4bit_linear": ("bnb_4bit", {"targets": ["attention", "shared"]}),  # transformers' bitsandbytes serialization
    "moequant": ("moequant", {}),
    "merge": ("merge", {"keep_ratio": 0.5}),
    "progressive_merge": ("progressive_merge", {"keep_ratio": 0.5}),
    "hc_smoe": ("hc_smoe", {"keep_ratio": 0.5}),
    "mc_smoe": ("mc_smoe", {"keep_ratio": 0.5}),
    "d2_moe": ("d2_moe", {"rank": 4}),
    "multiplexage": ("multiplexage", {"keep_ratio": 0.5}),
    "fused_lora": ("fused_lora", {"keep_ratio": 0.5, "rank": 4}),
    "mixture_of_lora": ("mixture_of_lora", {"rank": 8}),
    "premoe": ("premoe", {"keep": 8, "task": "prose"}),
}


def _compressed(method: str, params: dict, arch: str = "deepseek_v2"):
    from moebench.calibration import Calibration, CalibrationSpec
    from moebench.method import Context
    from moebench.params import parse
    from moebench.plugins import host

    torch.manual_seed(0)
    model = _model(arch, False, 0)
    from moebench_plugins.premoe.index import parse_tasks

    tasks = parse_tasks({"prose": {"data": "embedded:prose"}, "code": {"data": "embedded:code"}})
    suite = SimpleNamespace(tables={"tasks": tasks})  # the parsed tables a Suite carries (PreMoe owns [tasks])
    ctx = Context(seed=0, calibration=Calibration(CalibrationSpec(seed=0, **CALIBRATION), cache=False), device="cpu",
                  suite=suite, log=lambda *_: None)
    cls = host().method(method)
    cls().apply(model, parse(cls.Params, params), ctx)
    return model


def test_a_moebench_layout_is_refused_by_plain_transformers_with_the_loader_named(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = _model("qwen3_moe", False, 0)
    model.skip_moe(1)  # no transformers config field says "this layer has no MLP"
    ids = torch.arange(3, 35)[None]
    with torch.no_grad():
        expected = model.model(input_ids=ids).logits
    model.save(tmp_path)
    for plain in (AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=f"load this folder with {LOADER}"):
            plain(tmp_path)
    assert load_config(tmp_path).model_type == "qwen3_moe"
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path)(input_ids=ids).logits, expected)


@pytest.mark.slow
def test_every_built_in_method_saves_a_model_plain_transformers_loads_right_or_refuses(tmp_path):
    from moebench.plugins import host

    built_in = {name for name, cls in host().methods.items() if cls.__module__.startswith("moebench_plugins.")}
    assert built_in == {method for method, _ in CASES.values()}, "add the new method to CASES"
    folders = {}
    for key, (method, params) in CASES.items():
        model = _compressed(method, params)
        model.save(tmp_path / key)
        folders[key] = tmp_path / key
    verdicts = check_saved(folders)
    # what each output is today; a change here is a deliberate format change
    refused = {k for k, v in verdicts.items() if v == "refused"}
    assert refused == {
        "expert_drop_global", "layer_drop", "gptq_int4", "awq_int4", "rtn_int4", "bnb_4bit",
        "multiplexage", "fused_lora", "mixture_of_lora", "dynamic_topk", "expert_skip", "hc_smoe", "d2_moe", "mc_smoe",
    }, verdicts
