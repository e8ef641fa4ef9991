"""Adapters: every architecture's view, edits, and save/reload to the same logits."""

from __future__ import annotations

import pytest
import torch
import transformers

from moebench.adapter import PassThrough
from moebench.errors import MoebenchError
from moebench.models import load, load_pretrained

from conftest import ARCHS


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(3, 2000, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHS)
def test_view(arch, checkpoint):
    m = load(str(checkpoint(arch)))
    assert m.adapter.name == arch
    blocks = list(m.blocks())
    assert blocks, "every zoo architecture has MoE blocks"
    for b in blocks:
        E, two_i, H = b.gate_up_proj.shape
        assert b.router_weight.shape == (E, H) and b.down_proj.shape == (E, H, two_i // 2)
        assert 1 <= b.top_k <= E
        gate, up, down = b.expert(0)
        assert gate.shape == up.shape == (two_i // 2, H) and down.shape == (H, two_i // 2)
    has_shared = arch in ("deepseek_v2", "deepseek_v3", "qwen2_moe")
    assert (blocks[0].shared is not None) == has_shared
    if arch.startswith("deepseek"):
        assert 0 not in m.moe_layers, "DeepSeek's first layer is dense"


def test_expert_forward_matches_block(checkpoint):
    """Routing each token through expert_forward reproduces the packed experts module."""
    m = load(str(checkpoint("mixtral")))
    b = next(m.blocks())
    x = torch.randn(10, b.gate_up_proj.shape[-1])
    _, weights, idx = m.adapter.route(b.router(x))
    want = b.experts(x, idx, weights)
    got = torch.zeros_like(x)
    for t in range(10):
        for k in range(idx.shape[1]):
            got[t] += weights[t, k] * b.expert_forward(int(idx[t, k]), x[t : t + 1])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_edit_reloads_with_plain_transformers(arch, checkpoint, tmp_path):
    m = load(str(checkpoint(arch)))
    before = logits(m.model, IDS)
    for b in list(m.blocks()):
        m.keep_experts(b.layer, [5, 0, 3, 1, 7, 2])
    after = logits(m.model, IDS)
    assert not torch.allclose(before, after), "dropping experts changes outputs"
    m.save(tmp_path)
    assert not m.needs_moebench_loader()
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(plain, IDS), after, rtol=1e-5, atol=1e-5)
    for b in m.blocks():
        assert b.num_experts == 6 and b.experts.num_experts == 6


@pytest.mark.parametrize("arch", ARCHS)
def test_nonuniform_edits_reload_with_moebench_loader(arch, checkpoint, tmp_path):
    m = load(str(checkpoint(arch)))
    layers = m.moe_layers  # 4 or 5 MoE layers
    m.keep_experts(layers[1], [1, 2, 4])  # this layer now differs from the others
    m.skip_moe(layers[2])
    m.set_top_k(layers[-1], 1)
    m.drop_layers([0])  # renumbers every later layer
    after = logits(m.model, IDS)
    m.save(tmp_path)
    assert m.needs_moebench_loader()
    reloaded = load_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded, IDS), after, rtol=1e-5, atol=1e-5)
    assert reloaded.config.num_hidden_layers == len(m.layers) == 4
    assert isinstance(reloaded.model.layers[layers[2] - 1].mlp, PassThrough)
    view = load(str(tmp_path))
    assert view.expert_counts()[layers[1] - 1] == 3
    assert view.block(layers[-1] - 1).top_k == 1


@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen2_moe"])
def test_drop_dense_and_sparse_layers_keeps_config_consistent(arch, checkpoint, tmp_path):
    m = load(str(checkpoint(arch)))
    m.drop_layers([0])
    after = logits(m.model, IDS)
    m.save(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(plain, IDS), after, rtol=1e-5, atol=1e-5)


def test_replace_experts_installs_new_weights(checkpoint):
    m = load(str(checkpoint("deepseek_v3")))
    b = next(m.blocks())
    gu, down, router = b.gate_up_proj[:4].clone() * 2, b.down_proj[:4].clone(), b.router_weight[:4].clone()
    m.replace_experts(b.layer, gu, down, router)
    nb = m.block(b.layer)
    assert nb.num_experts == 4 and nb.router.e_score_correction_bias.shape == (4,)
    torch.testing.assert_close(nb.gate_up_proj, gu)
    logits(m.model, IDS)  # still runs


def test_bad_edits_are_refused(checkpoint):
    m = load(str(checkpoint("mixtral")))
    with pytest.raises(ValueError, match="distinct"):
        m.keep_experts(0, [1, 1])
    with pytest.raises(ValueError, match="out of range"):
        m.keep_experts(99, [0])
    with pytest.raises(ValueError, match="top_k"):
        m.set_top_k(0, 100)
    with pytest.raises(ValueError, match="leaving at least one"):
        m.drop_layers(range(len(m.layers)))


def test_unsupported_architecture_is_refused(tmp_path):
    from moebench import zoo

    config = transformers.LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    zoo.tokenizer().save_pretrained(tmp_path)
    with pytest.raises(MoebenchError, match="unsupported architecture 'llama'.*supported: deepseek_v2"):
        load(str(tmp_path))


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(MoebenchError, match="could not be loaded"):
        load(str(tmp_path / "nope"))
