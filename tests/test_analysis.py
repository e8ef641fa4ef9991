"""Expert analysis (co-activation, output and weight similarity), grouping, and ``moebench analyze``."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from moebench import zoo
from moebench.adapter import MoEModel
from moebench_plugins.fusion.analysis import (
    coactivation_affinity,
    coactivation_counts,
    output_similarity,
    output_similarity_update,
    plot_heatmaps,
    weight_similarity,
)
from moebench.calibration import Calibration, CalibrationSpec
from moebench_plugins.fusion.grouping import Groups, by_frequency, cluster, spectral
from moebench.plugins import host


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensor ops on a shared, loaded CPU are far faster without OpenMP hand-offs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_coactivation_counts_every_pair_of_a_tokens_experts():
    torch.manual_seed(0)
    e, k = 7, 3
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(200)])
    counts = coactivation_counts(idx, e)
    brute = torch.zeros(e, e, dtype=torch.long)
    for row in idx.tolist():
        for i, j in itertools.product(row, row):
            brute[i, j] += 1
    assert torch.equal(counts, brute)
    assert torch.equal(counts.diagonal(), torch.bincount(idx.reshape(-1), minlength=e))
    aff = coactivation_affinity(counts)
    assert torch.allclose(aff, aff.T) and torch.all(aff.diagonal() == 1) and aff.min() >= 0 and aff.max() <= 1


def test_output_similarity_matches_a_direct_computation():
    torch.manual_seed(1)
    n, e, h = 40, 5, 6
    outputs = torch.randn(n, e, h)
    selected = torch.rand(n, e) < 0.4
    sums = output_similarity_update(outputs[:25], selected[:25])
    more = output_similarity_update(outputs[25:], selected[25:])
    sims = output_similarity({k: sums[k] + more[k] for k in sums})
    cos = torch.nn.functional.cosine_similarity(outputs[:, :, None], outputs[:, None, :], dim=-1)
    torch.testing.assert_close(sims["all"], cos.mean(0), rtol=1e-5, atol=1e-6)
    for i, j in [(0, 1), (2, 4), (3, 3)]:
        either = selected[:, i] | selected[:, j]
        assert sims["routed"][i, j].item() == pytest.approx(cos[either, i, j].mean().item(), rel=1e-5)
    assert sims["tokens"] == n


def test_weight_similarity_is_the_cosine_of_flattened_experts():
    torch.manual_seed(2)
    gate_up, down = torch.randn(4, 6, 5), torch.randn(4, 5, 3)
    gate_up[1], down[1] = 2 * gate_up[0], 2 * down[0]  # a scaled copy: cosine 1
    gate_up[2], down[2] = -gate_up[0], -down[0]
    sim = weight_similarity(gate_up, down, chunk=7)  # chunking must not change the answer
    flat = torch.cat([gate_up.reshape(4, -1), down.reshape(4, -1)], dim=1)
    expected = torch.nn.functional.cosine_similarity(flat[:, None], flat[None, :], dim=-1)
    torch.testing.assert_close(sim, expected, rtol=1e-5, atol=1e-6)
    assert sim[0, 1].item() == pytest.approx(1.0, abs=1e-6) and sim[0, 2].item() == pytest.approx(-1.0, abs=1e-6)


def _blocks_affinity(sizes, noise=0.05, seed=0):
    """An affinity with clear diagonal blocks, experts shuffled."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    perm = torch.randperm(len(labels), generator=g)
    labels = labels[perm]
    aff = (labels[:, None] == labels[None, :]).float() + noise * torch.rand(len(labels), len(labels), generator=g)
    return (aff + aff.T) / 2, labels


@pytest.mark.parametrize("balanced", [True, False])
def test_clustering_recovers_planted_groups(balanced):
    sizes = [4, 4, 4, 4] if balanced else [6, 3, 2, 1]
    aff, labels = _blocks_affinity(sizes)
    groups = cluster(aff, len(sizes), balanced=balanced)
    groups.check(len(labels))
    found = sorted(sorted(m) for m in groups.members)
    planted = sorted(sorted(torch.nonzero(labels == i).flatten().tolist()) for i in range(len(sizes)))
    assert found == planted
    assert groups.assign[groups.members[0][0]] == 0


def test_balanced_clusters_differ_in_size_by_at_most_one_and_seed_with_the_busiest():
    aff, _ = _blocks_affinity([5, 5, 4])
    priority = torch.arange(14, dtype=torch.float64)  # expert 13 is the busiest
    groups = cluster(aff, 4, priority=priority)
    sizes = sorted(len(m) for m in groups.members)
    assert sizes[-1] - sizes[0] <= 1 and sum(sizes) == 14
    assert groups.members[0][0] == 13


def test_frequency_grouping_keeps_the_top_experts_as_centres():
    freq = torch.tensor([5.0, 50.0, 1.0, 40.0, 3.0, 30.0])
    sim = torch.eye(6)
    sim[0, 3] = sim[3, 0] = 0.9
    sim[2, 5] = sim[5, 2] = 0.8
    sim[4, 1] = sim[1, 4] = 0.7
    groups = by_frequency(freq, sim, 3)
    assert [m[0] for m in groups.members] == [1, 3, 5]
    assert sorted(map(sorted, groups.members)) == [[0, 3], [1, 4], [2, 5]]


def test_bad_group_counts_are_refused():
    with pytest.raises(ValueError, match="into 0 groups"):
        cluster(torch.eye(4), 0)
    with pytest.raises(ValueError, match="partition"):
        Groups([[0, 1], [1]]).check(3)


def _random_model(name="deepseek_v2"):
    torch.manual_seed(0)
    model = zoo.entry(name).cls(zoo.config(name)).eval()
    return MoEModel(model, host().adapter_for(model), tokenizer=zoo.tokenizer(), identity=f"random-{name}")


def test_statistics_gather_in_one_pass_without_double_counting():
    model = _random_model()
    cal = Calibration(CalibrationSpec(samples=6, seqlen=32, batch_size=3), cache=False)
    stats = cal.stats(model, ["routing_counts", "coactivation", "output_similarity"])
    assert cal.passes == 1
    tokens = 6 * 32
    for block in model.blocks():
        counts = stats["routing_counts"][block.layer]
        # output_similarity re-routes its sampled tokens; that must not reach the routing counts
        assert counts.sum().item() == tokens * block.top_k
        co = stats["coactivation"][block.layer]
        assert torch.equal(co.diagonal(), counts) and torch.equal(co, co.T)
        sim = stats["output_similarity"][block.layer]
        assert sim["all"].shape == (block.num_experts,) * 2 and sim["tokens"] == tokens
        assert torch.allclose(sim["all"].diagonal(), torch.ones(block.num_experts), atol=1e-5)


def test_heatmaps_are_written(tmp_path):
    path = plot_heatmaps({1: torch.rand(4, 4), 2: torch.rand(4, 4)}, "test", tmp_path / "h.png")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmap_axes_are_whole_expert_indices():
    import matplotlib.pyplot as plt

    from moebench_plugins.fusion.analysis import heatmap_figure

    fig = heatmap_figure({1: torch.rand(16, 16)}, "test")  # matplotlib's default ticks here are 0, 2.5, 5, 7.5...
    fig.canvas.draw()
    ax = fig.axes[0]
    ticks = [t for t in [*ax.get_xticks(), *ax.get_yticks()] if -0.5 <= t <= 15.5]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert ax.get_xlabel() == "expert"
    plt.close(fig)


def test_analyze_command_writes_heatmaps_and_matrices(tmp_path, monkeypatch):
    from moebench.cli import app
    from typer.testing import CliRunner

    model = _random_model("mixtral")
    folder = tmp_path / "model"
    model.model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    suite = tmp_path / "s.toml"
    suite.write_text(
        f'[suite]\nname = "an"\n[model]\nsource = "{folder}"\n'
        '[calibration]\ndata = "embedded:prose"\nsamples = 4\nseqlen = 32\n'
    )
    out = tmp_path / "out"
    monkeypatch.setenv("MOEBENCH_HOME", str(tmp_path / "home"))  # keep this throwaway model's calibration out of the shared cache
    result = CliRunner().invoke(app, ["analyze", str(suite), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for kind in ("coactivation", "output_similarity", "weight_similarity"):
        assert (out / f"{kind}.png").exists()
    matrices = torch.load(out / "analysis.pt", weights_only=True)
    assert set(matrices["coactivation"]) == set(model.moe_layers)
    assert matrices["weight_similarity"][0].shape == (8, 8)
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["tokens"] == 128 and "coactivation" in summary["mean_offdiagonal"]
    assert "weight_similarity.png" in (out / "analysis.html").read_text()


def test_report_plots_fusion_sweeps_and_loss_curves_from_records():
    from moebench.render import html, plots, suite_tables

    def record(name, entry, grid, keep, rank, ppl, curve=None):
        changes = {"experts_after": 3 * keep}
        if curve:
            changes["healing"] = {"loss_curve": curve}
        return {
            "suite": "s", "run_id": name, "name": name, "status": "ok", "entry": entry, "grid": grid,
            "pipeline": [{"method": "fused_lora", "params": {"keep": keep, "rank": rank}}],
            "metrics": {"perplexity": {"value": ppl}},
            "changes": {"fused_lora": changes},
        }

    records = [
        {"suite": "s", "run_id": "b", "name": "baseline", "status": "ok", "pipeline": [], "metrics": {"perplexity": {"value": 10.0}}},
        record("a1", "a", {"keep": 4}, 4, 8, 30.0, [1.0, 0.5]),
        record("a2", "a", {"keep": 8}, 8, 8, 20.0),
        record("r1", "r", {"rank": 2}, 4, 2, 25.0),
        record("r2", "r", {"rank": 8}, 4, 8, 22.0),
        {"suite": "s", "run_id": "f", "name": "f", "status": "failed", "pipeline": []},
    ]
    titles = [p.title for p in plots(suite_tables(records)[0]) if p.png]
    assert titles[-3:] == ["Perplexity vs routed experts", "Perplexity vs LoRA rank", "Healing loss curves"]
    assert "Perplexity vs LoRA rank" in html(records)
    # a suite without sweeps or healing gets only the three standard plots
    plain = [records[0], record("x", "x", {}, 4, None, 12.0)]
    assert [p.title for p in plots(suite_tables(plain)[0])] == ["Perplexity vs weight bytes", "Accuracy vs parameters", "Speedup per method"]


def test_spectral_clustering_recovers_planted_groups_of_any_size():
    """moe-pruner's grouping: scikit-learn spectral clustering on a precomputed affinity (co-activation counts)."""
    sizes = [6, 3, 2, 5]
    labels = [g for g, n in enumerate(sizes) for _ in range(n)]
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(3)).tolist()
    truth = [labels[p] for p in perm]
    t = torch.tensor(truth)
    aff = torch.where(t[:, None] == t[None, :], 50.0, 1.0) + torch.rand(16, 16, generator=torch.Generator().manual_seed(0))
    groups = spectral(aff, 4)
    found = sorted(sorted(m) for m in groups.members)
    expected = sorted(sorted(i for i, x in enumerate(truth) if x == g) for g in range(4))
    assert found == expected
    assert len(spectral(aff, 1).members) == 1 and spectral(aff, 16).num_groups == 16
    with pytest.raises(ValueError, match="non-negative"):
        spectral(aff - 100, 4)
