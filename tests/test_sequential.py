"""Layer-sequential calibration: inputs, per-expert routed statistics, memory that does not grow with depth."""

from __future__ import annotations

import pytest
import torch

from moebench import zoo
from moebench.adapter import MoEModel
from moebench.calibration import Calibration, CalibrationSpec
from moebench.errors import MoebenchError
from moebench.method import Context
from moebench.plugins import host
from moebench.sequential import Sequential, find_groups, from_context


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny(name: str, layers: int = 3, seed: int = 0) -> MoEModel:
    torch.manual_seed(seed)
    model = zoo.entry(name).cls(zoo.config(name, num_hidden_layers=layers)).eval()
    return MoEModel(model, host().adapter_for(model))


def windows(n: int = 6, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, zoo.VOCAB_SIZE, (n, length), generator=torch.Generator().manual_seed(seed))


def layer_inputs(moe: MoEModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder layer's input hidden states in one ordinary forward."""
    seen = []
    handles = [
        layer.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
        for layer in moe.layers
    ]
    try:
        with torch.no_grad():
            moe.model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("name", ["deepseek_v2", "qwen2_moe", "mixtral"])
def test_held_inputs_match_a_plain_forward(name):
    moe = tiny(name)
    ids = windows()
    expected = layer_inputs(moe, ids[:3]), layer_inputs(moe, ids[3:])
    run = Sequential(moe, ids, targets=["attention"], collect=["sq"], batch_size=3)
    for step in run:
        for b in range(2):
            torch.testing.assert_close(run.inputs[b], expected[b][step.index], rtol=1e-5, atol=1e-5)
    assert run.layers_done == len(moe.layers)
    # the capture left no patched forward behind
    assert all("forward" not in layer.__dict__ for layer in moe.layers)


def test_each_layer_sees_the_inputs_of_the_compressed_layers_before_it():
    moe = tiny("qwen3_moe")
    ids = windows(4)
    run = Sequential(moe, ids, targets=["attention"], collect=["sq"], batch_size=4)
    for step in run:
        if step.index == 1:
            # the pass must now see layer 0 as it was left: inputs of the edited model
            torch.testing.assert_close(run.inputs[0], layer_inputs(moe, ids)[1], rtol=1e-5, atol=1e-5)
        for group in step.groups:
            group.write(group.weight * 0.5)
    untouched = tiny("qwen3_moe")
    assert not torch.allclose(layer_inputs(untouched, ids)[1], layer_inputs(moe, ids)[1])


@pytest.mark.parametrize("weighted", [True, False])
def test_expert_statistics_use_routed_tokens_and_routing_weights(weighted):
    moe = tiny("deepseek_v2")
    ids = windows(4)
    layer = moe.moe_layers[0]
    block = moe.block(layer)
    captured = {}

    def grab(module, args):
        captured["args"] = [a.detach().clone() for a in args]

    handle = block.experts.register_forward_pre_hook(grab)
    with torch.no_grad():
        moe.model(input_ids=ids, use_cache=False)
    handle.remove()
    hidden, index, weights = captured["args"]

    run = Sequential(moe, ids, targets=["experts"], collect=["sq", "hessian"], batch_size=4, router_weighted=weighted)
    for step in run:
        if step.index != layer:
            continue
        gate_up, down = step.groups
        assert (gate_up.attr, down.attr) == ("gate_up_proj", "down_proj")
        for e in range(block.num_experts):
            tok, pos = torch.where(index == e)
            x = hidden[tok]
            scale = weights[tok, pos][:, None] if weighted else torch.ones(len(tok), 1)
            assert gate_up.stats.tokens[e] == len(tok)
            torch.testing.assert_close(gate_up.stats.sq[e], ((x * scale) ** 2).sum(0), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(gate_up.stats.hessian[e], (x * scale).T @ (x * scale), rtol=1e-4, atol=1e-4)
            g, u, _ = block.expert(e)
            act = block.experts.act_fn(x @ g.T) * (x @ u.T)
            torch.testing.assert_close(down.stats.sq[e], ((act * scale) ** 2).sum(0), rtol=1e-4, atol=1e-5)
        assert gate_up.stats.tokens.sum() == index.numel()


def test_groups_per_module_kind():
    moe = tiny("deepseek_v2")
    dense = find_groups(moe, 0, ["dense", "experts", "shared"])
    assert {g.kind for g in dense} == {"dense"}
    moe_layer = find_groups(moe, 1, ["experts", "shared", "attention"])
    assert {g.kind for g in moe_layer} == {"experts", "shared", "attention"}
    assert [g.attr for g in moe_layer if g.kind == "experts"] == ["gate_up_proj", "down_proj"]
    assert find_groups(moe, 1, ["dense"]) == []
    with pytest.raises(ValueError, match="unknown module kind 'mlp'"):
        Sequential(moe, windows(), targets=["mlp"])


def test_memory_holds_one_layer_whatever_the_depth():
    ids = windows(8, 32)
    summaries = {}
    for depth in (2, 6):
        moe = tiny("mixtral", layers=depth)
        run = Sequential(moe, ids, targets=["experts"], collect=["hessian"], batch_size=4)
        for _ in run:
            pass
        summaries[depth] = run.summary()
    hidden = zoo.config("mixtral").hidden_size
    assert summaries[2]["activation_bytes"] == ids.numel() * hidden * 4
    assert summaries[6]["activation_bytes"] == summaries[2]["activation_bytes"]
    assert summaries[6]["peak_tracked_bytes"] == summaries[2]["peak_tracked_bytes"]
    assert summaries[6]["layers"] == 6 and summaries[6]["process_peak_rss_bytes"] > 0


def test_needs_a_calibration_table(tmp_path):
    moe = tiny("olmoe")
    with pytest.raises(MoebenchError, match="wanda needs calibration data"):
        from_context(moe, Context(), "wanda")
    text = tmp_path / "calibration.txt"
    text.write_text("A small calibration text, long enough for two windows of sixteen tokens each. " * 4)
    ctx = Context(calibration=Calibration(CalibrationSpec(f"file:{text}", samples=2, seqlen=16, batch_size=2), cache=False))
    moe.tokenizer = zoo.tokenizer()
    run = from_context(moe, ctx, "wanda", targets=["experts"], collect=["sq"])
    assert run.windows.shape == (2, 16) and run.batch_size == 2


def test_true_sequential_down_hessian_comes_from_the_quantized_gate_up():
    """GPTQ's "true sequential" order: down_proj's Hessian is X^T X of act(gate_q x) * up_q x on the routed tokens."""
    from moebench_plugins.quantization.quant import rtn

    moe = tiny("deepseek_v2", layers=2)
    ids = windows(4)
    layer = moe.moe_layers[0]
    experts = moe.block(layer).experts
    run = Sequential(moe, ids, targets=["experts", "attention"], collect=["hessian"], batch_size=4, router_weighted=False)
    for step in run:
        if step.index != layer:
            continue
        stale = None
        for group in step.sequential():
            if group.attr == "gate_up_proj":
                stale = next(g for g in step.groups if g.attr == "down_proj").stats.hessian.clone()
                group.write(rtn(group.weight, 2, 16).dequantize())  # coarse, so the inputs of down move
            if group.attr != "down_proj":
                continue
            captured = []
            handle = experts.register_forward_pre_hook(lambda m, a: captured.append([t.detach() for t in a]))
            for b in range(len(run.inputs)):
                run._run_layer(step.index, b)
            handle.remove()
            expected = torch.zeros_like(group.stats.hessian)
            for hidden, index, _ in captured:
                for e in range(expected.shape[0]):
                    tok, _pos = torch.where(index == e)
                    gate, up = (hidden[tok] @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
                    h = experts.act_fn(gate) * up
                    expected[e] += h.T @ h
            torch.testing.assert_close(group.stats.hessian, expected, rtol=1e-4, atol=1e-4)
            assert not torch.allclose(stale, expected, rtol=1e-2, atol=1e-2)  # the unquantized layer's was different
        assert step.stage  # q/k/v share a stage, experts in and out are two more
        assert len(set(step.stage.values())) < len(step.stage)


@pytest.mark.parametrize("method,table", [
    ("gptq", {"expert_chunk": 3, "group_size": 32}),
    ("sparsegpt", {"true_sequential": True, "expert_chunk": 3}),
])
def test_an_experts_only_step_reuses_the_experts_inputs_with_the_same_result(method, table, monkeypatch):
    """Staged down_proj and further expert slices read the experts' inputs kept by the step's first gather
    instead of running the layer again: same weights, far fewer runs of the experts module."""
    from moebench.params import parse

    weights, runs = {}, {}
    for reuse in (True, False):
        monkeypatch.setattr(Sequential, "reuse_expert_inputs", reuse)
        moe = tiny("deepseek_v2", layers=3)
        moe.tokenizer = zoo.tokenizer()
        count = [0]
        for i in moe.moe_layers:
            moe.block(i).experts.register_forward_pre_hook(lambda m, a: count.__setitem__(0, count[0] + 1))
        cls = host().method(method)
        ctx = Context(calibration=Calibration(CalibrationSpec(samples=4, seqlen=24, batch_size=2), cache=False))
        cls().apply(moe, parse(cls.Params, table), ctx)
        weights[reuse], runs[reuse] = moe.model.state_dict(), count[0]
    for key, value in weights[False].items():
        assert torch.equal(weights[True][key], value), key
    # 2 MoE layers x 2 batches: one gather per layer with reuse, plus the first one's advance (the last layer's
    # outputs feed nothing); without, 16 experts in slices of 3 are 6 slices x 2 stages = 12 gathers per layer
    assert runs[True] == 2 * 2 + 2 and runs[False] == 2 * 2 * 12 + 2
