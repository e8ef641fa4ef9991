"""Defining properties of the methods recent MoE-compression papers compare against
(REAP, NAEE, HC-SMoE, MC-SMoE, D2-MoE, MoEQuant, expert skipping, dynamic top-p), each
on a toy model or tensors, checked against an independent hand computation."""

from __future__ import annotations

import pytest
import torch

from moebench.calibration import Calibration, CalibrationSpec
from moebench.method import Context
from moebench.models import load
from moebench.plugins import host
from moebench.params import parse

IDS = torch.randint(3, 2000, (2, 24), generator=torch.Generator().manual_seed(1))


_TEXT: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def small_text(tmp_path_factory):
    """A few prose documents as a file: tokenising the whole embedded corpus per test would dominate its time."""
    from moebench import corpus

    path = tmp_path_factory.mktemp("text") / "prose.txt"
    path.write_text("\n\n".join(corpus.documents("prose", "train")[:40]))
    _TEXT["data"] = f"file:{path}"
    yield
    _TEXT.clear()


def _ctx(samples: int = 2, seqlen: int = 16) -> Context:
    spec = CalibrationSpec(data=_TEXT["data"], samples=samples, seqlen=seqlen, batch_size=2)
    return Context(calibration=Calibration(spec, cache=False))


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


def _block_inputs(model, windows) -> dict[int, torch.Tensor]:
    """Each MoE block's input on ``windows``, flattened to ``[T, H]``."""
    inputs = {}
    handles = [
        b.module.register_forward_hook(lambda m, a, o, layer=b.layer: inputs.setdefault(layer, []).append(a[0].detach()))
        for b in model.blocks()
    ]
    with torch.no_grad():
        model.model(input_ids=windows, use_cache=False)
    for h in handles:
        h.remove()
    return {layer: torch.cat(xs).reshape(-1, xs[0].shape[-1]) for layer, xs in inputs.items()}


def test_hc_smoe_clusters_are_scipys_hierarchical_clustering_of_mean_outputs(checkpoint):
    from scipy.cluster.hierarchy import fcluster, linkage

    model = load(str(checkpoint("mixtral")))
    ctx = _ctx()
    block = next(model.blocks())
    x = _block_inputs(model, ctx.calibration.windows(model.tokenizer))[block.layer].double()
    means = []
    for e in range(block.num_experts):
        gate, up, down = (w.double() for w in block.expert(e))
        means.append(((torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T).mean(0))
    means = torch.stack(means).detach()
    stat = ctx.stats(model, "expert_mean_output")["expert_mean_output"][block.layer]["mean"]
    torch.testing.assert_close(stat, means, rtol=1e-4, atol=1e-6)
    labels = fcluster(linkage(means.numpy(), method="average", metric="euclidean"), t=3, criterion="maxclust")
    expected = {frozenset(int(e) for e in range(len(labels)) if labels[e] == c) for c in set(labels)}
    freq = ctx.stats(model, "routing_counts")["routing_counts"][block.layer].double()
    original = block.gate_up_proj.detach().clone()
    changes = _apply(model, "hc_smoe", ctx, keep=3)
    groups = changes["groups"][block.layer]
    assert {frozenset(g) for g in groups} == expected
    fused = model.model.get_submodule(f"model.layers.{block.layer}.mlp").fusion
    for m, members in enumerate(groups):
        w = freq[members] / freq[members].sum()
        torch.testing.assert_close(fused.gate_up_proj[m].double(), torch.einsum("n,nij->ij", w, original[members].double()), rtol=1e-5, atol=1e-6)


def test_moequant_hessians_are_the_affinity_weighted_sum(checkpoint):
    from moebench.sequential import Sequential

    model = load(str(checkpoint("deepseek_v2")))
    ctx = _ctx()
    windows = ctx.calibration.windows(model.tokenizer)
    block = next(model.blocks())
    x = _block_inputs(model, windows)[block.layer]
    with torch.no_grad():
        _, weights, indices = model.adapter.route(block.router.forward(x))
    affinity = torch.zeros(x.shape[0], block.num_experts, dtype=torch.float64)
    affinity.scatter_add_(1, indices, weights.double())  # c[t, e]: the routing weight, 0 where e is not selected
    expected = torch.einsum("te,ti,tj->eij", affinity, x.double(), x.double())
    run = Sequential(model, windows, targets=["experts"], collect=["hessian"], batch_size=2, router_weighted=True, weight_power=0.5)
    for step in run:
        if step.index == block.layer:
            gate_up = next(g for g in step.groups if g.attr == "gate_up_proj")
            torch.testing.assert_close(gate_up.stats.hessian.double(), expected, rtol=1e-4, atol=1e-5)
            break
    else:
        raise AssertionError("the MoE layer was not visited")


def test_moequant_runs_on_balanced_self_samples(checkpoint):
    model = load(str(checkpoint("deepseek_v2")))
    changes = _apply(model, "moequant", _ctx(samples=2, seqlen=16), bits=4, group_size=32, candidates=2)
    assert changes["variant"]["hessian"].startswith("affinity-weighted")
    ebss = changes["ebss"]
    assert ebss["sampled"] == 4 and ebss["kept"] == 2 and ebss["imbalance_kept"] <= ebss["imbalance_all"]
    assert torch.isfinite(_logits(model.model)).all()


def test_d2_moe_at_full_rank_reproduces_every_expert(checkpoint, tmp_path):
    from moebench.models import load_pretrained
    from moebench_plugins.fusion.d2_moe import fisher_base

    model = load(str(checkpoint("mixtral")))
    ref = _logits(model.model)
    originals = {b.layer: (b.gate_up_proj.detach().clone(), b.down_proj.detach().clone()) for b in model.blocks()}
    block = next(model.blocks())
    inter = block.intermediate_size
    full = min(inter, block.gate_up_proj.shape[-1])
    changes = _apply(model, "d2_moe", rank=full)
    assert all(f["full_rank"] for f in changes["layers"].values())
    for layer, (gate_up, down) in originals.items():
        fused = model.model.get_submodule(f"model.layers.{layer}.mlp").fusion
        r = fused.rank
        for e in range(gate_up.shape[0]):
            a, b = fused.gate_up_a[e].double(), fused.gate_up_b[e].double()
            gate = fused.core_gate_up[0, :inter].double() + b[:inter] @ a[:r]
            up = fused.core_gate_up[0, inter:].double() + b[inter:] @ a[r:]
            dn = fused.core_down[0].double() + fused.down_b[e].double() @ fused.down_a[e].double()
            torch.testing.assert_close(torch.cat([gate, up]), gate_up[e].double(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(dn, down[e].double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_logits(model.model), ref, rtol=1e-3, atol=1e-4)
    # the base is the Fisher-weighted mean (elementwise weights)
    w = torch.stack([torch.full((2, 2), 1.0), torch.full((2, 2), 3.0)])
    f = torch.stack([torch.tensor([[1.0, 0.0], [1.0, 3.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]])])
    assert fisher_base(w, f).tolist() == [[2.0, 3.0], [1.0, 1.5]]
    model.save(tmp_path / "m")
    torch.testing.assert_close(_logits(load_pretrained(tmp_path / "m")), _logits(model.model))


def test_naee_exhaustive_search_finds_the_true_best_combination(checkpoint):
    import itertools

    model = load(str(checkpoint("mixtral")))
    ctx = _ctx()
    block = next(model.blocks())
    io = ctx.stats(model, "moe_io")["moe_io"][block.layer]
    x, target = io["input"].double(), io["output"].double()
    router = block.router_weight.double()

    def mixtral_block(keep):  # the Mixtral MoE block written out: softmax over the kept logits, top-k, renormalise
        probs = (x @ router[keep].T).softmax(-1)
        w, idx = probs.topk(min(block.top_k, len(keep)), dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for slot in range(idx.shape[1]):
            for j, e in enumerate(keep):
                gate, up, down = (t.double() for t in block.expert(e))
                y = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
                out += (idx[:, slot] == j).double()[:, None] * w[:, slot, None] * y
        return out

    with torch.no_grad():
        losses = {c: ((mixtral_block(list(c)) - target) ** 2).sum().item() for c in itertools.combinations(range(block.num_experts), 3)}
    best = min(losses, key=losses.get)
    assert sorted(losses.values())[1] > losses[best] * (1 + 1e-4), "the test needs a unique best combination"
    changes = _apply(model, "naee", ctx, keep=3)
    assert changes["search"][block.layer] == "exhaustive"
    assert changes["kept"][block.layer] == list(best)
    greedy = _apply(load(str(checkpoint("mixtral"))), "naee", _ctx(), keep=3, max_combinations=10)
    assert greedy["search"][block.layer] == "greedy"


def test_mc_smoe_alignment_merges_two_permuted_copies_back_to_the_original(checkpoint):
    from moebench_plugins.fusion.alignment import permute
    from moebench_plugins.fusion.grouping import Groups
    from moebench_plugins.fusion.merge import merged_experts

    model = load(str(checkpoint("mixtral")))
    block = next(model.blocks())
    perm = torch.randperm(block.intermediate_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gu, dn = permute(block.gate_up_proj[0], block.down_proj[0], perm)
        block.experts.gate_up_proj[1].copy_(gu)
        block.experts.down_proj[1].copy_(dn)
    groups = Groups([[0, 1]] + [[e] for e in range(2, block.num_experts)])
    freq = torch.tensor([3.0, 1.0] + [1.0] * (block.num_experts - 2))
    aligned_gu, aligned_dn = merged_experts(block, groups, freq, "frequency_average", {}, align=True)
    torch.testing.assert_close(aligned_gu[0], block.gate_up_proj[0].detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(aligned_dn[0], block.down_proj[0].detach(), rtol=1e-6, atol=1e-7)
    plain_gu, _ = merged_experts(block, groups, freq, "frequency_average", {}, align=False)
    assert not torch.allclose(plain_gu[0], block.gate_up_proj[0].detach(), atol=1e-3), "without alignment the copies blur"


def test_mc_smoe_groups_members_around_the_most_used_experts_by_router_logits(checkpoint):
    from moebench_plugins.fusion.mc_smoe import router_logit_similarity

    model = load(str(checkpoint("mixtral")))
    ctx = _ctx()
    block = next(model.blocks())
    stats = ctx.stats(model, "routing_counts", "router_logits")
    freq = stats["routing_counts"][block.layer].double()
    sim = router_logit_similarity(stats["router_logits"][block.layer])
    changes = _apply(model, "mc_smoe", ctx, keep=3)
    groups = changes["groups"][block.layer]
    dominant = [g[0] for g in groups]
    assert sorted(dominant) == sorted(sorted(range(len(freq)), key=lambda e: (-freq[e].item(), e))[:3])
    for g in groups:
        for member in g[1:]:
            assert max(dominant, key=lambda d: (sim[member, d].item(), -dominant.index(d))) == g[0]


EIGHT = """
[[methods]]
name = "reap"
method = "reap"
params = { keep_ratio = 0.5 }
[[methods]]
name = "naee"
method = "naee"
params = { keep_ratio = 0.5 }
[[methods]]
name = "hc-smoe"
method = "hc_smoe"
params = { keep_ratio = 0.5 }
[[methods]]
name = "mc-smoe"
method = "mc_smoe"
params = { keep_ratio = 0.5, compress_rank = 4 }
[[methods]]
name = "d2-moe"
method = "d2_moe"
params = { rank = 4 }
[[methods]]
name = "moequant"
method = "moequant"
params = { bits = 4, group_size = 32, candidates = 1 }
[[methods]]
name = "expert-skip"
method = "expert_skip"
[[methods]]
name = "dynamic-topk"
method = "dynamic_topk"
params = { p = 0.5 }
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["deepseek_v2", "mixtral"])
def test_the_eight_methods_run_from_a_suite_and_reload_to_the_same_logits(arch, checkpoint, tmp_path, isolated_cache):
    import tomllib

    from conftest import suite_file
    from moebench.models import load_pretrained
    from moebench.runner import RunOptions, run_suite
    from moebench.store import read_records
    from moebench.suite import load_suite

    path = suite_file(tmp_path, checkpoint(arch), EIGHT, max_samples=2)
    run_suite(load_suite(path), RunOptions(out=tmp_path / "out", log=lambda m: None))
    records = list(read_records(tmp_path / "out"))
    assert [r["status"] for r in records] == ["ok"] * 9, [r.get("error") for r in records]
    for entry in tomllib.loads(EIGHT)["methods"]:
        model = load(str(checkpoint(arch)))
        _apply(model, entry["method"], _ctx(samples=4, seqlen=32), **entry.get("params", {}))
        expected = _logits(model.model)
        model.save(tmp_path / entry["name"])
        torch.testing.assert_close(_logits(load_pretrained(tmp_path / entry["name"])), expected, rtol=1e-5, atol=1e-5)
