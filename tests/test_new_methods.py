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
