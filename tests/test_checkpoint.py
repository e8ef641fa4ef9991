"""Piecemeal checkpoint reading: kept experts only, FP8 block dequantization, layer-by-layer streaming."""

from __future__ import annotations

import json

import pytest
import torch
from moebench import checkpoint as ck
from moebench import models
from moebench.errors import MoebenchError
from moebench.plugins import host
from safetensors import safe_open

ARCHS = ["deepseek_v2", "deepseek_v3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def _ids(n=2, length=24, seed=0):
    return torch.randint(3, 2000, (n, length), generator=torch.Generator().manual_seed(seed))


# Loads that reach the same weights by different routes (sliced at read time, or loaded whole
# and sliced after; packed or per-expert layouts) may run the expert sums in a different
# order or memory layout: equal to float rounding (~1e-6 here), while a wrong or missing
# expert moves these logits by ~1e-1 (the packed test below checks its tolerance catches one).
SAME = dict(rtol=1e-5, atol=1e-5)


def _every_other(model):
    return {b.layer: list(range(b.num_experts - 1, -1, -2)) for b in model.blocks()}  # reversed order, too


# -- FP8 blocks ---------------------------------------------------------------------------
def _fp8_bound(w: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Worst-case e4m3 rounding error of each element: half a step (3 mantissa bits) or the subnormal step."""
    s = scale.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., : w.shape[-2], : w.shape[-1]]
    return 2.0**-4 * w.abs() + 2.0**-9 * s + 1e-7


def test_quantize_dequantize_partial_blocks_and_zero_blocks():
    w = torch.randn(300, 200) * torch.logspace(-3, 1, 200)  # columns of very different magnitude
    w[:128, :128] = 0  # an all-zero block must not divide by zero
    q, scale = ck.quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.shape == (3, 2) and scale.dtype == torch.float32
    back = ck.dequantize_fp8(q, scale)
    assert torch.isfinite(back).all() and (back[:128, :128] == 0).all()
    err = (back - w).abs()
    assert (err <= _fp8_bound(w, scale)).all()
    assert err.max() > 0  # really quantized
    # each block's largest magnitude maps to the e4m3 maximum
    assert q[128:256, :128].float().abs().max() == ck.E4M3_MAX


def test_dequantize_refuses_a_scale_of_the_wrong_shape():
    q, scale = ck.quantize_fp8(torch.randn(256, 256))
    with pytest.raises(MoebenchError, match="does not fit a weight of shape"):
        ck.dequantize_fp8(q, scale[:1])


def test_fp8_checkpoint_written_in_deepseek_v3_format_loads_back_within_rounding(checkpoint, tmp_path):
    src = checkpoint("deepseek_v3")
    dst = ck.write_fp8(src, tmp_path / "fp8")
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        expert = "model.layers.1.mlp.experts.3.gate_proj.weight"
        assert f.get_tensor(expert).dtype == torch.float8_e4m3fn
        assert f.get_tensor(expert + "_scale_inv").shape == (1, 1)  # [64, 128] fits one 128x128 block
        assert f.get_tensor("model.layers.1.self_attn.kv_b_proj.weight").dtype == torch.float8_e4m3fn
        for plain in ("model.layers.1.mlp.gate.weight", "model.embed_tokens.weight", "lm_head.weight", "model.layers.1.input_layernorm.weight"):
            assert f.get_tensor(plain).dtype == torch.float32 and plain + "_scale_inv" not in names
        scales = {n[: -len("_scale_inv")]: f.get_tensor(n) for n in names if n.endswith("_scale_inv")}

    original = models.load(str(src)).model.state_dict()
    loaded, report = ck.load(dst)
    assert report.fp8
    state = loaded.model.state_dict()
    assert state.keys() == original.keys()
    quantized = 0
    for key, w in original.items():
        got = state[key]
        assert got.dtype == torch.float32 and got.shape == w.shape
        if key.endswith(("gate_up_proj", "down_proj")) and ".experts." in key:  # packed from per-expert FP8 tensors
            assert (got - w).abs().max() <= 2.0**-4 * w.abs().max() + 1e-6
            assert not torch.equal(got, w)
            quantized += 1
        elif key in scales:
            assert ((got - w).abs() <= _fp8_bound(w, scales[key])).all(), key
            assert not torch.equal(got, w), key
            quantized += 1
        else:
            assert torch.equal(got, w), key
    assert quantized > 10


def test_other_quantization_formats_are_refused(checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "bnb"
    shutil.copytree(checkpoint("mixtral"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoebenchError, match="quantized with 'bitsandbytes'"):
        ck.load(folder)


# -- partial loading ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_partial_load_equals_full_load_then_keep(arch, checkpoint):
    path = checkpoint(arch)
    full = models.load(str(path))
    keep = _every_other(full)
    complete, full_report = ck.load(path)
    part, report = ck.load(path, keep=keep)
    for layer, experts in keep.items():
        full.keep_experts(layer, experts)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(part.model(input_ids=ids).logits, full.model(input_ids=ids).logits, **SAME)
    assert part.lineage == full.lineage  # same cache keys as a full load followed by keep_experts
    assert report.experts_kept * 2 == report.experts_total
    # exactly the dropped experts (and their router rows and per-expert router buffers) were not read
    dropped = 0
    for block in complete.blocks():
        n_drop = block.num_experts - len(keep[block.layer])
        per_expert = (block.gate_up_proj[0].numel() + block.down_proj[0].numel() + block.router_weight[0].numel()) * 4
        per_expert += sum(getattr(block.router, b)[0].element_size() for b in complete.adapter.expert_buffers)
        dropped += n_drop * per_expert
    assert full_report.bytes_read - report.bytes_read == dropped


def test_partial_load_of_an_fp8_checkpoint(checkpoint, tmp_path):
    dst = ck.write_fp8(checkpoint("deepseek_v2"), tmp_path / "fp8")
    full, full_report = ck.load(dst)
    keep = _every_other(full)
    part, report = ck.load(dst, keep=keep)
    for layer, experts in keep.items():
        full.keep_experts(layer, experts)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(part.model(input_ids=ids).logits, full.model(input_ids=ids).logits, **SAME)
    assert report.bytes_read < full_report.bytes_read


def test_partial_load_of_a_packed_moebench_checkpoint(checkpoint, tmp_path):
    """A model with per-layer expert counts saves in the packed layout; rows are sliced from the 3-D tensors."""
    moe = models.load(str(checkpoint("qwen3_moe")))
    moe.keep_experts(moe.moe_layers[0], [0, 1, 2, 3, 5, 8])
    moe.save(tmp_path / "packed")
    with safe_open(str(next((tmp_path / "packed").glob("*.safetensors"))), "pt") as f:
        assert any(k.endswith("experts.gate_up_proj") for k in f.keys())  # noqa: SIM118
    ref = models.load(str(tmp_path / "packed"))
    keep = {ref.moe_layers[0]: [5, 0, 2, 3], ref.moe_layers[1]: [1, 2, 3, 4, 6, 7]}
    part, _ = ck.load(tmp_path / "packed", keep=keep)
    for layer, experts in keep.items():
        ref.keep_experts(layer, experts)
    ids = _ids()
    with torch.no_grad():
        got = part.model(input_ids=ids).logits
        torch.testing.assert_close(got, ref.model(input_ids=ids).logits, **SAME)
        # the tolerance still catches a real error: one expert of layer 0 swapped for another
        wrong, _ = ck.load(tmp_path / "packed", keep={**keep, ref.moe_layers[0]: [5, 0, 2, 1]})
        with pytest.raises(AssertionError):
            torch.testing.assert_close(got, wrong.model(input_ids=ids).logits, **SAME)
    assert part.expert_counts()[part.moe_layers[0]] == 4


def test_partial_load_errors(checkpoint, tmp_path):
    path = checkpoint("deepseek_v2")
    with pytest.raises(MoebenchError, match="without a MoE block"):
        ck.load(path, keep={0: [0, 1]})  # layer 0 is dense in DeepSeek
    with pytest.raises(ValueError, match="distinct"):
        ck.load(path, keep={1: [0, 0]})
    with pytest.raises(MoebenchError, match="no \\*.safetensors"):
        ck.Checkpoint(tmp_path)


# -- layer-by-layer streaming -------------------------------------------------------------
def test_streaming_calibration_matches_a_full_pass_one_layer_resident(checkpoint):
    path = checkpoint("deepseek_v3")
    stream = ck.LayerStream(path)
    ids = _ids(4, 32)
    names = ["router_logits", "routing_counts", "router_mass"]
    streamed = stream.statistics(names, ids, batch_size=2)
    assert stream.max_resident == 1 and not stream.resident
    assert all(p.is_meta for layer in stream.layers for p in layer.parameters())  # nothing left behind

    full = models.load(str(path))
    collectors = [host().statistic(n)(full) for n in names]
    handles = [h for c in collectors for h in c.attach()]
    with torch.no_grad():
        for start in range(0, 4, 2):
            full.model(input_ids=ids[start : start + 2], use_cache=False)
    for h in handles:
        h.remove()
    ref = {c.name: c.result() for c in collectors}
    for layer in full.moe_layers:
        torch.testing.assert_close(streamed["router_logits"][layer], ref["router_logits"][layer])
        assert torch.equal(streamed["routing_counts"][layer], ref["routing_counts"][layer])
        torch.testing.assert_close(streamed["router_mass"][layer]["prob"], ref["router_mass"][layer]["prob"])


def test_streaming_refuses_statistics_that_span_layers(checkpoint):
    stream = ck.LayerStream(checkpoint("mixtral"))
    with pytest.raises(MoebenchError, match="layer_similarity"):
        stream.statistics(["layer_similarity"], _ids())


def test_stop_at_router_reads_no_routed_experts(checkpoint):
    path = checkpoint("deepseek_v2")
    stream = ck.LayerStream(path)
    before = stream.ckpt.bytes_read
    stat = host().statistic("router_logits")(stream.model)
    handles = stat.attach()
    first_moe = stream.model.moe_layers[0]
    stream.run(_ids(), stop_at_router=first_moe)
    for h in handles:
        h.remove()
    logits = stat.result()
    assert list(logits) == [first_moe]
    read = stream.ckpt.bytes_read - before
    experts = sum(b.gate_up_proj.numel() + b.down_proj.numel() for b in stream.model.blocks()) * 4
    assert 0 < read < experts / len(stream.model.moe_layers)  # not even one layer's experts

    full = models.load(str(path))
    stat = host().statistic("router_logits")(full)
    handles = stat.attach()
    with torch.no_grad():
        full.model(input_ids=_ids(), use_cache=False)
    for h in handles:
        h.remove()
    torch.testing.assert_close(logits[first_moe], stat.result()[first_moe])



def test_streaming_an_fp8_checkpoint_with_kept_experts(checkpoint, tmp_path):
    """What a larger-than-memory DeepSeek-V3 calibration does: FP8 dequantized layer by layer, kept experts only."""
    dst = ck.write_fp8(checkpoint("deepseek_v3"), tmp_path / "fp8")
    full, _ = ck.load(dst)
    keep = _every_other(full)
    stream = ck.LayerStream(dst, keep=keep)
    ids = _ids(2, 32)
    streamed = stream.statistics(["routing_counts"], ids)["routing_counts"]
    part, _ = ck.load(dst, keep=keep)
    ref = host().statistic("routing_counts")(part)
    handles = ref.attach()
    with torch.no_grad():
        part.model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    for layer, counts in ref.result().items():
        assert counts.numel() == len(keep[layer]) and torch.equal(streamed[layer], counts)
    assert stream.max_resident == 1
