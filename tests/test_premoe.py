"""PreMoe: TCESS scores, compact patterns, the FAISS task index on disk, the method, per-task evaluation."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from moebench import checkpoint as ck
from moebench import models
from moebench_plugins.premoe import index as premoe
from moebench.calibration import Calibration, CalibrationSpec
from moebench.data import load_text
from moebench.errors import MoebenchError, SuiteError
from moebench.method import Context
from moebench.suite import parse_suite

TASKS = {"prose": premoe.TaskSpec("prose", "embedded:prose"), "code": premoe.TaskSpec("code", "embedded:code")}
SPEC = CalibrationSpec(samples=4, seqlen=32)


# -- PEP ----------------------------------------------------------------------------------
def test_tcess_marks_top_k_logits_and_applies_the_threshold():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0], [0.0, 2.0, 2.1, -5.0]])
    # top-2: token 0 -> experts 0, 1; token 1 -> experts 2, 1
    torch.testing.assert_close(premoe.tcess(logits, 2), torch.tensor([2.0, 2.5, 1.05, 0.0]))
    # renormalised over the top-2: token 0 gives (0.73, 0.27), token 1 (0.52, 0.48): r = 0.5 drops 1 and 1
    torch.testing.assert_close(premoe.tcess(logits, 2, threshold=0.5), torch.tensor([2.0, 0.0, 1.05, 0.0]))
    with pytest.raises(MoebenchError, match="tokens, experts"):
        premoe.tcess(torch.zeros(0, 4), 2)


def test_tcess_with_the_reference_k_of_one_marks_only_each_tokens_best_expert():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0], [0.0, 2.0, 2.1, -5.0], [1.0, 0.5, 0.0, 0.2]])
    # k = 1: token 0 -> expert 0 (4.0), token 1 -> expert 2 (2.1), token 2 -> expert 0 (1.0); mean over 3 tokens
    expected = torch.tensor([5.0 / 3, 0.0, 2.1 / 3, 0.0])
    torch.testing.assert_close(premoe.layer_scores({0: logits}, {0: 2})[0], expected)
    torch.testing.assert_close(premoe.layer_scores({0: logits}, {0: 2}, k=0)[0], premoe.tcess(logits, 2))
    assert premoe.IndexSettings().k == 1


def test_pattern_permutations_reconstruct_every_layer_ranking():
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(16, generator=g) for _ in range(5)]
    scores[2][3:6] = 0.5  # ties resolve by expert index
    pattern = premoe.Pattern.from_scores(scores, key_layer=1)
    assert pattern.perms.dtype == torch.int16 and pattern.perms.shape == (5, 16)
    torch.testing.assert_close(pattern.key, scores[1])
    for got, s in zip(pattern.rankings(), scores):
        assert torch.equal(got, premoe.ranking(s))
    assert pattern.keep(3) == [premoe.ranking(s)[:3].tolist() for s in scores]
    with pytest.raises(MoebenchError, match="same routed expert count"):
        premoe.Pattern.from_scores([torch.randn(16), torch.randn(8)], 0)


# -- the index ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ds_model(checkpoint):
    return models.load(str(checkpoint("deepseek_v2")))


@pytest.fixture(scope="module")
def index(ds_model):
    return premoe.build(ds_model, TASKS, SPEC, premoe.IndexSettings(threshold=0.1, key_layer=1), cache=False)


def test_index_saves_and_loads_back_identically(index, ds_model, tmp_path):
    folder = index.save(tmp_path / "idx")
    back = premoe.TaskIndex.load(folder, ds_model)
    assert back.tasks == index.tasks == ["prose", "code"]
    assert back.settings == index.settings and back.signature == index.signature and back.info == index.info
    for a, b in zip(back.patterns, index.patterns):
        assert torch.equal(a.key, b.key) and torch.equal(a.perms, b.perms)
    query = index.patterns[1].key + 0.01
    assert back.search(query) == index.search(query)
    assert back.search(query)[0][0] == "code"
    assert back.keep("prose", 5) == index.keep("prose", 5)
    # saving again gives the same FAISS bytes and the same patterns and header
    again = back.save(tmp_path / "idx2")
    assert (again / "index.faiss").read_bytes() == (folder / "index.faiss").read_bytes()
    from safetensors import safe_open

    with safe_open(str(again / "patterns.safetensors"), "pt") as a, safe_open(str(folder / "patterns.safetensors"), "pt") as b:
        assert a.metadata() == b.metadata() and torch.equal(a.get_tensor("perms"), b.get_tensor("perms"))


def test_index_patterns_follow_the_task_scores(index, ds_model):
    from moebench.calibration import Calibration

    logits = Calibration(CalibrationSpec(data="embedded:code", samples=4, seqlen=32), cache=False).stats(ds_model, ["router_logits"])["router_logits"]
    scores = premoe.layer_scores(logits, {b.layer: b.top_k for b in ds_model.blocks()}, 0.1)
    kept = index.keep("code", 6)
    for layer in ds_model.moe_layers:
        assert kept[layer] == premoe.ranking(scores[layer])[:6].tolist()


def test_corrupt_or_mismatched_index_is_refused(index, ds_model, checkpoint, tmp_path):
    folder = index.save(tmp_path / "idx")
    # a flipped byte in the FAISS file
    data = bytearray((folder / "index.faiss").read_bytes())
    data[-5] ^= 0xFF
    (folder / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(MoebenchError, match="index.faiss is corrupt"):
        premoe.TaskIndex.load(folder)
    # a truncated patterns file
    folder = index.save(tmp_path / "idx2")
    raw = (folder / "patterns.safetensors").read_bytes()
    (folder / "patterns.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MoebenchError, match="patterns.safetensors is corrupt"):
        premoe.TaskIndex.load(folder)
    with pytest.raises(MoebenchError, match="missing index.faiss"):
        premoe.TaskIndex.load(tmp_path)
    # another model: other expert count, other weights of the same shape
    folder = index.save(tmp_path / "idx3")
    fewer = models.load(str(_checkpoint_with(checkpoint, tmp_path / "e8", n_routed_experts=8)))
    with pytest.raises(MoebenchError, match="routed experts per layer \\[16, 16, 16, 16\\] there, \\[8, 8, 8, 8\\] here"):
        premoe.TaskIndex.load(folder, fewer)
    other = models.load(str(_checkpoint_with(checkpoint, tmp_path / "seed1", seed=1)))
    with pytest.raises(MoebenchError, match="router weights"):
        premoe.TaskIndex.load(folder, other)
    assert premoe.TaskIndex.load(folder, ds_model).tasks == ["prose", "code"]


def _checkpoint_with(_fixture, folder, seed=0, **overrides):
    from conftest import make_checkpoint

    return make_checkpoint(folder, "deepseek_v2", seed=seed, **overrides)


def test_index_is_cached_per_model_and_settings(ds_model, isolated_cache):
    settings = premoe.IndexSettings()
    first = premoe.cached(ds_model, TASKS, SPEC, settings)
    assert len(list((isolated_cache / "premoe").iterdir())) == 1
    again = premoe.cached(ds_model, TASKS, SPEC, settings)
    assert [torch.equal(a.perms, b.perms) for a, b in zip(first.patterns, again.patterns)] == [True, True]
    premoe.cached(ds_model, TASKS, SPEC, premoe.IndexSettings(threshold=0.3))
    assert len(list((isolated_cache / "premoe").iterdir())) == 2


# -- the method and deployment -------------------------------------------------------------
def _suite(source, methods="", evals=""):
    raw = f"""
        [model]
        source = "{source}"
        [calibration]
        samples = 4
        seqlen = 32
        [tasks.prose]
        data = "embedded:prose"
        [tasks.code]
        data = "embedded:code"
    """
    import tomllib

    return parse_suite(tomllib.loads(textwrap.dedent(raw) + textwrap.dedent(evals) + textwrap.dedent(methods)), "t.toml")


def test_method_keeps_the_task_experts_and_retrieval_deploys_from_the_checkpoint(checkpoint, isolated_cache):
    from moebench.plugins import host

    path = checkpoint("deepseek_v2")
    suite = _suite(path)
    method = host().method("premoe")()
    params = method.Params(keep=6, task="retrieve", query="code", query_tokens=64)
    model = models.load(str(path))
    ctx = Context(calibration=Calibration(SPEC), suite=suite)
    changes = method.apply(model, params, ctx)
    assert changes["notation"] == "4/6" and changes["experts_after"] == 6 * 4 and changes["experts_before"] == 16 * 4
    assert changes["tcess_k"] == 1  # the reference's TCESS ran (the record says so)
    assert set(changes["retrieval"]["distances"]) == {"prose", "code"} and changes["retrieval"]["expected"] == "code"
    assert changes["retrieval"]["correct"] == (changes["task"] == "code")
    assert changes["retrieval"]["faiss"] in ("cpu", "gpu")
    assert all(n == 6 for n in model.expert_counts().values())

    # the same query deployed straight from the checkpoint: same task, same experts, only those read
    index = premoe.cached(models.load(str(path)), TASKS, SPEC, premoe.IndexSettings())
    ids = _query_ids(model, "embedded:code", 64)
    deployed, report, matches = premoe.load_for_query(path, index, ids, keep=6)
    assert matches[0][0] == changes["task"]
    assert {t: round(d, 6) for t, d in matches} == changes["retrieval"]["distances"]  # the very same query key
    assert {k: sorted(v) for k, v in index.keep(changes["task"], 6).items()} == changes["kept"]
    assert report.experts_kept == 6 * 4
    # routing the query read the layers up to the first MoE router (no routed experts); then the kept experts
    assert report.bytes_read < ck.load(path)[1].bytes_read
    x = torch.randint(3, 2000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(deployed.model(input_ids=x).logits, model.model(input_ids=x).logits, rtol=0, atol=1e-6)


def _query_ids(model, data, n, seed=0):
    """The method's held-out query for a task: ``n`` tokens at a seeded offset of the validation split."""
    from moebench.data import encode, random_windows

    return random_windows(encode(model.tokenizer, load_text(data, "validation")), n, 1, seed)


def test_method_with_a_named_task_and_a_saved_index(index, ds_model, checkpoint, tmp_path):
    from moebench.plugins import host

    folder = index.save(tmp_path / "idx")
    model = models.load(str(checkpoint("deepseek_v2")))
    params = host().method("premoe")().Params(keep_ratio=0.25, task="prose", index=str(folder), k=0)
    ctx = Context(suite=None)
    changes = host().method("premoe")().apply(model, params, ctx)
    assert changes["notation"] == "4/4" and changes["task"] == "prose" and "retrieval" not in changes
    assert changes["tcess_k"] == index.settings.k == 1  # what the saved index scored with, not the run's k = 0
    assert changes["kept"] == {k: sorted(v) for k, v in index.keep("prose", 4).items()}
    assert any("settings" in n for n in ctx.notes)  # the saved index's threshold/key layer win over the run's
    bad = host().method("premoe")().Params(keep=4, task="poetry", index=str(folder))
    with pytest.raises(MoebenchError, match="'poetry' is not among the indexed tasks"):
        host().method("premoe")().apply(models.load(str(checkpoint("deepseek_v2"))), bad, Context())


def test_params_and_tasks_are_validated(checkpoint):
    from moebench.params import ParamError, parse
    from moebench.plugins import host

    Params = host().method("premoe").Params
    with pytest.raises(ParamError, match="query is required"):
        parse(Params, {"task": "retrieve"})
    with pytest.raises(ParamError, match="threshold must be in"):
        parse(Params, {"task": "prose", "threshold": 1.5})
    path = checkpoint("deepseek_v2")
    for tasks, match in (
        ('[tasks.prose]\nquery = "embedded:prose"', "tasks.prose.data: missing"),
        ('[tasks.prose]\ndata = "nope:x"', "tasks.prose.data: unknown data scheme 'nope'"),
        ('[tasks.prose]\ndata = "embedded:prose"\ndatta = 1', "tasks.prose.datta: unknown field \\(did you mean 'data'\\?\\)"),
        ('[tasks.retrieve]\ndata = "embedded:prose"', "tasks.retrieve: 'retrieve' is reserved"),
        ('[tasks]\nprose = "embedded:prose"', "tasks.prose: expected a table"),
    ):
        import tomllib

        raw = tomllib.loads(f'[model]\nsource = "{path}"\n{tasks}')
        with pytest.raises(SuiteError, match=match):
            parse_suite(raw, "s.toml")


def test_mix_source_gives_equal_interleaved_shares():
    from moebench.plugins import host

    docs = host().data_source("mix").documents("embedded:prose,embedded:code", "validation")
    prose = set(host().data_source("embedded").documents("prose", "validation"))
    share = {"prose": 0, "code": 0}
    kinds = []
    for d in docs:
        kind = "prose" if any(p.startswith(d[:200]) for p in prose) else "code"
        share[kind] += len(d)
        kinds.append(kind)
    assert abs(share["prose"] - share["code"]) <= max(len(d) for d in docs)
    assert "prose" in kinds[:3] and "code" in kinds[:3]
    with pytest.raises(MoebenchError, match="two or more"):
        host().data_source("mix").documents("embedded:prose", "test")


def test_suite_compares_tasks_per_run(checkpoint, tmp_path, isolated_cache):
    from moebench.runner import RunOptions, run_suite
    from moebench.store import read_records

    suite = _suite(
        checkpoint("deepseek_v2"),
        evals="""
        [eval.task_perplexity]
        seqlen = 32
        max_samples = 3
        """,
        methods="""
        [[methods]]
        name = "drop"
        method = "expert_drop"
        params = { keep = 8 }
        [[methods]]
        name = "premoe"
        method = "premoe"
        params = { keep = 8, task = "retrieve", query = ["prose", "code"] }
        """,
    )
    run_suite(suite, RunOptions(out=tmp_path / "out", log=lambda m: None))
    records = {r["name"]: r for r in read_records(tmp_path / "out" / "results.jsonl")}
    assert set(records) == {"baseline", "drop", "premoe[query=prose]", "premoe[query=code]"}
    assert all(r["status"] == "ok" for r in records.values()), [r["error"] for r in records.values()]
    for name, r in records.items():
        tp = r["metrics"]["task_perplexity"]
        assert tp["prose"] > 1 and tp["code"] > 1
        assert r["metrics"]["routed"] == {"active": 4, "kept": 16 if name == "baseline" else 8}
    own = records["premoe[query=code]"]["metrics"]["task_perplexity"]
    assert own["own"] == own["code"]
    assert "own" not in records["drop"]["metrics"]["task_perplexity"]
    assert records["premoe[query=prose]"]["changes"]["premoe"]["notation"] == "4/8"
    json.dumps(records)  # records stay JSON
    # the report shows PreMoe's notation as one active/kept column
    from moebench import render

    md = render.markdown(list(records.values()))
    header = next(line for line in md.splitlines() if line.startswith("| name"))
    assert "active/kept" in header and "routed" not in header
    assert "| 4/16 |" in next(line for line in md.splitlines() if line.startswith("| baseline"))
    assert "| 4/8 |" in next(line for line in md.splitlines() if line.startswith("| premoe[query=code]"))


def test_deployment_can_store_the_kept_experts_in_4_bits(index, checkpoint):
    from moebench_plugins.metrics import weight_bytes

    path = checkpoint("deepseek_v2")
    model = models.load(str(path))
    ids = _query_ids(model, "embedded:prose", 32)
    dense, _, _ = premoe.load_for_query(path, index, ids, keep=8)
    nf4, report, _ = premoe.load_for_query(path, index, ids, keep=8, storage="nf4")
    assert any("NF4" in n for n in report.notes)
    expert_bytes = sum(b.gate_up_proj.numel() + b.down_proj.numel() for b in dense.blocks()) * 4
    saved = weight_bytes(dense.model) - weight_bytes(nf4.model)
    assert saved > 0.8 * expert_bytes  # 32-bit experts -> ~4.5 bits each
    x = torch.randint(3, 2000, (1, 16))
    with torch.no_grad():
        a, b = dense.model(input_ids=x).logits, nf4.model(input_ids=x).logits
    assert 0 < (a - b).abs().max() < 0.5 * a.abs().max()


def test_index_built_by_streaming_a_checkpoint_matches_the_in_memory_build(index, checkpoint):
    path = checkpoint("deepseek_v2")
    streamed = premoe.build_streaming(path, TASKS, SPEC, index.settings, dtype="float32")
    assert streamed.signature == index.signature and streamed.tasks == index.tasks
    for a, b in zip(streamed.patterns, index.patterns):
        torch.testing.assert_close(a.key, b.key, rtol=0, atol=1e-3)  # float16 logits either way
        assert a.keep(8) == b.keep(8)


def test_cli_builds_the_index_streaming_and_prunes_a_checkpoint_for_a_prompt(checkpoint, tmp_path, isolated_cache):
    from typer.testing import CliRunner

    from moebench.cli import app

    path = checkpoint("deepseek_v2")
    suite = tmp_path / "p.toml"
    suite.write_text(textwrap.dedent(f"""
        [model]
        source = "{path}"
        [calibration]
        samples = 4
        seqlen = 32
        [tasks.prose]
        data = "embedded:prose"
        [tasks.code]
        data = "embedded:code"
    """))
    runner = CliRunner()
    for flags, folder in ((["--stream"], "streamed"), ([], "loaded")):
        result = runner.invoke(app, ["premoe", "index", str(suite), "--out", str(tmp_path / folder), *flags])
        assert result.exit_code == 0, result.output
        assert "index of 2 tasks (prose, code)" in result.output
    streamed, loaded = premoe.TaskIndex.load(tmp_path / "streamed"), premoe.TaskIndex.load(tmp_path / "loaded")
    for a, b in zip(streamed.patterns, loaded.patterns):
        torch.testing.assert_close(a.key, b.key)
        assert torch.equal(a.perms, b.perms)

    query = tmp_path / "q.txt"
    query.write_text(load_text("embedded:code", "validation")[:2000])
    result = runner.invoke(app, ["premoe", "prune", str(path), "--index", str(tmp_path / "streamed"), "--keep", "4",
                                 "--query", f"@{query}", "--out", str(tmp_path / "pruned")])
    assert result.exit_code == 0, result.output
    assert "retrieved task" in result.output and "kept 4 of 16 routed experts per layer, top-4 (" in result.output
    assert "MiB of the checkpoint" in result.output and "load it with:" in result.output
    assert {b.num_experts for b in models.load(str(tmp_path / "pruned")).blocks()} == {4}

    # --keep outside 1..experts is one line naming the flag and the range; below top-k needs --lower-top-k
    for keep, message in (("40", "--keep 40: expected 1..16"), ("0", "--keep 0: expected 1..16"),
                          ("2", "--keep 2 is below the model's top-k 4")):
        result = runner.invoke(app, ["premoe", "prune", str(path), "--index", str(tmp_path / "streamed"), "--keep", keep, "--query", "x y"])
        assert result.exit_code != 0 and message in str(result.exception), (keep, result.output)
    result = runner.invoke(app, ["premoe", "prune", str(path), "--index", str(tmp_path / "streamed"), "--keep", "2",
                                 "--lower-top-k", "--query", f"@{query}"])
    assert result.exit_code == 0 and "top-2 (lowered from 4)" in result.output, result.output

    result = runner.invoke(app, ["premoe", "prune", str(path), "--index", str(tmp_path / "none"), "--keep", "4", "--query", "x y"])
    assert result.exit_code != 0 and "missing index.faiss" in str(result.output) + str(result.exception)
