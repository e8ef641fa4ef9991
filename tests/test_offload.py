"""``[model] offload = "disk"``: layers streamed from the checkpoint give what the in-memory path gives.

Compression (WANDA, GPTQ with packed int4 storage, RTN), calibration statistics and
perplexity run one decoder layer at a time on a model whose other layers stay on the
meta device; each step writes a checkpoint shard per layer. The results must equal the
in-memory path's: same masks and codes (exactly), same logits and perplexity (to float
rounding), and the written checkpoint loads back with moebench's loader and, where no
moebench structure is recorded, with plain transformers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from moebench import offload
from moebench.calibration import Calibration, CalibrationSpec
from moebench.errors import MoebenchError
from moebench.method import Context
from moebench.models import load, load_pretrained
from moebench.params import parse
from moebench.plugins import host
from moebench.suite import parse_suite

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _context() -> Context:
    return Context(calibration=Calibration(CalibrationSpec(samples=4, seqlen=32, batch_size=2), cache=False))


def _apply(model, method: str, **table) -> dict:
    cls = host().method(method)
    return cls().apply(model, parse(cls.Params, table), _context())


def _streamed(path, out: Path, method: str, **table):
    """``method`` applied to checkpoint ``path`` streamed layer by layer, written to ``out``; what it returned."""
    model = offload.open_model(path)
    assert all(p.is_meta for layer in model.layers for p in layer.parameters())  # nothing of the layers loaded
    model.stream.begin(out)
    changes = _apply(model, method, **table)
    model.stream.end(method)
    assert all(p.is_meta for layer in model.layers for p in layer.parameters())  # and nothing left behind
    return model, changes


def _probe(n=2, length=20):
    return torch.randint(3, 2000, (n, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ds(checkpoint):
    return checkpoint("deepseek_v2")


@pytest.mark.slow
def test_streamed_wanda_writes_the_in_memory_masks_and_logits(ds, tmp_path):
    memory = load(str(ds))
    expected = _apply(memory, "wanda", sparsity=0.5)
    model, changes = _streamed(ds, tmp_path / "out", "wanda", sparsity=0.5)
    assert changes["sparsity"] == expected["sparsity"] and changes["weights"] == expected["weights"]
    assert changes["calibration"]["layers"] == len(memory.layers)
    back = load_pretrained(tmp_path / "out")
    state, want = back.state_dict(), memory.model.state_dict()
    assert state.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(state[key], value), key  # the same zeros and the same kept weights
    ids = _probe()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, memory.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # no moebench structure: plain transformers reads the written shards and index too
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, memory.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(memory.layers) + 1  # one shard per layer, one for the rest


@pytest.mark.slow
def test_streamed_gptq_int4_writes_the_in_memory_codes(ds, tmp_path):
    memory = load(str(ds))
    expected = _apply(memory, "gptq", storage="int4", group_size=32)
    model, changes = _streamed(ds, tmp_path / "out", "gptq", storage="int4", group_size=32)
    assert changes["stored_bytes"] == expected["stored_bytes"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["moebench"]["modules"]  # packed int4 experts: rebuilt from config.moebench
    back = load_pretrained(tmp_path / "out")
    state, want = back.state_dict(), memory.model.state_dict()
    codes = [k for k in want if k.endswith("_qweight")]
    assert codes and state.keys() == want.keys()
    for key in codes:
        assert torch.equal(state[key], want[key]), key
    ids = _probe()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, memory.model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # the next step and the metrics read the written checkpoint with its int4 modules
    assert model.stream.source == tmp_path / "out"
    from moebench_plugins.metrics import perplexity, streamed_perplexity

    ids = _probe(4, 24)
    assert streamed_perplexity(model, ids, batch_size=2) == pytest.approx(perplexity(back, ids, batch_size=2), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method,table", [
    ("sparsegpt", {"sparsity": 0.5}),
    ("awq", {"targets": ["experts", "attention"]}),  # AWQ folds scales into the layer's norms too
    ("magnitude", {"sparsity": 0.5}),
    ("moequant", {"calibration": "data"}),
])
def test_every_streaming_method_writes_the_in_memory_weights(ds, tmp_path, method, table):
    memory = load(str(ds))
    _apply(memory, method, **table)
    _streamed(ds, tmp_path / "out", method, **table)
    back, want = load_pretrained(tmp_path / "out").state_dict(), memory.model.state_dict()
    assert back.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(back[key], value, rtol=1e-6, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.slow
def test_gptq_in_expert_slices_gives_the_same_codes_holding_fewer_hessians(ds):
    whole = load(str(ds))
    sliced = load(str(ds))
    a = _apply(whole, "gptq", storage="int4", group_size=32)
    b = _apply(sliced, "gptq", storage="int4", group_size=32, expert_chunk=3)  # slices of 3, 3, ... and a remainder
    want, got = whole.model.state_dict(), sliced.model.state_dict()
    codes = [k for k in want if "_qweight" in k or "_scales" in k or "_zeros" in k]
    assert codes
    for key in codes:
        assert torch.equal(got[key], want[key]), key
    assert b["calibration"]["peak_stats_bytes"] < a["calibration"]["peak_stats_bytes"]
    assert b["stored_bytes"] == a["stored_bytes"]


def test_streamed_perplexity_equals_the_in_memory_perplexity(ds):
    from moebench_plugins.metrics import perplexity, streamed_perplexity

    ids = _probe(5, 24)
    memory = load(str(ds))
    streamed = offload.open_model(ds)
    value = streamed_perplexity(streamed, ids, batch_size=2)
    assert value == pytest.approx(perplexity(memory.model, ids, batch_size=2), rel=1e-5)
    assert streamed.stream.reader.max_resident == 1


def test_streamed_statistics_equal_a_full_pass_and_cross_layer_ones_are_refused(ds):
    names = [n for n, cls in host().statistics.items() if cls.streamable]
    assert {"routing_counts", "moe_io", "reap", "coactivation", "expert_mean_output"} <= set(names)
    memory = Calibration(CalibrationSpec(samples=4, seqlen=32, batch_size=2), cache=False).run(load(str(ds)), names)
    streamed_model = offload.open_model(ds)
    streamed = Calibration(CalibrationSpec(samples=4, seqlen=32, batch_size=2), cache=False).run(streamed_model, names)
    assert streamed.keys() == memory.keys()
    for name in names:
        torch.testing.assert_close(streamed[name], memory[name], rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    with pytest.raises(MoebenchError, match="layer_similarity relate several layers"):
        Calibration(CalibrationSpec(samples=4, seqlen=32), cache=False).run(streamed_model, ["layer_similarity"])


def _suite(source, methods: str, model_extra: str = 'offload = "disk"', evals: str = "") -> str:
    return textwrap.dedent(f"""
        [suite]
        name = "off"
        [model]
        source = "{source}"
        {model_extra}
        [calibration]
        samples = 4
        seqlen = 32
        batch_size = 2
        [eval.perplexity]
        seqlen = 32
        max_samples = 4
        batch_size = 2
        {evals}
    """) + textwrap.dedent(methods)


def _parse(text: str):
    import tomllib

    return parse_suite(tomllib.loads(text), "s.toml")


def test_suite_refuses_what_cannot_stream_in_one_line(ds):
    wanda = '[[methods]]\nname = "w"\nmethod = "wanda"\nparams = { sparsity = 0.5 }\n'
    assert _parse(_suite(ds, wanda)).model.offload == "disk"
    cases = {
        _suite(ds, wanda, 'offload = "tape"'): "model.offload.*expected one of 'disk'.*got 'tape'",
        _suite(ds, '[[methods]]\nname = "m"\nmethod = "merge"\n'): "methods\\[0\\].*method 'merge' cannot run with \\[model\\] offload",
        _suite(ds, '[[methods]]\nname = "q"\nmethod = "moequant"\n'): "method 'moequant'.*self-sampled.*calibration = 'data'",
        _suite(ds, wanda, evals="[eval.speed]"): "eval.speed.*needs the whole model in memory",
        _suite(ds, wanda, 'offload = "disk"\ndevice = "auto"'): "model.offload.*not 'auto'",
    }
    for text, message in cases.items():
        with pytest.raises(MoebenchError, match=message) as caught:
            _parse(text)
        assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_suite_run_with_offload_saves_what_the_in_memory_run_saves(ds, tmp_path, isolated_cache):
    from moebench.runner import RunOptions, run_suite

    methods = '[[methods]]\nname = "w"\nmethod = "wanda"\nparams = { sparsity = 0.5 }\n'
    records = {}
    for mode, extra in (("memory", ""), ("disk", 'offload = "disk"')):
        suite = _parse(_suite(ds, methods, extra))
        result = run_suite(suite, RunOptions(out=tmp_path / mode, save_models=tmp_path / f"{mode}-models", log=lambda m: None))
        records[mode] = {r.name: r for r in result.records}
    for name in ("baseline", "w"):
        disk, memory = records["disk"][name], records["memory"][name]
        assert disk.status == "ok", disk.error
        assert disk.metrics["perplexity"]["value"] == pytest.approx(memory.metrics["perplexity"]["value"], rel=1e-5)
        assert disk.metrics["params"] == memory.metrics["params"]
        assert disk.metrics["weight_bytes"] == memory.metrics["weight_bytes"]
        assert any(n.startswith("offload=disk") for n in disk.notes) and not any(n.startswith("offload") for n in memory.notes)
    saved = Path(records["disk"]["w"].saved_model["path"])
    back, want = load_pretrained(saved), load_pretrained(records["memory"]["w"].saved_model["path"])
    ids = _probe()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, want(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert not list((isolated_cache / "offload").glob("stream-*"))  # intermediate outputs removed


@pytest.mark.slow
def test_a_compressed_checkpoint_is_evaluated_streamed_as_in_memory(ds, tmp_path, isolated_cache):
    """A data-free step streams too (RTN, packed int4); the model it wrote, too large for memory in real life,
    is evaluated layer by layer with the perplexity the in-memory load gives."""
    from moebench.runner import RunOptions, run_suite

    memory = load(str(ds))
    expected = _apply(memory, "rtn", storage="int4", group_size=32)
    _, changes = _streamed(ds, tmp_path / "int4", "rtn", storage="int4", group_size=32)
    assert changes["stored_bytes"] == expected["stored_bytes"]
    ppl = {}
    for mode, extra in (("memory", ""), ("disk", 'offload = "disk"')):
        suite = _parse(_suite(tmp_path / "int4", "", extra))
        (record,) = run_suite(suite, RunOptions(out=tmp_path / mode, log=lambda m: None)).records
        assert record.status == "ok", record.error
        ppl[mode] = record.metrics["perplexity"]["value"]
    assert ppl["disk"] == pytest.approx(ppl["memory"], rel=1e-5)


@pytest.mark.slow
def test_peak_memory_is_flat_in_depth_and_under_half_the_checkpoint():
    """Streamed WANDA on shape twins of 4 and 16 layers (DeepSeek-V2-Lite width, 4 routed experts, float32),
    each in a fresh process (peak RSS is a high-water mark)."""
    peaks = {}
    for layers in (4, 16):
        done = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "offload_memory.py"), "--layers", str(layers), "--json"],
            capture_output=True, text=True, timeout=900,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[layers] = json.loads(done.stdout.strip().splitlines()[-1])
    small, large = peaks[4], peaks[16]
    assert large["peak_rss_bytes"] - small["peak_rss_bytes"] <= large["layer_bytes"]
    assert large["peak_rss_bytes"] < large["checkpoint_bytes"] / 2
