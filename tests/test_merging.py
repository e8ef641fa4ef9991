"""Merge operators: fixed points, SLERP geometry, SCE's select/erase, and the plugin hook."""

from __future__ import annotations

import math

import pytest
import torch
from moebench.errors import MoebenchError
from moebench.hookspecs import hookimpl
from moebench_plugins.fusion.operators import merge, operators, sce, settings, slerp
from moebench.params import ParamError, parse
from moebench.plugins import host

BUILTIN = ["average", "frequency_average", "slerp", "sce"]


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("n", [2, 3, 5])
def test_identical_experts_merge_to_that_expert(name, n):
    torch.manual_seed(n)
    expert = torch.randn(24, 16)
    stack = expert.expand(n, -1, -1).clone()
    weights = torch.rand(n) + 0.1
    merged = merge(stack, weights, name)
    assert merged.shape == expert.shape and merged.dtype == expert.dtype
    torch.testing.assert_close(merged, expert, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", BUILTIN)
def test_a_group_of_one_is_returned_unchanged(name):
    expert = torch.randn(8, 4)
    assert torch.equal(merge(expert[None], None, name), expert)


@pytest.mark.parametrize("n", [2, 4])
def test_slerp_at_its_endpoints_returns_the_endpoint(n):
    torch.manual_seed(1)
    stack = torch.randn(n, 12, 10)
    for i in range(n):
        w = torch.zeros(n, dtype=torch.float64)
        w[i] = 1.0
        torch.testing.assert_close(slerp(stack, w), stack[i], rtol=1e-5, atol=1e-6)


def test_slerp_of_two_follows_the_great_circle():
    a, b = torch.zeros(2, 2), torch.zeros(2, 2)
    a[0, 0], b[0, 1] = 2.0, 4.0  # orthogonal, norms 2 and 4
    for t in (0.25, 0.5, 0.8):
        out = slerp(torch.stack([a, b]), torch.tensor([1 - t, t], dtype=torch.float64))
        norm = (1 - t) * 2 + t * 4
        expected = torch.zeros(2, 2)
        expected[0, 0], expected[0, 1] = norm * math.cos(t * math.pi / 2), norm * math.sin(t * math.pi / 2)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_slerp_of_many_is_a_spherical_mean_not_a_linear_one():
    torch.manual_seed(2)
    stack = torch.randn(3, 64)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    out = slerp(stack, w)
    # its norm is the weighted mean norm, whereas the linear average shrinks for spread-out members
    assert out.norm().item() == pytest.approx((w.float() * stack.norm(dim=1)).sum().item(), rel=1e-5)
    assert (w.float() @ stack).norm() < out.norm()
    # and its direction is a stationary point: the weighted tangent vectors cancel
    u, m = torch.nn.functional.normalize(stack.double(), dim=1), out.double() / out.double().norm()
    cos = u @ m
    theta = torch.arccos(cos.clamp(-1, 1))
    tangent = ((w * theta / torch.sin(theta))[:, None] * (u - cos[:, None] * m)).sum(0)
    assert tangent.norm() < 1e-6


def test_frequency_average_weights_members_and_average_ignores_them():
    stack = torch.stack([torch.ones(3), 3 * torch.ones(3)])
    assert torch.allclose(merge(stack, torch.tensor([3.0, 1.0]), "frequency_average"), torch.full((3,), 1.5))
    assert torch.allclose(merge(stack, torch.tensor([3.0, 1.0]), "average"), torch.full((3,), 2.0))


def test_sce_reference_steps_on_three_tensors_by_hand():
    """mergekit's SCE (moe-pruner's): the pivot is left out; select by variance among the others;
    weights from mean squares; erase by the sign of the plain (unweighted) sum."""
    pivot = torch.zeros(4)
    b = torch.tensor([1.0, 0.1, -2.0, 0.0])
    c = torch.tensor([3.0, 0.1, 3.0, 0.0])
    stack = torch.stack([pivot, b, c])
    w = torch.tensor([0.6, 0.2, 0.2], dtype=torch.float64)  # the pivot is the most-used member
    cb, cc = (1 + 0.01 + 4) / 4, (9 + 0.01 + 9) / 4  # mean squares of b's and c's task vectors
    out = sce(stack, w, select=1.0)
    assert out[0].item() == pytest.approx((cb * 1.0 + cc * 3.0) / (cb + cc), rel=1e-5)
    assert out[1].item() == pytest.approx(0.1, rel=1e-5)
    assert out[2].item() == pytest.approx(3.0, rel=1e-5)  # sum 1 > 0: b's negative entry is erased
    assert out[3].item() == 0.0
    # select 0.5: two elements have non-zero variance among b and c, so int(2 * 0.5) = 1 is kept:
    # element 2 (variance 6.25 beats element 0's 1.0); everything else stays at the pivot
    half = sce(stack, w, select=0.5)
    assert half.tolist() == pytest.approx([0.0, 0.0, 3.0, 0.0], rel=1e-5)
    # moebench's variant counts the pivot's zeros in the variance and keeps round(0.5 * 4) = 2 elements
    assert sce(stack, w, select=0.5, variant="moebench")[0].item() != 0.0
    # the sign vote is unweighted: a heavy member's +1 loses to a light member's -2
    heavy, light = torch.tensor([10.0, 1.0]), torch.tensor([0.1, -2.0])
    two = torch.stack([torch.zeros(2), heavy, light])
    assert sce(two, w, select=1.0)[1].item() == pytest.approx(-2.0)
    assert sce(two, w, select=1.0, variant="moebench")[1].item() == pytest.approx(1.0)


def test_sce_moebench_variant_selects_by_variance_and_erases_minority_signs():
    pivot = torch.zeros(4)
    b = torch.tensor([1.0, 0.1, -2.0, 0.0])
    c = torch.tensor([3.0, 0.1, 3.0, 0.0])
    stack = torch.stack([pivot, b, c])
    w = torch.tensor([0.6, 0.2, 0.2], dtype=torch.float64)  # the pivot is the most-used member
    # select = 1 keeps every element; members weigh by task-vector energy (the pivot's is zero)
    eb, ec = 1 + 0.01 + 4, 9 + 0.01 + 9
    cb, cc = eb / (eb + ec), ec / (eb + ec)
    out = sce(stack, w, select=1.0, variant="moebench")
    assert out[0].item() == pytest.approx((cb * 1.0 + cc * 3.0) / (cb + cc), rel=1e-5)  # signs agree: weighted mean
    assert out[1].item() == pytest.approx(0.1, rel=1e-5)
    assert cc * 3.0 - cb * 2.0 > 0
    assert out[2].item() == pytest.approx(3.0, rel=1e-5)  # b's minority sign is erased, not averaged in
    assert out[3].item() == 0.0
    # select = 0.25 keeps only the highest-variance element (index 2); the others stay at the pivot
    low = sce(stack, w, select=0.25, variant="moebench")
    assert low[0].item() == 0.0 and low[1].item() == 0.0 and low[2].item() == pytest.approx(3.0, rel=1e-5)


def test_merge_rejects_bad_weights_and_unknown_operators():
    stack = torch.randn(2, 3)
    with pytest.raises(ValueError, match="non-negative"):
        merge(stack, torch.tensor([-1.0, 2.0]))
    with pytest.raises(ValueError, match="2 non-negative"):
        merge(stack, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(MoebenchError, match="unknown merge operator 'slrp'.*did you mean 'slerp'"):
        merge(stack, None, "slrp")


class _MedianPlugin:
    """A third-party operator, registered through the same hook a plugin package would use."""

    @staticmethod
    @hookimpl
    def register_merge_operators():
        return {"median": lambda stack, weights: stack.median(dim=0).values}


def test_plugins_add_operators_that_methods_can_name():
    pm = host().pm
    plugin = _MedianPlugin()
    pm.register(plugin, name="test-median")
    try:
        assert "median" in operators() and set(BUILTIN) <= set(operators())
        stack = torch.tensor([[1.0], [5.0], [2.0]])
        assert merge(stack, None, "median").item() == 2.0
        params = parse(host().method("merge").Params, {"operator": "median", "keep": 2})
        assert params.operator == "median"
    finally:
        pm.unregister(plugin)
    assert "median" not in operators()
    with pytest.raises(ParamError, match="operator must be one of"):
        parse(host().method("merge").Params, {"operator": "median"})


def test_aligned_merge_of_two_permuted_copies_gives_the_expert_back():
    """Permuting an expert's intermediate neurons leaves its function unchanged; alignment undoes it before averaging."""
    from moebench_plugins.fusion import alignment

    g = torch.Generator().manual_seed(0)
    inter, hidden = 12, 8
    gate_up, down = torch.randn(2 * inter, hidden, generator=g), torch.randn(hidden, inter, generator=g)
    perm = torch.randperm(inter, generator=g)
    pgu, pdn = alignment.permute(gate_up, down, perm)
    x = torch.randn(5, hidden, generator=g)

    def forward(gu, dn):
        return (torch.nn.functional.silu(x @ gu[:inter].T) * (x @ gu[inter:].T)) @ dn.T

    torch.testing.assert_close(forward(pgu, pdn), forward(gate_up, down))
    stack_gu, stack_dn = torch.stack([gate_up, pgu]), torch.stack([down, pdn])
    agu, adn = alignment.align(stack_gu, stack_dn, pivot=0)
    w = torch.tensor([0.5, 0.5])
    torch.testing.assert_close(merge(agu, w, "average"), gate_up)
    torch.testing.assert_close(merge(adn, w, "average"), down)
    assert not torch.allclose(merge(stack_gu, w, "average"), gate_up), "unaligned, the copies average into something else"


def test_settings_name_the_operator_defaults_a_run_used():
    assert settings("sce", {}) == {"select": 0.2, "variant": "reference"}
    assert settings("sce", {"variant": "moebench"}) == {"select": 0.2, "variant": "moebench"}
    assert settings("average", {}) == {}
