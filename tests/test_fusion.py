"""Fusion methods: merge, progressive merge, multiplexage, fused LoRA, mixture of LoRA, and healing."""

from __future__ import annotations

import copy

import pytest
import torch
from moebench import zoo
from moebench.adapter import MoEModel
from moebench.calibration import Calibration, CalibrationSpec
from moebench_plugins.fusion.healing import HealParams, distillation_loss
from moebench.method import Context
from moebench.models import load_pretrained
from moebench.params import ParamError, parse
from moebench.plugins import host
from moebench_plugins.fusion.modules import FusedMoE, MixtureOfLoRAExperts
from transformers import AutoModelForCausalLM

VARIANTS = ["multiplexage", "fused_lora", "mixture_of_lora"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensor ops on a shared, loaded CPU are far faster without OpenMP hand-offs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


_MODELS: dict[str, torch.nn.Module] = {}


def _base(name: str) -> torch.nn.Module:
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = zoo.entry(name).cls(zoo.config(name)).eval()
    return _MODELS[name]


def fresh(name: str = "deepseek_v2") -> MoEModel:
    """A random (untrained) zoo-shaped model: real transformers classes, no build needed."""
    model = copy.deepcopy(_base(name))
    return MoEModel(model, host().adapter_for(model), tokenizer=zoo.tokenizer(), identity=f"random-{name}")


@pytest.fixture(scope="module")
def calibration():
    return Calibration(CalibrationSpec(samples=8, seqlen=48, batch_size=4), cache=False)


def run(method: str, model: MoEModel, calibration, teacher=None, **params) -> dict:
    cls = host().method(method)
    ctx = Context(calibration=calibration, teacher=teacher)
    return cls().apply(model, parse(cls.Params, params), ctx)


def logits(model, ids=None):
    ids = torch.arange(40).reshape(2, 20) * 37 % 2000 if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def _hidden(block_module, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = block_module.fused.gate.weight.shape[1] if isinstance(block_module, FusedMoE) else block_module.gate.weight.shape[1]
    return torch.randn(1, n, h, generator=g)


# -- merge ------------------------------------------------------------------------------
@pytest.mark.parametrize("grouping", ["act_cl", "state_cl", "frequency"])
@pytest.mark.parametrize("operator", ["average", "frequency_average", "slerp", "sce"])
def test_merge_gives_the_target_count_with_a_standard_architecture(grouping, operator, calibration):
    model = fresh()
    changes = run("merge", model, calibration, keep=4, grouping=grouping, operator=operator)
    assert model.expert_counts() == {1: 4, 2: 4, 3: 4}
    assert changes["experts_before"] == 48 and changes["experts_after"] == 12
    assert changes["reload"] == "transformers" and changes["router"] == "sum_prob"
    if operator == "sce":  # the record names the SCE rule and select fraction even when the suite named none
        assert changes["operator_args"] == {"select": 0.2, "variant": "reference"}
    for groups in changes["groups"].values():
        assert sorted(e for g in groups for e in g) == list(range(16))
    assert torch.isfinite(logits(model.model)).all()


def test_merging_into_singletons_changes_nothing(calibration):
    model = fresh()
    before = logits(model.model)
    run("merge", model, calibration, keep_ratio=1.0, router="row_average", operator="sce")
    torch.testing.assert_close(logits(model.model), before, rtol=0, atol=1e-5)


def test_sum_prob_router_tracks_member_probability_better_than_row_average(calibration):
    """The fitted rows reproduce the members' summed probabilities on the calibration tokens more closely."""
    x = calibration.stats(fresh(), ["moe_io"])["moe_io"][2]["input"]
    errors = {}
    for mode in ("sum_prob", "row_average"):
        model = fresh()
        orig = copy.deepcopy(model.block(2).router)
        changes = run("merge", model, calibration, keep=4, router=mode)
        assign = torch.zeros(16, dtype=torch.long)
        for g, members in enumerate(changes["groups"][2]):
            assign[members] = g
        target = torch.zeros(len(x), 4).index_add_(1, assign, (x @ orig.weight.T).softmax(-1))
        got = (x @ model.block(2).router.weight.T).softmax(-1)
        errors[mode] = (got - target).abs().mean().item()
    assert errors["sum_prob"] < errors["row_average"]


def test_global_scope_spends_one_budget_and_top_k_follows(calibration):
    model = fresh()
    changes = run("merge", model, calibration, keep=6, scope="global", top_k=2)
    assert changes["experts_after"] == 18 and min(model.expert_counts().values()) >= 4  # at least the old top-k per layer
    assert all(model.block(layer).top_k == min(2, n) for layer, n in model.expert_counts().items())


def test_merge_saves_and_reloads_with_plain_transformers(tmp_path, calibration):
    model = fresh("mixtral")
    run("merge", model, calibration, keep=3, operator="slerp")
    model.save(tmp_path)
    expected = logits(model.model)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path)), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(load_pretrained(tmp_path)), expected, rtol=0, atol=1e-6)


def test_different_merges_do_not_share_calibration_caches(calibration):
    a, b = fresh(), fresh()
    run("merge", a, calibration, keep=4, operator="average")
    run("merge", b, calibration, keep=4, operator="sce")
    assert a.lineage != b.lineage


def test_progressive_merge_halves_until_the_target(calibration):
    model = fresh()
    changes = run("progressive_merge", model, calibration, keep=3)
    assert [s["experts"] for s in changes["steps"]] == [24, 12, 9]
    assert model.expert_counts() == {1: 3, 2: 3, 3: 3}
    assert all(sorted(e for g in groups for e in g) == list(range(16)) for groups in changes["groups"].values())
    assert changes["operator"] == "sce" and changes["grouping"] == "state_cl"


# -- variants ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["multiplexage", "fused_lora"])
def test_grouped_variants_with_singleton_groups_reproduce_the_layer(method, calibration):
    """Grouped routing with one expert per group and fresh adapters is exactly the original block."""
    model = fresh()
    reference = copy.deepcopy(model.block(1).module)
    run(method, model, calibration, keep_ratio=1.0)
    fused = model.layers[1].mlp
    assert isinstance(fused, FusedMoE) and model.block(1) is None  # opaque to the view
    x = _hidden(reference)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(x), rtol=1e-5, atol=1e-6)


def test_fused_lora_member_adapters_start_as_the_reference_svd_and_scale_on_first_forward(calibration, tmp_path):
    """moe-pruner's FusedLinear: per-member B A = (W_e - merged) / c, c = sum(sigma) / r; the per-feature
    scale is set on the first forward to mean|merged output| / mean|adapter output| and is saved."""
    from moebench_plugins.fusion.modules import MemberAdapterExperts

    model = fresh()
    block = model.block(1)
    originals = block.gate_up_proj.detach().clone(), block.down_proj.detach().clone()
    inter = block.intermediate_size
    cls = host().method("fused_lora")
    ctx = Context(calibration=calibration)
    changes = cls().apply(model, parse(cls.Params, {"keep": 4, "rank": 64, "align": False}), ctx)
    assert changes["layers"][1]["adapters"] == "members"
    assert any("without heal" in n for n in ctx.notes), "an unhealed members run says it is not meant to be used as is"
    experts = model.layers[1].mlp.fusion
    assert isinstance(experts, MemberAdapterExperts) and not experts.scaled.any()
    e = 5
    g = int(experts.assign[e])
    delta = (originals[1][e] - experts.down_proj[g]).detach()
    sigma = torch.linalg.svdvals(delta.detach().double())
    c = float(sigma[:experts.rank].sum()) / experts.rank
    torch.testing.assert_close((experts.down_b[e] @ experts.down_a[e]).double(), delta.double() / c, rtol=1e-4, atol=1e-5)
    gate_delta = (originals[0][e, :inter] - experts.gate_up_proj[g, :inter]).detach()
    c_gate = float(torch.linalg.svdvals(gate_delta.double())[:experts.rank].sum()) / experts.rank
    approx = experts.gate_up_b[e, :inter] @ experts.gate_up_a[e, : experts.rank]
    torch.testing.assert_close(approx.double(), gate_delta.double() / c_gate, rtol=1e-4, atol=1e-5)
    before = logits(model.model)
    assert experts.scaled.all() and not torch.equal(experts.down_scale, torch.ones_like(experts.down_scale))
    torch.testing.assert_close(logits(model.model), before), "scales are set once, not per batch"


def test_mixture_of_lora_at_full_rank_reproduces_the_layer(calibration):
    model = fresh()
    references = {b.layer: copy.deepcopy(b.module) for b in model.blocks()}
    before = logits(model.model)
    changes = run("mixture_of_lora", model, calibration, keep=1, rank=64)
    for layer, reference in references.items():
        fused = model.layers[layer].mlp
        assert isinstance(fused.fusion, MixtureOfLoRAExperts) and fused.fusion.num_cores == 1
        x = _hidden(reference, seed=layer)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), reference(x), rtol=0, atol=1e-5)
        assert changes["layers"][layer]["full_rank"] and changes["layers"][layer]["weight_rel_error"] < 1e-5
    torch.testing.assert_close(logits(model.model), before, rtol=0, atol=1e-5)


def test_mixture_of_lora_error_falls_with_rank(calibration):
    errors = []
    for rank in (2, 8, 32):
        changes = run("mixture_of_lora", fresh(), calibration, rank=rank)
        errors.append(changes["layers"][1]["weight_rel_error"])
    assert errors[0] > errors[1] > errors[2] > 0


@pytest.mark.parametrize("name", ["deepseek_v2", "mixtral"])
@pytest.mark.parametrize("method", VARIANTS)
def test_variants_save_and_reload_through_moebench(tmp_path, name, method, calibration):
    model = fresh(name)
    params = {"rank": 4} if method != "multiplexage" else {}
    changes = run(method, model, calibration, keep=2, **params)
    assert changes["reload"] == "moebench" and changes["module_class"] == "moebench_plugins.fusion:FusedMoE"
    with torch.no_grad():  # make the zero-initialised adapters matter, so reload is tested on them
        for n, p in model.model.named_parameters():
            if n.endswith(("mux", "lora_gate_up_b", "lora_down_b")):
                p.normal_(0, 0.02)
    expected = logits(model.model)
    model.save(tmp_path)
    reloaded = load_pretrained(tmp_path)
    assert isinstance(reloaded.model.layers[-1].mlp, FusedMoE)
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-6)


# -- healing ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,params",
    [
        ("merge", {"keep": 4, "heal": {"lr": 2e-4}}),
        ("merge", {"keep": 4, "heal": {"train": "lora", "lora_rank": 4, "loss": "kl+mse"}}),
        ("multiplexage", {"keep": 4}),
        ("fused_lora", {"keep": 4, "heal": {"loss": "mse"}}),
        ("mixture_of_lora", {"rank": 4}),
    ],
)
def test_healing_lowers_the_distillation_loss_it_optimises(method, params, calibration):
    teacher = _base("deepseek_v2")
    model = fresh()
    heal = {"steps": 12, "lr": 5e-3, **params.pop("heal", {})}
    spec = parse(HealParams, heal)
    batch = calibration.windows(model.tokenizer)[: spec.batch_size]
    changes = run(method, model, calibration, teacher=teacher, heal=heal, **params)
    record = changes["healing"]
    assert len(record["loss_curve"]) == 12 and record["teacher"] == "context"
    assert record["loss_after"] < record["loss_before"]
    # the record's figures are the loss itself, on the batch it names
    assert distillation_loss(model.model, teacher, batch, spec) == pytest.approx(record["loss_after"], rel=1e-3)
    if heal.get("train") == "lora":
        assert changes["reload"] == "transformers" and record["lora_merged"]
        assert not any("lora" in n for n, _ in model.model.named_parameters())


def test_healing_trains_only_what_it_is_given(calibration):
    teacher = _base("deepseek_v2")
    healed, plain = fresh(), fresh()
    run("fused_lora", healed, calibration, teacher=teacher, keep=4, adapters="latent", heal={"steps": 3, "lr": 1e-2})
    run("fused_lora", plain, calibration, keep=4, adapters="latent")
    changed = {n for (n, p), (_, q) in zip(healed.model.named_parameters(), plain.model.named_parameters()) if not torch.equal(p, q)}
    # train = 'auto' for fused LoRA (latent variant): the LoRA terms and the latent projection, nothing else
    assert changed and all(n.rsplit(".", 1)[-1] in {"latent", "lora_gate_up_a", "lora_gate_up_b", "lora_down_a", "lora_down_b"} for n in changed)
    assert any(n.endswith("lora_down_b") for n in changed)
    assert all(p.requires_grad for p in healed.model.parameters())  # flags restored after training


def test_progressive_merge_heals_between_steps(calibration):
    teacher = _base("deepseek_v2")
    changes = run("progressive_merge", fresh(), calibration, teacher=teacher, keep=4, heal={"steps": 3, "lr": 1e-3})
    assert [len(s["healing"]["loss_curve"]) for s in changes["steps"]] == [3, 3]
    assert len(changes["healing"]["loss_curve"]) == 6


# -- parameters -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,params,match",
    [
        ("merge", {"operator": "mean"}, "operator must be one of"),
        ("merge", {"keep": 0}, "keep must be >= 1"),
        ("merge", {"keep_ratio": 1.5}, "keep_ratio must be in"),
        ("merge", {"grouping": "act"}, "expected one of"),
        ("merge", {"heal": {"train": "adapters"}}, "merging adds no adapters"),
        ("merge", {"heal": {"steps": -1}}, "steps must be >= 0"),
        ("multiplexage", {"heal": {"train": "lora"}}, "applies to merge"),
        ("fused_lora", {"rank": 0}, "rank and latent must be >= 1"),
        ("mixture_of_lora", {"rank": 0}, "rank must be >= 1"),
    ],
)
def test_bad_parameters_name_what_was_wrong(method, params, match):
    with pytest.raises(ParamError, match=match):
        parse(host().method(method).Params, params)


# -- end to end on the trained zoo ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["deepseek_v2", "mixtral"])
def test_every_variant_runs_from_a_suite_saves_and_reloads(tmp_path, name):
    """Each fusion method from a suite on a trained zoo model: it runs, saves, and reloads with the same logits."""
    from moebench.runner import RunOptions, run_suite
    from moebench.suite import load_suite

    suite_file = tmp_path / "fusion.toml"
    suite_file.write_text(
        f"""
[suite]
name = "fusion-e2e-{name}"
[model]
source = "zoo:{name}"
[hardware]
threads = 2                       # the zoo builds on its own thread count: share the default (2-thread) builds
[calibration]
data = "embedded:prose"
samples = 8
seqlen = 64
[eval.perplexity]
data = "embedded:prose"
seqlen = 64
max_samples = 4
[[methods]]
name = "merge"
method = "merge"
params = {{ keep_ratio = 0.5, operator = "sce", heal = {{ steps = 2 }} }}
[[methods]]
name = "progressive"
method = "progressive_merge"
params = {{ keep_ratio = 0.5 }}
[[methods]]
name = "multiplex"
method = "multiplexage"
params = {{ keep_ratio = 0.5, heal = {{ steps = 2 }} }}
[[methods]]
name = "fused-lora"
method = "fused_lora"
params = {{ keep_ratio = 0.5, rank = 4, heal = {{ steps = 2 }} }}
[[methods]]
name = "molora"
method = "mixture_of_lora"
params = {{ rank = 8, heal = {{ steps = 2 }} }}
"""
    )
    suite = load_suite(suite_file)
    result = run_suite(suite, RunOptions(out=tmp_path / "out", save_models=tmp_path / "models", log=lambda m: None))
    assert [r.status for r in result.records] == ["ok"] * 6, [r.error for r in result.records]
    from moebench_plugins.metrics import Perplexity

    for record in result.records[1:]:
        changes = next(iter(record.changes.values()))
        if "healing" in changes:
            assert changes["healing"]["loss_after"] < changes["healing"]["loss_before"], record.name
        saved = record.saved_model
        folder = saved["path"] if isinstance(saved, dict) else saved
        loaders = [load_pretrained] + ([AutoModelForCausalLM.from_pretrained] if changes["reload"] == "transformers" else [])
        for loader in loaders:
            net = loader(folder).eval()
            reloaded = MoEModel(net, host().adapter_for(net), tokenizer=zoo.tokenizer())
            measured = Perplexity().measure(reloaded, suite.evals["perplexity"], Context())["perplexity"]["value"]
            # the same logits: the reloaded model's perplexity is the one measured before saving
            assert measured == pytest.approx(record.metrics["perplexity"]["value"], rel=1e-5), (record.name, loader)


@pytest.mark.parametrize("name", ["deepseek_v2", "mixtral"])
def test_fused_blocks_report_their_experts_and_active_parameters(name, calibration):
    """Fusion blocks are opaque to the MoE view; they count their own experts and unused parameters."""
    from moebench_plugins.metrics import parameter_counts, routed_experts

    plain, mux, molora = fresh(name), fresh(name), fresh(name)
    layers, top_k, hidden = len(plain.moe_layers), next(plain.blocks()).top_k, plain.model.config.hidden_size
    experts = next(plain.blocks()).num_experts
    run("merge", plain, calibration, keep=4)
    run("multiplexage", mux, calibration, keep=4)
    assert routed_experts(plain) == routed_experts(mux) == 4 * layers
    p, q = parameter_counts(plain), parameter_counts(mux)
    # multiplexage = the same merge plus mux rows [E, H] per layer, of which a token reads its top-k,
    # and it keeps the original router (E rows, all active) where the merge has 4
    router = layers * (experts - 4) * hidden
    assert q["total"] - p["total"] == layers * experts * hidden + router
    assert q["active"] - p["active"] == layers * top_k * hidden + router
    run("mixture_of_lora", molora, calibration, keep=1, rank=2)
    counts = parameter_counts(molora)
    assert routed_experts(molora) == experts * layers  # every original expert is rebuilt: core + residual
    assert counts["active"] < counts["total"]
