"""Pruning: masks and SparseGPT math, magnitude / WANDA (MoE-Pruner) / SparseGPT on every zoo architecture."""

from __future__ import annotations

import math

import pytest
import torch

from moebench import zoo
from moebench.adapter import MoEModel
from moebench.calibration import Calibration, CalibrationSpec
from moebench.method import Context
from moebench.models import load_pretrained
from moebench.params import ParamError, parse
from moebench.plugins import host
from moebench.runner import RunOptions, run_suite
from moebench.sequential import find_groups
from moebench_plugins.slimming.sparsity import NM, matrix_mask, nm_holds, nm_mask, row_mask, sparsegpt, wanda_score
from moebench.suite import parse_suite
from conftest import kl_from

ARCHS = zoo.names()  # every adapted architecture has a zoo entry


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny(name: str, layers: int = 3) -> MoEModel:
    torch.manual_seed(0)
    model = zoo.entry(name).cls(zoo.config(name, num_hidden_layers=layers)).eval()
    return MoEModel(model, host().adapter_for(model), tokenizer=zoo.tokenizer())


def context(samples: int = 4, seqlen: int = 32) -> Context:
    return Context(calibration=Calibration(CalibrationSpec(samples=samples, seqlen=seqlen, batch_size=4), cache=False))


def apply(moe: MoEModel, method: str, ctx: Context | None = None, **table) -> dict:
    cls = host().method(method)
    return cls().apply(moe, parse(cls.Params, table), ctx or context())


# -- math -----------------------------------------------------------------------------------
def test_row_mask_prunes_exactly_per_row():
    score = torch.rand(3, 5, 10)
    for sparsity, k in ((0.5, 5), (0.3, 3), (0.25, 3), (0.0, 0)):
        mask = row_mask(score, sparsity)
        assert (mask.sum(-1) == k).all()
        if k:  # the pruned are the lowest of each row
            assert (score[mask].reshape(3, 5, k).amax(-1) <= score[~mask].reshape(3, 5, 10 - k).amin(-1)).all()


def test_row_mask_selects_what_a_full_topk_selects():
    """WANDA's masks must not move with the faster selection (kthvalue threshold instead of topk indices)."""
    torch.manual_seed(0)
    score = torch.randn(5, 12, 300).abs()
    score[:, :, :40] = 0  # already-zero weights: ties below the threshold (a tie at it is an arbitrary pick for topk too)
    for sparsity in (0.2, 0.5, 0.7):
        k = round(sparsity * 300)
        expected = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(k, dim=-1, largest=False).indices, True)
        assert torch.equal(row_mask(score, sparsity, chunk=2), expected)


def test_nm_mask_and_parse():
    score = torch.rand(2, 4, 16)
    mask = nm_mask(score, NM.parse("2:4"))
    assert (mask.reshape(2, 4, 4, 4).sum(-1) == 2).all()
    assert nm_holds(torch.rand(4, 8).masked_fill(nm_mask(torch.rand(4, 8), NM(4, 8)), 0), NM(4, 8))
    assert not nm_holds(torch.ones(2, 8), NM(2, 4))
    with pytest.raises(ValueError, match="nm must look like '2:4'"):
        NM.parse("half")
    with pytest.raises(ValueError, match="0 < N < M.*'prune N:M' zeroes N of every M"):
        NM.parse("4:2")
    # both conventions, spelled unambiguously: "N:M" and "keep N:M" keep N; "prune N:M" (fusion_bench) prunes N
    assert NM.parse("1:4") == NM.parse("keep 1:4") == NM.parse("prune 3:4") == NM(1, 4)
    assert NM.parse("Prune 1:4") == NM(3, 4) and NM(3, 4).describe() == "keeps 3 of every 4 inputs (prunes 1)"
    with pytest.raises(ValueError, match="'keep 2:4' or 'prune 2:4'"):
        NM.parse("drop 2:4")
    with pytest.raises(ValueError, match="not a multiple of 4"):
        nm_mask(torch.rand(2, 6), NM(2, 4))


def correlated(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols)
    return (torch.randn(n, cols, generator=g) * torch.linspace(0.2, 3, cols)) @ (torch.eye(cols) + mix)


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda():
    torch.manual_seed(0)
    w = torch.randn(2, 24, 32)
    x = correlated(256, 32)
    h = (x.T @ x).expand(2, 32, 32)
    error = lambda new: ((x @ w.transpose(1, 2)) - (x @ new.transpose(1, 2))).pow(2).sum().item()  # noqa: E731
    magnitude = w.masked_fill(row_mask(w.abs(), 0.5), 0)
    wanda = w.masked_fill(row_mask(wanda_score(w, x.pow(2).sum(0).expand(2, 32)), 0.5), 0)
    new, mask = sparsegpt(w, h, 0.5, block_size=8)
    assert (mask.reshape(2, 24, 4, 8).sum((1, 3)) == 96).all() and torch.equal(new == 0, mask)
    assert error(new) < error(wanda) < error(magnitude)
    new24, _ = sparsegpt(w, h, nm=NM(2, 4), block_size=8)
    magnitude24 = w.masked_fill(nm_mask(w.abs(), NM(2, 4)), 0)
    assert nm_holds(new24, NM(2, 4)) and error(new24) < error(magnitude24)


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning():
    torch.manual_seed(0)
    w = torch.randn(1, 8, 16)
    new, mask = sparsegpt(w, torch.eye(16)[None], 0.5, scope="row")
    torch.testing.assert_close(new, w.masked_fill(row_mask(w.abs(), 0.5), 0))
    new, mask = sparsegpt(w, torch.eye(16)[None], 0.5)  # one block: the matrix's lowest half
    torch.testing.assert_close(new, w.masked_fill(matrix_mask(w.abs(), 0.5), 0))


def test_sparsegpt_prunes_p_of_every_128_column_block_while_rows_vary():
    """The reference rule: per block of 128 columns, one threshold across all rows of the block (per Linear)."""
    torch.manual_seed(0)
    w = torch.randn(2, 40, 300) * torch.rand(40, 1) * 3  # rows of very different scale
    x = correlated(512, 300)
    h = (x.T @ x).expand(2, 300, 300).clone()
    h[1, 7] = h[1, :, 7] = 0  # an input expert 1 never saw
    new, mask = sparsegpt(w, h, 0.3, parts=2)
    assert torch.equal(new == 0, mask | (w == 0) | (torch.arange(300) == 7)[None, None] & (torch.arange(2) == 1)[:, None, None])
    assert (new[1, :, 7] == 0).all()  # dead input column zeroed, as the reference does
    for b in range(2):
        for part in (mask[b, :20], mask[b, 20:]):  # gate-like and up-like halves, each its own threshold
            for i1, i2 in ((0, 128), (128, 256), (256, 300)):
                assert int(part[:, i1:i2].sum()) == round(0.3 * part[:, i1:i2].numel())
    per_row = mask.sum(-1)
    assert per_row.max() - per_row.min() > 10  # rows are not held to the ratio
    row, _ = sparsegpt(w, h, 0.3, scope="row")  # moebench's variant: exactly the ratio per row
    assert ((row == 0).sum(-1) >= 90).all()


def test_magnitude_prunes_p_of_each_matrix_while_rows_vary():
    moe = tiny("deepseek_v2", layers=2)
    before = {g.name: g.weight.clone() for g in find_groups(moe, 1, ["experts", "attention"])}
    changes = apply(moe, "magnitude", sparsity=0.4, targets=["experts", "attention"])
    assert "matrix" in changes["variant"]
    for g in find_groups(moe, 1, ["experts", "attention"]):
        w, old = g.weight, before[g.name]
        halves = w.chunk(2, dim=1) if g.attr == "gate_up_proj" else (w,)
        olds = old.chunk(2, dim=1) if g.attr == "gate_up_proj" else (old,)
        for part, orig in zip(halves, olds):
            for b in range(part.shape[0]):
                zero = part[b] == 0
                assert int(zero.sum()) == round(0.4 * zero.numel()), g.name
                assert orig[b][zero].abs().max() <= orig[b][~zero].abs().min()  # one threshold per matrix
        rows = (w == 0).sum(-1)
        assert rows.max() > rows.min(), g.name


# -- methods on models ------------------------------------------------------------------------
def zeros_of(moe: MoEModel, kinds) -> dict[str, float]:
    out = {}
    for i in range(len(moe.layers)):
        for g in find_groups(moe, i, kinds):
            z, n = out.get(g.kind, (0, 0))
            out[g.kind] = (z + int((g.weight == 0).sum()), n + g.weight.numel())
    return {k: z / n for k, (z, n) in out.items()}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_requested_sparsity_is_achieved_on_targets_only(method):
    moe = tiny("deepseek_v2")
    changes = apply(moe, method, sparsity=0.5, targets=["experts", "shared"])
    assert zeros_of(moe, ["experts", "shared"]) == {"experts": 0.5, "shared": 0.5}
    assert changes["sparsity"] == {"experts": 0.5, "shared": 0.5}
    assert zeros_of(moe, ["attention", "dense"]) == {"attention": 0.0, "dense": 0.0}
    if method == "wanda":  # WANDA compares per row: every row of every expert matrix holds exactly half zeros
        for g in find_groups(moe, 1, ["experts"]):
            assert ((g.weight == 0).sum(-1) == g.weight.shape[-1] // 2).all()


@pytest.mark.parametrize("method,nm", [("magnitude", "4:8"), ("wanda", "2:4"), ("sparsegpt", "2:4")])
def test_nm_patterns_hold_exactly(method, nm):
    moe = tiny("qwen2_moe", layers=2)
    changes = apply(moe, method, nm=nm, targets=["experts", "attention"])
    assert changes["nm_holds"] is True
    pattern = NM.parse(nm)
    for i in range(2):
        for g in find_groups(moe, i, ["experts", "attention"]):
            zeros = (g.weight == 0).reshape(*g.weight.shape[:-1], -1, pattern.m).sum(-1)
            assert (zeros == pattern.m - pattern.n).all(), g.name


def test_wanda_follows_the_moe_pruner_rule():
    """The first MoE layer's experts are pruned by |W| * ||routing weight * x|| over their routed tokens."""
    moe = tiny("deepseek_v2")
    ctx = context()
    ids = ctx.calibration.windows(moe.tokenizer)
    block = moe.block(moe.moe_layers[0])
    captured = []
    handle = block.experts.register_forward_pre_hook(lambda m, a: captured.append([t.detach().clone() for t in a]))
    with torch.no_grad():
        for batch in ids.split(4):
            moe.model(input_ids=batch, use_cache=False)
    handle.remove()
    before = block.gate_up_proj.detach().clone()
    apply(moe, "wanda", ctx, sparsity=0.5)
    for e in (0, 5):
        norm = torch.zeros(before.shape[-1])
        for hidden, index, weights in captured:
            tok, pos = torch.where(index == e)
            norm += (hidden[tok] * weights[tok, pos][:, None]).pow(2).sum(0)
        expected = before[e].masked_fill(row_mask(before[e].abs() * norm.sqrt(), 0.5), 0)
        torch.testing.assert_close(block.gate_up_proj[e], expected)
    unweighted = tiny("deepseek_v2")
    apply(unweighted, "wanda", ctx, sparsity=0.5, router_weighted=False)
    assert not torch.equal(unweighted.block(1).gate_up_proj == 0, block.gate_up_proj == 0)


def test_pruned_model_reloads_with_the_same_logits(tmp_path):
    moe = tiny("olmoe", layers=2)
    changes = apply(moe, "sparsegpt", sparsity=0.5, targets=["experts", "attention"])
    assert changes["calibration"]["layers"] == 2
    ids = torch.randint(3, 2000, (2, 16))
    with torch.no_grad():
        logits = moe.model(input_ids=ids).logits
    moe.save(tmp_path)
    again = load_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, logits)


@pytest.mark.parametrize("staged", [False, True])
def test_sparsegpt_in_expert_slices_gives_the_masks_of_one_pass(staged):
    whole, sliced = tiny("deepseek_v2", layers=2), tiny("deepseek_v2", layers=2)
    a = apply(whole, "sparsegpt", true_sequential=staged)
    b = apply(sliced, "sparsegpt", true_sequential=staged, expert_chunk=3)  # 16 experts: slices of 3, a remainder of 1
    want, got = whole.model.state_dict(), sliced.model.state_dict()
    experts = [k for k in want if "experts." in k]
    assert experts
    for key in experts:
        assert torch.equal(got[key], want[key]), key
    assert b["calibration"]["peak_stats_bytes"] < a["calibration"]["peak_stats_bytes"] / 3
    assert "slices of 3" in b["variant"] and ("true sequential" in a["variant"]) == staged
    # 8 tokens x top-4 leave experts without tokens; those of deferred slices are counted too
    few = [apply(tiny("deepseek_v2", layers=2), "sparsegpt", context(1, 8), true_sequential=staged, expert_chunk=k) for k in (None, 3)]
    assert few[0]["calibration"]["experts_without_tokens"] == few[1]["calibration"]["experts_without_tokens"] > 0


def test_sparsegpt_true_sequential_changes_the_down_masks():
    reference, staged = tiny("deepseek_v2", layers=2), tiny("deepseek_v2", layers=2)
    apply(reference, "sparsegpt")  # down_proj's Hessians from the unpruned gate/up
    apply(staged, "sparsegpt", true_sequential=True)
    a, b = reference.model.state_dict(), staged.model.state_dict()
    down = [k for k in a if "down_proj" in k and "experts." in k]
    assert down and any(not torch.equal(a[k], b[k]) for k in down)
    assert all(torch.equal(a[k], b[k]) for k in a if "gate_up_proj" in k)


def test_parameter_errors_name_the_field():
    params = host().method("wanda").Params
    with pytest.raises(ParamError, match=r"sparsity must be in \[0, 1\), got 1.5"):
        parse(params, {"sparsity": 1.5})
    with pytest.raises(ParamError, match="nm must look like"):
        parse(params, {"nm": "50%"})
    with pytest.raises(ParamError, match="unknown module kind 'mlp'; expected some of experts, shared, attention, dense"):
        parse(params, {"targets": ["mlp"]})
    with pytest.raises(ParamError, match="damp must be in"):
        parse(host().method("sparsegpt").Params, {"damp": 2.0})


# -- from a suite, on every architecture -------------------------------------------------------
def every_arch():
    """deepseek_v2 in the quick run, the other architectures marked slow."""
    return [name if name == "deepseek_v2" else pytest.param(name, marks=pytest.mark.slow) for name in ARCHS]


def calibration_text(folder) -> str:
    """A small calibration file (tokenizing the whole embedded train split costs seconds per suite)."""
    from moebench import corpus

    path = folder / "calibration.txt"
    path.write_text("\n\n".join(corpus.documents("prose", "validation")[:40]))
    return f"file:{path}"


@pytest.mark.parametrize("name", every_arch())
def test_every_method_runs_from_a_suite(name, checkpoint, tmp_path):
    raw = {
        "suite": {"name": f"slim-{name}"},
        "model": {"source": str(checkpoint(name))},
        "calibration": {"data": calibration_text(tmp_path), "samples": 4, "seqlen": 32, "batch_size": 4},
        "methods": [
            {"name": "magnitude", "method": "magnitude", "params": {"sparsity": 0.5}},
            {"name": "wanda", "method": "wanda", "params": {"sparsity": 0.5, "targets": ["experts", "shared", "attention", "dense"]}},
            {"name": "sparsegpt-2:4", "method": "sparsegpt", "params": {"nm": "2:4"}},
            {"name": "drop-then-wanda", "pipeline": [{"method": "block_drop", "n": 1}, {"method": "wanda", "sparsity": 0.5}]},
        ],
    }
    result = run_suite(parse_suite(raw), RunOptions(out=tmp_path / "out", log=lambda *_: None))
    records = {r.name: r for r in result.records}
    assert all(r.ok for r in records.values()), [r.error for r in records.values()]
    assert records["magnitude"].changes["magnitude"]["sparsity"] == {"experts": 0.5}
    wanda = records["wanda"].changes["wanda"]
    assert all(v == 0.5 for v in wanda["sparsity"].values()) and "attention" in wanda["sparsity"]
    assert records["sparsegpt-2:4"].changes["sparsegpt"]["nm_holds"] is True
    pipeline = records["drop-then-wanda"].changes
    layers = pipeline["block_drop"]["blocks_before"]
    assert pipeline["block_drop"]["blocks_after"] == layers - 1 and pipeline["wanda"]["calibration"]["layers"] == layers - 1
    assert pipeline["wanda"]["sparsity"] == {"experts": 0.5}
    assert "sparsity is masked zeros; no sparse kernel" in records["wanda"].notes


def test_suite_without_calibration_is_refused():
    from moebench.errors import SuiteError

    raw = {"model": {"source": "zoo:deepseek_v2"}, "methods": [{"method": "sparsegpt"}]}
    with pytest.raises(SuiteError, match="missing \\[calibration\\] table; method 'sparsegpt'"):
        parse_suite(raw)


@pytest.mark.slow
def test_on_the_trained_zoo_model_wanda_beats_magnitude_and_sparsegpt_beats_wanda(trained_zoo):
    """50% unstructured on the routed experts of the trained DeepSeek-V2 zoo model.

    Measured as divergence from the uncompressed model on held-out prose: on this toy
    model the experts move perplexity by tenths, within the noise of a short
    evaluation; bench/slimming_quality.py reports perplexity on the full test splits.
    """
    import copy

    from moebench.data import encode, load_text, windows
    from moebench.models import load

    base = load(str(trained_zoo))
    ctx = context(samples=16, seqlen=128)
    ids = windows(encode(base.tokenizer, load_text("embedded:prose", "test")), 128, 16)
    kl = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        moe = MoEModel(copy.deepcopy(base.model), base.adapter, tokenizer=base.tokenizer)
        apply(moe, method, ctx, sparsity=0.5)
        kl[method] = kl_from(base.model, moe.model, ids)
    assert kl["sparsegpt"] < kl["wanda"] < kl["magnitude"], kl
