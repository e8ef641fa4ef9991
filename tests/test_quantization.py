"""Quantization: RTN / GPTQ / AWQ math, packed int4 and bitsandbytes 4-bit storage, on every zoo architecture."""

from __future__ import annotations

import math

import pytest
import torch

from moebench import zoo
from moebench.adapter import MoEModel
from moebench.calibration import Calibration, CalibrationSpec
from moebench.errors import MoebenchError
from moebench.method import Context
from moebench.models import load_pretrained
from moebench.params import ParamError, parse
from moebench.plugins import host
from moebench_plugins.quantization.quant import awq_scale, gptq, pack_int4, rtn, theoretical_bits, unpack_int4
from moebench.runner import RunOptions, run_suite
from moebench.suite import parse_suite
from moebench_plugins.metrics import ModelSize, weight_bytes
from moebench_plugins.quantization import Bnb4bitExperts, PackedInt4Experts, PackedInt4Linear
from conftest import kl_from

ARCHS = zoo.names()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny(name: str = "deepseek_v2", layers: int = 3, dtype=torch.float32) -> MoEModel:
    torch.manual_seed(0)
    model = zoo.entry(name).cls(zoo.config(name, num_hidden_layers=layers)).eval().to(dtype)
    return MoEModel(model, host().adapter_for(model), tokenizer=zoo.tokenizer())


def context() -> Context:
    return Context(calibration=Calibration(CalibrationSpec(samples=4, seqlen=32, batch_size=4), cache=False))


def apply(moe: MoEModel, method: str, ctx: Context | None = None, **table) -> dict:
    cls = host().method(method)
    return cls().apply(moe, parse(cls.Params, table), ctx or context())


def logits(moe_or_model, ids) -> torch.Tensor:
    model = moe_or_model.model if isinstance(moe_or_model, MoEModel) else moe_or_model
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def expert_bytes(model: torch.nn.Module) -> int:
    moe = MoEModel(model, host().adapter_for(model))
    return sum(weight_bytes(b.experts) for b in moe.blocks())


IDS = torch.randint(3, 2000, (2, 16), generator=torch.Generator().manual_seed(1))


# -- math -----------------------------------------------------------------------------------
def test_int4_packing_round_trips():
    codes = torch.randint(0, 16, (3, 5, 7), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (3, 5, 4) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, 7), codes)


@pytest.mark.parametrize("bits,group", [(4, 16), (3, -1), (8, 32), (2, 12)])
def test_rtn_error_is_within_half_a_step(bits, group):
    w = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(bits))
    q = rtn(w, bits, group)
    assert int(q.codes.max()) <= 2**bits - 1 and q.scale.shape[-1] == math.ceil(40 / q.group_size)
    step = q.scale.repeat_interleave(q.group_size, -1)[..., :40]
    error = (q.dequantize() - w).abs()
    inside = (q.codes > 0) & (q.codes < 2**bits - 1)  # the rounded zero point can push a range end one step out
    assert (error[inside] <= step[inside] / 2 + 1e-6).all() and (error <= step + 1e-6).all()


def correlated(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols)
    return (torch.randn(n, cols, generator=g) * torch.linspace(0.2, 3, cols)) @ (torch.eye(cols) + mix)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_is_rtn_without_correlations_and_beats_it_with_them(act_order):
    torch.manual_seed(0)
    w = torch.randn(2, 16, 64)
    identity = torch.eye(64).expand(2, 64, 64)
    q = gptq(w, identity, 4, 16, act_order=act_order)
    torch.testing.assert_close(q.dequantize(), rtn(w, 4, 16).dequantize())
    x = correlated(512, 64)
    h = (x.T @ x).expand(2, 64, 64)
    err = lambda new: (x @ (w - new).transpose(1, 2)).pow(2).sum().item()  # noqa: E731
    for bits in (3, 4):
        assert err(gptq(w, h, bits, 16, act_order=act_order).dequantize()) < 0.8 * err(rtn(w, bits, 16).dequantize())


def test_gptq_true_sequential_changes_only_what_follows_the_first_stage():
    moe, parallel = tiny(layers=2), tiny(layers=2)
    changes = apply(moe, "gptq", bits=3, group_size=32)
    assert changes["variant"] == {"order": "true sequential: each Hessian from the already-quantized earlier stages (reference)",
                                  "hessian": "unweighted X^T X (reference)",
                                  "group_scales": "group scales from the block-start weights (reference)"}
    apply(parallel, "gptq", bits=3, group_size=32, true_sequential=False)
    first = moe.moe_layers[0]
    torch.testing.assert_close(moe.block(first).experts.gate_up_proj, parallel.block(first).experts.gate_up_proj)
    assert not torch.equal(moe.block(first).experts.down_proj, parallel.block(first).experts.down_proj)


def test_awq_search_never_loses_to_rtn_on_its_sample():
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    x = correlated(256, 64) * torch.linspace(0.1, 5, 64)
    s, alpha, ratio = awq_scale(w, x, x.abs().mean(0), 4, 32)
    wq = rtn(w * s, 4, 32).dequantize() / s
    err_awq = (x @ (w - wq).T).pow(2).mean()
    err_rtn = (x @ (w - rtn(w, 4, 32).dequantize()).T).pow(2).mean()
    assert ratio <= 1 and alpha > 0 and err_awq < err_rtn


def test_theoretical_bits_count_scales_and_zeros():
    assert theoretical_bits(4, 128, 256) == 4 + 2 * 20 / 256
    assert theoretical_bits(3, -1, 64) == 3 + 19 / 64


# -- storage --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_int4_storage_holds_exactly_the_fake_quantized_weights(method):
    fake, stored = tiny(), tiny()
    ctx = context()
    apply(fake, method, ctx, targets=["experts", "attention"])
    changes = apply(stored, method, ctx, targets=["experts", "attention"], storage="int4")
    assert isinstance(stored.block(1).experts, PackedInt4Experts)
    assert isinstance(stored.layers[1].self_attn.o_proj, PackedInt4Linear)
    # RTN is data-free, so every layer matches; GPTQ's first MoE layer sees identical inputs
    # (later ones see outputs of a different, equally exact, expert loop: float rounding, which
    # can flip a GPTQ rounding decision there; the logits then differ by ~1e-3, where a wrong
    # dequantization moves them by 0.1 or more)
    layers = [1, 2] if method == "rtn" else [1]
    for i in layers:
        assert torch.equal(stored.block(i).gate_up_proj, fake.block(i).gate_up_proj)
        assert torch.equal(stored.block(i).down_proj, fake.block(i).down_proj)
        assert torch.equal(stored.layers[i].self_attn.q_proj.weight, fake.layers[i].self_attn.q_proj.weight)
    torch.testing.assert_close(logits(stored, IDS), logits(fake, IDS), rtol=1e-3, atol=5e-3 if method == "gptq" else 1e-5)
    assert changes["bits_per_weight_basis"] == "measured" and 4.2 < changes["bits_per_weight"]["experts"] < 4.5
    # the view still reads (dequantized) weights; edits are refused with a clear message
    with pytest.raises(MoebenchError, match="experts are stored quantized"):
        stored.keep_experts(1, [0, 1, 2, 3])


@pytest.mark.parametrize(
    "method,table",
    [
        ("gptq", {"storage": "int4", "act_order": True, "group_size": 32}),
        ("awq", {"storage": "int4", "targets": ["experts", "shared"]}),
        ("rtn", {"storage": "int4", "targets": ["experts", "dense"]}),
        ("bnb_4bit", {"quant_type": "nf4"}),
        ("bnb_4bit", {"quant_type": "fp4", "targets": ["experts", "attention"]}),
    ],
)
def test_stored_models_reload_with_the_same_logits_and_bytes(method, table, tmp_path):
    moe = tiny()
    before = expert_bytes(moe.model)
    params_before = ModelSize().measure(moe, None, Context())["params"]
    apply(moe, method, **table)
    expected = logits(moe, IDS)
    moe.save(tmp_path)
    again = load_pretrained(tmp_path)
    torch.testing.assert_close(logits(again, IDS), expected, rtol=0, atol=0)
    assert weight_bytes(again) == weight_bytes(moe.model)
    stored = expert_bytes(again)
    assert stored < 0.35 * before, (stored, before)
    # the size metric still counts the weights the buffers encode
    assert ModelSize().measure(moe, None, Context())["params"] == params_before


def test_bfloat16_experts_stored_in_4_bits_take_under_35_percent():
    for method in ("bnb_4bit", "rtn"):
        moe = tiny(dtype=torch.bfloat16)
        before = expert_bytes(moe.model)
        changes = apply(moe, method, **({"storage": "int4"} if method == "rtn" else {}))
        after = expert_bytes(moe.model)
        assert after < 0.35 * before
        assert changes["stored_bytes"]["experts"] == after and changes["original_bytes"]["experts"] == before
        assert logits(moe, IDS).dtype == torch.bfloat16


def test_bnb_experts_use_bitsandbytes_codes():
    from bitsandbytes import functional as bnbf

    moe = tiny(layers=2)
    w = moe.block(1).gate_up_proj[3].detach().clone()
    apply(moe, "bnb_4bit")
    experts = moe.block(1).experts
    assert isinstance(experts, Bnb4bitExperts)
    data, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    torch.testing.assert_close(experts.weight("gate_up_proj", 3), bnbf.dequantize_4bit(data, state))


def test_fake_quantization_is_noted_with_theoretical_bytes():
    moe = tiny(layers=2)
    ctx = context()
    changes = apply(moe, "awq", ctx, bits=3, group_size=64)
    assert any("fake-quantized" in n and "bytes are theoretical" in n for n in ctx.notes)
    assert changes["bits_per_weight_basis"] == "theoretical"
    n = changes["weights"]["experts"]
    assert changes["theoretical_bytes"]["experts"] < changes["original_bytes"]["experts"] / 8
    assert 3 < changes["bits_per_weight"]["experts"] < 4 and n > 0
    assert changes["awq_error_vs_rtn"]["experts"]["max"] <= 1 and changes["awq_error_vs_rtn"]["experts"]["mean"] < 1
    assert 0 < changes["awq_alpha_mean"]["experts"] < 1


def test_int8_symmetric_storage_holds_the_fake_quantized_weights_one_byte_per_code():
    fake, stored = tiny(), tiny()
    ctx = context()
    apply(fake, "rtn", ctx, bits=8, symmetric=True)
    changes = apply(stored, "rtn", ctx, bits=8, symmetric=True, storage="int8")
    experts = stored.block(1).experts
    assert isinstance(experts, PackedInt4Experts) and experts.bits == 8
    assert torch.equal(experts.gate_up_proj, fake.block(1).gate_up_proj)
    assert bool((experts.gate_up_zeros == 128).all()) and changes["symmetric"] is True
    assert 8.0 < changes["bits_per_weight"]["experts"] < 8.5


def test_parameter_errors_name_the_field():
    params = host().method("gptq").Params
    with pytest.raises(ParamError, match="bits must be one of 2, 3, 4, 8, got 5"):
        parse(params, {"bits": 5})
    with pytest.raises(ParamError, match="storage 'int4' needs bits = 4"):
        parse(params, {"bits": 3, "storage": "int4"})
    with pytest.raises(ParamError, match="storage 'int8' needs bits = 8, got bits = 4"):
        parse(params, {"storage": "int8"})
    with pytest.raises(ParamError, match="group_size must be -1"):
        parse(params, {"group_size": 0})
    with pytest.raises(ParamError, match="blocksize must be a power of two"):
        parse(host().method("bnb_4bit").Params, {"blocksize": 100})


# -- from a suite, on every architecture -------------------------------------------------------
def every_arch():
    """Every architecture in the slow set: the deepseek_v2 case alone took 18 s of the fast set's 5 minutes;
    the fast set checks each method's math and storage on small modules above."""
    return [pytest.param(name, marks=pytest.mark.slow) for name in ARCHS]


@pytest.mark.parametrize("name", every_arch())
def test_every_method_runs_from_a_suite(name, checkpoint, tmp_path):
    from moebench import corpus

    text = tmp_path / "calibration.txt"
    text.write_text("\n\n".join(corpus.documents("prose", "validation")[:40]))
    raw = {
        "suite": {"name": f"quant-{name}"},
        "model": {"source": str(checkpoint(name))},
        "calibration": {"data": f"file:{text}", "samples": 4, "seqlen": 32, "batch_size": 4},
        "methods": [
            {"name": "rtn", "method": "rtn", "params": {"bits": 4}},
            {"name": "gptq", "method": "gptq", "params": {"bits": 3, "group_size": 64, "act_order": True}},
            {"name": "awq", "method": "awq", "params": {"bits": 4, "targets": ["experts", "attention"]}},
            {"name": "bnb", "method": "bnb_4bit"},
            {"name": "gptq-int4", "method": "gptq", "params": {"storage": "int4", "targets": ["experts", "shared", "dense"]}},
            {"name": "drop-then-gptq", "pipeline": [{"method": "expert_drop", "keep_ratio": 0.5}, {"method": "gptq", "bits": 4}]},
        ],
    }
    result = run_suite(parse_suite(raw), RunOptions(out=tmp_path / "out", log=lambda *_: None))
    records = {r.name: r for r in result.records}
    assert all(r.ok for r in records.values()), [r.error for r in records.values()]
    base = records["baseline"].metrics["weight_bytes"]
    assert records["rtn"].metrics["weight_bytes"] == base  # fake: nothing stored smaller
    assert 3 < records["gptq"].changes["gptq"]["bits_per_weight"]["experts"] < 4
    assert set(records["awq"].changes["awq"]["bits_per_weight"]) == {"experts", "attention"}
    for name_ in ("bnb", "gptq-int4"):
        assert records[name_].metrics["weight_bytes"] < base
        assert records[name_].metrics["params"] == records["baseline"].metrics["params"]
    drop = records["drop-then-gptq"]
    assert drop.changes["expert_drop"]["experts_after"] * 2 == drop.changes["expert_drop"]["experts_before"]
    assert drop.changes["gptq"]["weights"]["experts"] * 2 == records["gptq"].changes["gptq"]["weights"]["experts"]


@pytest.mark.slow
def test_on_the_trained_zoo_model_gptq_and_awq_beat_rtn_at_4_bits(trained_zoo):
    """4-bit, group 128, routed experts of the trained DeepSeek-V2 zoo model: divergence from the uncompressed model."""
    import copy

    from moebench.data import encode, load_text, windows
    from moebench.models import load

    base = load(str(trained_zoo))
    ctx = Context(calibration=Calibration(CalibrationSpec(samples=16, seqlen=128, batch_size=8), cache=False))
    ids = windows(encode(base.tokenizer, load_text("embedded:prose", "test")), 128, 16)
    kl = {}
    for method in ("rtn", "gptq", "awq"):
        moe = MoEModel(copy.deepcopy(base.model), base.adapter, tokenizer=base.tokenizer)
        apply(moe, method, ctx, bits=4, group_size=128)
        kl[method] = kl_from(base.model, moe.model, ids)
    assert kl["gptq"] < kl["rtn"] and kl["awq"] < kl["rtn"], kl


def test_awq_block_scale_minimises_the_block_output_error_over_the_grid():
    """The chosen scale is the grid point whose quantized gate/up give the least MoE-block output error."""
    from torch.nn.functional import silu

    from moebench_plugins.quantization.quant import RoutedExperts, awq_block_scale, awq_candidates

    g = torch.Generator().manual_seed(0)
    E, H, inter, n, k = 4, 64, 24, 96, 2
    gate_up = torch.randn(E, 2 * inter, H, generator=g) / 8
    down = torch.randn(E, H, inter, generator=g) / 5
    x = correlated(n, H) * torch.linspace(0.05, 6, H)
    index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(n)])
    weights = torch.rand(n, k, generator=g).softmax(-1)
    block = RoutedExperts(gate_up, down, silu, x, index, weights)
    mean = x.abs().mean(0)
    s, alpha, ratio = awq_block_scale(block, mean, 3, 16, grid=10)

    def block_error(scale):  # written out by hand: every token's weighted sum over its experts
        err = torch.zeros(n, H)
        for t in range(n):
            for j in range(k):
                e = int(index[t, j])
                wq = rtn(gate_up[e] * scale, 3, 16).dequantize() / scale
                ref = down[e] @ (silu(gate_up[e, :inter] @ x[t]) * (gate_up[e, inter:] @ x[t]))
                new = down[e] @ (silu(wq[:inter] @ x[t]) * (wq[inter:] @ x[t]))
                err[t] += weights[t, j] * (new - ref)
        return err.pow(2).mean().item()

    errors = {a: block_error(c) for a, c in awq_candidates(mean, 10)}
    assert alpha == min(errors, key=errors.get) and alpha > 0
    assert ratio == pytest.approx(errors[alpha] / errors[0.0], rel=1e-3) and ratio < 1
    torch.testing.assert_close(s, dict(awq_candidates(mean, 10))[alpha])


def test_awq_block_objective_shares_the_gate_up_scale_and_folds_down_into_up():
    moe = tiny(layers=2)
    changes = apply(moe, "awq", bits=4, group_size=32, storage="int4")
    assert changes["variant"].startswith("block")
    assert changes["variant"].endswith("unweighted inputs (reference)")  # the record says which weighting ran
    stored = moe.block(moe.moe_layers[0]).experts
    scales = stored.gate_up_input_scale.view(torch.float16)
    assert (scales == scales[0]).all() and not (scales == 1).all()  # one gate/up scale for the whole block
    assert (stored.down_input_scale.view(torch.float16) == 1).all()  # down's scale lives in the up rows
    assert changes["awq_error_vs_rtn"]["experts"]["max"] <= 1  # the grid holds RTN (alpha = 0)


def test_size_metric_counts_quantized_experts_without_dequantizing(monkeypatch):
    from moebench_plugins.metrics import parameter_counts

    fake, stored = tiny(), tiny()
    apply(fake, "rtn", context())
    apply(stored, "rtn", context(), storage="int4")
    expected = parameter_counts(fake)
    monkeypatch.setattr(PackedInt4Experts, "weight", lambda self, attr, e: pytest.fail("the size metric dequantized an expert"))
    assert parameter_counts(stored) == expected


def test_gptq_group_scales_come_from_the_block_start_weights_as_the_reference():
    """Reference GPTQ fits each group's scale to the weights as they stood when the block began
    (the first block: the original weights, i.e. RTN's scales); the earlier rule ("updated")
    fits groups after the in-block error feedback, so only its first group keeps RTN's scale."""
    torch.manual_seed(3)
    w, x = torch.randn(16, 96), torch.randn(256, 96)
    h = x.T @ x
    ref, rtn_q = gptq(w, h, 4, group_size=32), rtn(w, 4, group_size=32)
    torch.testing.assert_close(ref.scale, rtn_q.scale, rtol=0, atol=0)
    torch.testing.assert_close(ref.zero, rtn_q.zero, rtol=0, atol=0)
    updated = gptq(w, h, 4, group_size=32, group_weights="updated")
    torch.testing.assert_close(updated.scale[:, 0], rtn_q.scale[:, 0], rtol=0, atol=0)
    assert not torch.equal(updated.scale[:, 1:], rtn_q.scale[:, 1:])
    with pytest.raises(ValueError, match="group_weights"):
        gptq(w, h, 4, group_size=32, group_weights="later")
