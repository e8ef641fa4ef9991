"""Defining properties of the methods recent MoE-compression papers compare against
(REAP, NAEE, HC-SMoE, MC-SMoE, D2-MoE, MoEQuant, expert skipping, dynamic top-p), each
on a toy model or tensors, checked against an independent hand computation."""

from __future__ import annotations

import torch

from moebench.calibration import Calibration, CalibrationSpec
from moebench.method import Context
from moebench.models import load
from moebench.plugins import host
from moebench.params import parse

IDS = torch.randint(3, 2000, (2, 24), generator=torch.Generator().manual_seed(1))


def _ctx(samples: int = 2, seqlen: int = 16) -> Context:
    return Context(calibration=Calibration(CalibrationSpec(samples=samples, seqlen=seqlen, batch_size=2), cache=False))


def _apply(model, name: str, ctx: Context | None = None, **params):
    cls = host().method(name)
    return cls().apply(model, parse(cls.Params, params), ctx or _ctx())


def test_reap_score_equals_a_hand_computation(checkpoint):
    model = load(str(checkpoint("mixtral")))
    ctx = _ctx()
    windows = ctx.calibration.windows(model.tokenizer)
    # by hand: capture each MoE block's input, route it, and average gate x ||expert output||
    inputs = {}
    handles = [
        b.module.register_forward_hook(lambda m, a, o, layer=b.layer: inputs.setdefault(layer, []).append(a[0].detach()))
        for b in model.blocks()
    ]
    with torch.no_grad():
        model.model(input_ids=windows, use_cache=False)
    for h in handles:
        h.remove()
    block = next(model.blocks())
    x = torch.cat(inputs[block.layer]).reshape(-1, block.gate_up_proj.shape[-1]).double()
    probs = (x @ block.router_weight.double().T).softmax(-1)
    top = probs.topk(block.top_k, dim=-1).indices
    expected = torch.zeros(block.num_experts, dtype=torch.float64)
    for e in range(block.num_experts):
        routed = (top == e).any(-1)
        gate, up, down = (w.double() for w in block.expert(e))
        out = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
        gated = probs[:, e] * out.norm(dim=-1)
        expected[e] = gated[routed].mean() if routed.any() else 0.0

    from moebench_plugins.trimming.reap import reap_scores

    got = reap_scores(ctx.stats(model, "reap")["reap"][block.layer])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    changes = _apply(model, "reap", ctx, keep=4)
    assert changes["kept"][block.layer] == sorted(torch.argsort(expected, descending=True)[:4].tolist())
    assert model.block(block.layer).num_experts == 4


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _flops(model) -> dict:
    from moebench_plugins.metrics.efficiency import Flops

    return Flops().measure(model, parse(Flops.Params, {"seqlen": 32}), Context())


def test_dynamic_topk_p1_is_the_original_model_and_small_p_lowers_measured_flops(checkpoint, tmp_path):
    from moebench.models import load_pretrained

    base = load(str(checkpoint("deepseek_v2")))
    ref, ref_flops = _logits(base.model), _flops(base)["flops_per_token"]
    full = load(str(checkpoint("deepseek_v2")))
    _apply(full, "dynamic_topk", p=1.0)
    assert torch.equal(_logits(full.model), ref)
    assert _flops(full)["flops_per_token"] == ref_flops
    small = load(str(checkpoint("deepseek_v2")))
    _apply(small, "dynamic_topk", p=0.05)
    measured = _flops(small)
    assert all(k == 1.0 for k in measured["flops"]["realised_top_k"].values()), "p below any score keeps one expert"
    assert measured["flops_per_token"] < ref_flops
    assert abs(measured["flops_per_token"] - measured["flops"]["analytic_per_token"]) < 0.02 * measured["flops_per_token"]
    out = _logits(small.model)
    assert not torch.allclose(out, ref)
    small.save(tmp_path / "m")
    again = load_pretrained(tmp_path / "m")
    torch.testing.assert_close(_logits(again), out)


def test_expert_skip_skips_below_beta_and_calibrates_beta(checkpoint):
    from moebench_plugins.routing.rules import SkipBelow

    probs = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.35, 0.25]])
    keep = SkipBelow(0.8).keep(probs, probs[:, :2], torch.tensor([[0, 1], [0, 1]]))
    assert keep.tolist() == [[True, False], [True, True]]
    model = load(str(checkpoint("mixtral")))
    changes = _apply(model, "expert_skip")
    assert changes["calibrated"] and all(0 < b < 1 for b in changes["beta"].values())
    rules = model.routing_rules()
    _logits(model.model)
    assert all(1 <= r.realised_top_k() < 2 for r in rules.values())
