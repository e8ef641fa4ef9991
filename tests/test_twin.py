"""Shape twins: published configs at reduced depth, the weight recipe, source parsing."""

from __future__ import annotations

import json

import pytest
import torch

from moebench import twin, zoo
from moebench.errors import MoebenchError


def test_every_twin_cites_its_model_card_and_builds_on_meta():
    for name in twin.names():
        published = twin.published(name)
        assert published["_source"].startswith("https://huggingface.co/"), name
        cfg = twin.config(name, layers=2)
        assert cfg.num_hidden_layers == 2 and cfg.vocab_size == zoo.VOCAB_SIZE
        assert cfg.hidden_size == published["hidden_size"]  # real width
        shapes = twin._shapes(cfg)
        assert any(k.endswith("experts.gate_up_proj") for k in shapes), name


def test_reduced_depth_keeps_dense_first_and_shared_experts():
    v3 = twin.config("deepseek_v3", layers=2)
    assert v3.first_k_dense_replace == 1 and v3.n_shared_experts == 1  # 3 dense-first, capped to keep one MoE layer
    assert twin.config("deepseek_v3", layers=8).first_k_dense_replace == 3
    lite = twin._shapes(twin.config("deepseek_v2_lite", layers=2))
    assert "model.layers.0.mlp.gate_proj.weight" in lite and "model.layers.1.mlp.shared_experts.gate_proj.weight" in lite
    assert lite["model.layers.1.mlp.experts.gate_up_proj"] == (64, 2 * 1408, 2048)
    qwen2 = twin._shapes(twin.config("qwen2_moe_a2_7b", layers=1))
    assert "model.layers.0.mlp.shared_expert_gate.weight" in qwen2


def test_source_parsing_errors_name_the_problem():
    assert twin.parse_source("mixtral_8x7b?layers=4&seed=3") == ("mixtral_8x7b", {"layers": 4, "seed": 3})
    with pytest.raises(MoebenchError, match="unknown twin 'mixtral'.*mixtral_8x7b"):
        twin.parse_source("mixtral")
    with pytest.raises(MoebenchError, match="between 1 and 27"):
        twin.parse_source("deepseek_v2_lite?layers=40")
    with pytest.raises(MoebenchError, match="layers=N&seed=S"):
        twin.parse_source("olmoe_1b_7b?depth=2")
    with pytest.raises(MoebenchError, match="experts must be between 1 and 8"):
        twin.parse_source("mixtral_8x7b?experts=9")


def test_fewer_experts_is_a_dry_run_knob_that_keeps_width():
    cfg = twin.config("deepseek_v3", layers=2, experts=4)
    assert cfg.n_routed_experts == 4 and cfg.num_experts_per_tok == 4 and cfg.n_group == 1
    assert cfg.hidden_size == 7168 and cfg.moe_intermediate_size == 2048


def test_recipe_is_seeded_by_name_and_scaled_by_fan_in():
    a = twin.tensor("model.layers.1.mlp.experts.gate_up_proj", (4, 64, 256), torch.bfloat16, 0)
    assert a.dtype == torch.bfloat16
    assert torch.equal(a, twin.tensor("model.layers.1.mlp.experts.gate_up_proj", (4, 64, 256), torch.bfloat16, 0))
    assert not torch.equal(a, twin.tensor("model.layers.1.mlp.experts.gate_up_proj", (4, 64, 256), torch.bfloat16, 1))
    assert a.float().std().item() == pytest.approx(256**-0.5, rel=0.05)
    down = twin.tensor("model.layers.1.mlp.experts.down_proj", (4, 256, 64), torch.float32, 0)
    assert down.std().item() == pytest.approx(twin.OUT_GAIN * 64**-0.5, rel=0.05)
    assert torch.equal(twin.tensor("model.norm.weight", (8,), torch.float32, 0), torch.ones(8))


@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe"])
def test_recipe_gives_realistic_layer_updates_and_balanced_routers(arch):
    torch.manual_seed(0)
    entry = zoo.entry(arch)
    model = entry.cls(entry.config(hidden_size=256)).eval()
    twin.initialize(model, seed=0)
    ids = torch.randint(3, zoo.VOCAB_SIZE, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ratios = twin.layer_output_ratios(model, ids)
        shares = twin.expert_load(model, ids)
    assert all(0.05 <= r <= 1.0 for r in ratios), ratios  # each layer moves the residual stream, none swamps it
    for share in shares:  # no collapse: every expert used, none above 3x its fair share
        assert (share > 0).all() and share.max().item() * share.numel() < 3, share


def test_suite_accepts_twin_sources_and_rejects_bad_ones(tmp_path):
    from moebench.suite import load_suite

    good = tmp_path / "good.toml"
    good.write_text('[suite]\nname = "t"\n[model]\nsource = "twin:deepseek_v2_lite?layers=2"\ndtype = "bfloat16"\n[[methods]]\nname = "rtn"\nmethod = "rtn"\n')
    assert load_suite(good).model.source.startswith("twin:")
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("layers=2", "layers=0"))
    with pytest.raises(MoebenchError, match="model.source.*layers must be between 1 and 27"):
        load_suite(bad)


@pytest.mark.slow
def test_twin_checkpoint_is_sharded_per_layer_and_loads(tmp_path, monkeypatch):
    from moebench.models import load

    monkeypatch.setenv("MOEBENCH_HOME", str(tmp_path))
    model = load("twin:olmoe_1b_7b?layers=1", dtype="bfloat16")
    folder = twin.build("olmoe_1b_7b", layers=1)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2  # one decoder layer + embeddings/norm/head
    assert json.loads((folder / "twin.json").read_text())["note"].startswith("shape twin")
    assert model.model.dtype == torch.bfloat16 and model.config.hidden_size == 2048
    ids = torch.randint(3, zoo.VOCAB_SIZE, (2, 32))
    with torch.no_grad():
        shares = twin.expert_load(model.model, ids)
    assert (shares[0] > 0).float().mean() > 0.9
