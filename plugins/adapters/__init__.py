"""Architecture adapters for the transformers 5 MoE families.

Each class states only how its family differs from the shared layout in
:class:`moebench.adapter.Adapter`: the config field for the expert count, shared
experts, router details, and which config fields describe per-layer structure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moebench.adapter import Adapter
from moebench.hookspecs import hookimpl


class DeepseekV2Adapter(Adapter):
    """DeepSeek-V2 / V2-Lite / Coder-V2: dense first layers, shared experts, softmax router."""

    name = "deepseek_v2"
    model_types = ("deepseek_v2",)
    num_experts_attr = "n_routed_experts"

    def shared_experts(self, block: nn.Module) -> nn.Module | None:
        return block.shared_experts

    def resize_router(self, router: nn.Module, n: int) -> list[str]:
        router.num_experts = n
        if router.topk_method == "group_limited_greedy" and n % router.num_group:
            router.topk_method = "greedy"
            return [f"{n} experts do not split into {router.num_group} groups: router switched to greedy top-k"]
        return []

    def after_layers_dropped(self, config, kept: Sequence[int], moe_flags: Sequence[bool]) -> None:
        super().after_layers_dropped(config, kept, moe_flags)
        # dense layers are a prefix in DeepSeek; they stay a prefix after any removal
        config.first_k_dense_replace = next((i for i, moe in enumerate(moe_flags) if moe), len(moe_flags))


class DeepseekV3Adapter(DeepseekV2Adapter):
    """DeepSeek-V3 / R1: sigmoid router with score-correction bias and expert groups."""

    name = "deepseek_v3"
    model_types = ("deepseek_v3",)
    expert_buffers = ("e_score_correction_bias",)

    def probabilities(self, block: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid()

    def resize_router(self, router: nn.Module, n: int) -> list[str]:
        router.num_experts = n
        # group-limited routing needs n divisible by the groups and >= 2 experts per group
        if router.num_group > 1 and (n % router.num_group or n // router.num_group < 2):
            old = router.num_group
            router.num_group, router.topk_group = 1, 1
            return [f"{n} experts do not split into {old} groups: group-limited routing turned off"]
        return []


class MixtralAdapter(Adapter):
    """Mixtral: 8 experts, top-2, no shared experts."""

    name = "mixtral"
    model_types = ("mixtral",)
    num_experts_attr = "num_local_experts"


class _QwenAdapter(Adapter):
    def after_layers_dropped(self, config, kept: Sequence[int], moe_flags: Sequence[bool]) -> None:
        super().after_layers_dropped(config, kept, moe_flags)
        # spell out which layers are dense, since a sparse step no longer lines up
        config.mlp_only_layers = [i for i, moe in enumerate(moe_flags) if not moe]
        config.decoder_sparse_step = 1


class Qwen2MoeAdapter(_QwenAdapter):
    """Qwen1.5-MoE / Qwen2-MoE: routed experts plus one sigmoid-gated shared expert."""

    name = "qwen2_moe"
    model_types = ("qwen2_moe",)

    def shared_experts(self, block: nn.Module) -> nn.Module | None:
        return block.shared_expert


class Qwen3MoeAdapter(_QwenAdapter):
    """Qwen3-MoE: routed experts only, normalised top-k."""

    name = "qwen3_moe"
    model_types = ("qwen3_moe",)


class OlmoeAdapter(Adapter):
    """OLMoE: 64 experts, top-8, every layer sparse."""

    name = "olmoe"
    model_types = ("olmoe",)


@hookimpl
def register_adapters():
    return [DeepseekV2Adapter, DeepseekV3Adapter, MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter, OlmoeAdapter]
