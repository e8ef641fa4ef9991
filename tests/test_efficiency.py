"""FLOPs, memory and speed metrics (plugins/efficiency.py) on random zoo-config models of every architecture."""

from __future__ import annotations

import mmap

import pytest
import torch

from moebench import zoo
from moebench.adapter import MoEModel
from moebench.errors import MoebenchError
from moebench.method import Context
from moebench.params import ParamError, parse
from moebench.plugins import host
from moebench_plugins.metrics.efficiency import (
    Flops,
    FlopsParams,
    Memory,
    MemoryParams,
    Speed,
    SpeedParams,
    analytic_flops_per_token,
    count_flops,
    greedy_generate,
    measure_peak,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)
from moebench_plugins.metrics import parameter_counts, weight_bytes

ARCHS = zoo.names()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared CPU run far faster on one thread (no spinning OpenMP workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(name: str, seed: int = 0, **overrides) -> MoEModel:
    torch.manual_seed(seed)
    model = zoo.entry(name).cls(zoo.config(name, **overrides)).eval()
    return MoEModel(model, host().adapter_for(model), tokenizer=zoo.tokenizer(), source=f"random:{name}")


def drop_half(model: MoEModel) -> None:
    for block in list(model.blocks()):
        model.keep_experts(block.layer, range(block.num_experts // 2))


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("experts", ["grouped_mm", "eager"])
def test_flops_match_analytic_count(name, experts):
    model = random_model(name)
    model.config._experts_implementation = experts
    ids = torch.randint(3, 2048, (2, 48))
    measured = count_flops(model.model, ids) / ids.numel()
    analytic = analytic_flops_per_token(model, 48)
    assert measured == pytest.approx(analytic, rel=1e-9)
    # the count scales with what runs: attention grows with the sequence, matmuls do not
    longer = count_flops(model.model, torch.randint(3, 2048, (1, 96))) / 96
    assert longer > measured and longer == pytest.approx(analytic_flops_per_token(model, 96), rel=1e-9)


@pytest.mark.parametrize("name", ["deepseek_v2", "mixtral"])
def test_top_k_changes_flops_and_dropping_experts_only_the_router(name):
    model = random_model(name)
    params = FlopsParams(seqlen=32)
    before = Flops().measure(model, params, Context())["flops_per_token"]
    size_before, counts_before = weight_bytes(model.model), parameter_counts(model)
    routers = {b.layer: b.router_weight.numel() for b in model.blocks()}
    drop_half(model)
    after = Flops().measure(model, params, Context())["flops_per_token"]
    removed_router = sum(routers[b.layer] - b.router_weight.numel() for b in model.blocks())
    counts = parameter_counts(model)
    assert weight_bytes(model.model) < 0.9 * size_before and counts["total"] < counts_before["total"]
    # same top-k: each token still runs k experts; only the router's matmul shrinks
    assert counts_before["active"] - counts["active"] == removed_router
    assert before - after == pytest.approx(2 * removed_router, rel=1e-9)
    for block in list(model.blocks()):
        model.set_top_k(block.layer, 1)
    assert Flops().measure(model, params, Context())["flops_per_token"] < 0.9 * after


@pytest.mark.parametrize("name", ["deepseek_v2", "qwen2_moe"])
def test_analytic_count_follows_structural_edits(name):
    model = random_model(name)
    model.skip_moe(model.moe_layers[0])
    model.drop_layers([len(model.layers) - 1])
    for block in list(model.blocks()):
        model.keep_experts(block.layer, [0, 2, 5, 7, 9])
    ids = torch.randint(3, 2048, (1, 40))
    assert count_flops(model.model, ids) / 40 == pytest.approx(analytic_flops_per_token(model, 40), rel=1e-9)


@pytest.mark.parametrize("name", ARCHS)
def test_greedy_decode_with_cache_matches_generate(name):
    model = random_model(name).model
    ids = torch.randint(3, 2048, (2, 12))
    ours = greedy_generate(model, ids, 6)
    reference = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=2, eos_token_id=None)
    assert torch.equal(ours, reference[:, 12:])


def test_memory_reports_peak_and_checkpoint_size():
    model = random_model("deepseek_v2")
    params = MemoryParams(seqlen=64, decode=4, fresh_process=False)
    base = Memory().measure(model, params, Context())
    mem = base["memory"]
    assert mem["peak_kind"] in ("process_peak_rss", "cuda_peak_allocated")
    assert base["peak_memory_bytes"] > 0 and mem["increase_bytes"] >= 0
    # safetensors stores the raw tensors plus a small JSON header
    assert weight_bytes(model.model) <= mem["checkpoint_bytes"] < weight_bytes(model.model) + 2**20
    assert mem["stored_formats"].startswith("float32")
    drop_half(model)
    assert Memory().measure(model, params, Context())["memory"]["checkpoint_bytes"] < 0.9 * mem["checkpoint_bytes"]


def test_cpu_peak_is_per_run_not_process_lifetime():
    if not reset_peak_rss():
        pytest.skip("the peak-RSS mark cannot be reset on this system (the metric uses a fresh process)")
    model = random_model("mixtral").model
    ids = torch.randint(3, 2048, (1, 32))
    # 64 MiB of fresh pages, touched, then returned to the system: an anonymous mapping, so
    # the allocator cannot satisfy it from memory earlier tests freed but kept resident
    big = mmap.mmap(-1, 64 * 2**20)
    big.write(b"\1" * len(big))
    big.close()
    lifetime = peak_rss_bytes()
    peak = measure_peak(model, ids, 2)
    assert peak["kind"] == "process_peak_rss"
    assert peak["peak"] < lifetime - 32 * 2**20
    assert peak["before"] <= peak["peak"] and rss_bytes() <= peak["peak"] + 2**20


@pytest.mark.slow
def test_fresh_process_peak_follows_the_model_size():
    # wide experts, so dropping half of them moves the peak by far more than run-to-run noise
    model = random_model("qwen3_moe", moe_intermediate_size=512)
    params = MemoryParams(seqlen=32, decode=2)  # the CPU default: a new process per measurement
    base = Memory().measure(model, params, Context())
    drop_half(model)
    half = Memory().measure(model, params, Context())
    for out in (base, half):
        assert out["memory"]["peak_kind"].startswith("fresh_process_peak_rss")
        assert out["memory"]["above_runtime_bytes"] > weight_bytes(model.model)
    saved = base["memory"]["checkpoint_bytes"] - half["memory"]["checkpoint_bytes"]
    assert saved > 20 * 2**20
    assert base["peak_memory_bytes"] - half["peak_memory_bytes"] > 0.5 * saved


def test_speed_records_medians_spread_and_speedups():
    model = random_model("mixtral")
    params = SpeedParams(prefill=16, decode=3, batch_sizes=[1, 2], warmup=0, repeats=2)
    ctx = Context()
    base = Speed().measure(model, params, ctx)["speed"]
    assert base["speedup_prefill"] == base["speedup_decode"] == 1.0 and base["speedup_against"].startswith("itself")
    assert len(base["runs"]["decode_tok_s"]) == 2 and min(base["runs"]["decode_tok_s"]) <= base["decode_tok_s"]
    assert base["prefill_spread"] >= 0 and set(base["by_batch"]) == {"batch_2"}

    drop_half(model)
    half = {"speed": {**base, "prefill_tok_s": base["prefill_tok_s"] / 2, "decode_tok_s": base["decode_tok_s"] / 4}}
    run = Speed().measure(model, params, Context(baseline=half))["speed"]
    assert run["speedup_prefill"] == pytest.approx(run["prefill_tok_s"] / half["speed"]["prefill_tok_s"])
    assert run["speedup_decode"] == pytest.approx(run["decode_tok_s"] / half["speed"]["decode_tok_s"])
    assert run["by_batch"]["batch_2"]["speedup_decode"] == pytest.approx(
        run["by_batch"]["batch_2"]["decode_tok_s"] / base["by_batch"]["batch_2"]["decode_tok_s"]
    )

    ctx = Context(baseline={"speed": {**base, "setup": "batch 8, prefill 512, decode 3, 2 repeats after 0 warm-up"}})
    other = Speed().measure(model, SpeedParams(prefill=16, decode=3, warmup=0, repeats=1), ctx)["speed"]
    assert "speedup_prefill" not in other and any("other settings" in n for n in ctx.notes)
    # an edited model with no baseline gets no speedup rather than a made-up 1.0
    alone = Speed().measure(model, SpeedParams(prefill=16, decode=3, warmup=0, repeats=1), Context())["speed"]
    assert "speedup_decode" not in alone and alone["speedup_against"] is None


def test_dense_zeros_are_noted():
    model = random_model("olmoe")
    ctx = Context()
    Flops().measure(model, FlopsParams(seqlen=16), ctx)
    assert not ctx.notes
    with torch.no_grad():
        for block in model.blocks():
            block.gate_up_proj[:, ::2] = 0
            block.down_proj[..., ::2] = 0
    Flops().measure(model, FlopsParams(seqlen=16), ctx)
    assert any("exact zeros stored densely" in n for n in ctx.notes)


def test_bad_parameters_say_what_was_expected():
    with pytest.raises(ParamError, match="batch_sizes must be a non-empty list of distinct"):
        parse(SpeedParams, {"batch_sizes": []})
    with pytest.raises(ParamError, match="split must be one of"):
        parse(FlopsParams, {"split": "dev"})
    with pytest.raises(ParamError, match="fresh_process needs checkpoint"):
        parse(MemoryParams, {"fresh_process": True, "checkpoint": False})
    with pytest.raises(MoebenchError, match="fewer than one prompt"):
        Flops().measure(random_model("mixtral"), FlopsParams(seqlen=10**7), Context())


def test_metrics_are_registered_plugins():
    metrics = host().metrics
    assert {"flops", "memory", "speed", "lm_eval"} <= set(metrics)
    assert metrics["speed"].relative and not metrics["flops"].always


def test_token_streams_are_cached_per_tokenizer_and_text():
    from moebench import data

    tok = zoo.tokenizer()
    text = data.load_text("embedded:prose", "validation")
    first = data.encode(tok, text)
    first[:10] = -1  # a caller's edits must not reach the cache
    again = data.encode(zoo.tokenizer(), text)  # another object, same definition: a hit
    assert again[0] >= 0 and torch.equal(again, data.encode(tok, text))
    assert torch.equal(again[:50], torch.tensor(tok(text[:200], add_special_tokens=False)["input_ids"])[:50])
    assert len(data.encode(tok, text + " more words")) > len(again)  # other text, other entry


def test_a_suite_records_every_measurement_for_baseline_and_method(tmp_path, checkpoint):
    import textwrap

    from moebench.runner import RunOptions, run_suite
    from moebench.store import read_records
    from moebench.suite import load_suite

    suite = tmp_path / "all.toml"
    suite.write_text(textwrap.dedent(f"""
        [suite]
        name = "all"
        [model]
        source = "{checkpoint("mixtral")}"
        [hardware]
        threads = 1
        [calibration]
        samples = 4
        seqlen = 32
        [eval.perplexity]
        seqlen = 32
        max_samples = 4
        [eval.lm_eval]
        limit = 4
        [eval.flops]
        seqlen = 32
        [eval.memory]
        seqlen = 32
        decode = 2
        fresh_process = false
        [eval.speed]
        prefill = 16
        decode = 2
        warmup = 0
        repeats = 2
        [[methods]]
        name = "drop-half"
        method = "expert_drop"
        params = {{ keep_ratio = 0.5 }}
    """))
    run_suite(load_suite(suite), RunOptions(out=tmp_path / "out", log=lambda m: None))
    base, drop = (r["metrics"] for r in read_records(tmp_path / "out" / "results.jsonl"))
    for m in (base, drop):
        assert m["perplexity"]["value"] > 1 and m["params"]["total"] >= m["params"]["active"]
        assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(m["lm_eval"]["pydoc_mc"])
        assert m["flops_per_token"] > 0 and m["flops"]["analytic_per_token"] == m["flops_per_token"]
        assert m["peak_memory_bytes"] > 0 and m["memory"]["peak_kind"] and m["memory"]["checkpoint_bytes"] > 0
        assert m["speed"]["prefill_tok_s"] > 0 and m["speed"]["decode_tok_s"] > 0 and m["speed"]["speedup_decode"] > 0
    assert base["speed"]["speedup_prefill"] == 1.0 and drop["speed"]["speedup_against"].startswith("the suite's baseline")
    assert drop["speed"]["speedup_prefill"] == pytest.approx(drop["speed"]["prefill_tok_s"] / base["speed"]["prefill_tok_s"])
    assert drop["weight_bytes"] < 0.8 * base["weight_bytes"] and drop["params"]["total"] < base["params"]["total"]
    assert drop["memory"]["checkpoint_bytes"] < 0.8 * base["memory"]["checkpoint_bytes"]
    assert drop["flops_per_token"] == pytest.approx(base["flops_per_token"], rel=0.01)  # top-k unchanged
    assert drop["compress_seconds"] > 0


def test_compression_time_is_recorded_per_step_of_a_pipeline(tmp_path, checkpoint):
    import textwrap

    from moebench.runner import RunOptions, run_suite
    from moebench.store import read_records
    from moebench.suite import load_suite

    suite = tmp_path / "pipe.toml"
    suite.write_text(textwrap.dedent(f"""
        [model]
        source = "{checkpoint("mixtral")}"
        [calibration]
        samples = 4
        seqlen = 32
        [[methods]]
        name = "two-steps"
        pipeline = [{{ method = "expert_drop", keep_ratio = 0.5 }}, {{ method = "layer_drop", n = 1 }}]
    """))
    run_suite(load_suite(suite), RunOptions(out=tmp_path / "out", log=lambda m: None))
    base, run = (r["metrics"] for r in read_records(tmp_path / "out" / "results.jsonl"))
    assert "compress_seconds" not in base
    steps = run["compress_seconds_by_step"]
    assert set(steps) == {"expert_drop", "layer_drop"} and 0 < sum(steps.values()) <= run["compress_seconds"]
