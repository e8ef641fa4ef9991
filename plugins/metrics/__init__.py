"""Built-in metrics: perplexity over fixed windows, and model size (parameters, weight bytes).

Perplexity follows the GPTQ/WANDA protocol: the evaluation split is tokenized as one
stream, cut into non-overlapping windows of ``seqlen`` tokens from the start (at most
``max_samples``), and perplexity is ``exp`` of the mean next-token negative
log-likelihood over every predicted token of every window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moebench.adapter import MoEModel
from moebench.columns import Column
from moebench.data import SPLITS, encode, load_text, windows
from moebench.hookspecs import hookimpl
from moebench.method import Context, Metric
from moebench.params import param
from moebench.progress import progress_bar


@dataclass
class WindowParams:
    """Fixed non-overlapping windows of a split: what perplexity-style metrics evaluate."""

    split: str = param("test", help="split evaluated: train | validation | test")
    seqlen: int = param(256, help="tokens per window")
    max_samples: int | None = param(None, help="at most this many windows (default: all)")
    batch_size: int = param(8, help="windows per forward pass")

    def check(self):
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.seqlen < 2:
            raise ValueError(f"seqlen must be >= 2, got {self.seqlen}")


@dataclass
class PerplexityParams(WindowParams):
    data: str = param("embedded:prose", help="data spec of the evaluation text")


@torch.no_grad()
def window_nll(model: torch.nn.Module, batch: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL over a batch of windows, and how many tokens were predicted."""
    logits = model(input_ids=batch, use_cache=False).logits.float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
    return nll.item(), batch[:, 1:].numel()


def streamed_perplexity(model: MoEModel, ids: torch.Tensor, batch_size: int = 8) -> float:
    """Perplexity over ``ids [n, seqlen]`` of a model streamed from disk (``[model] offload``): the windows go
    through the decoder layers one layer at a time (:func:`moebench.sequential.forward_layers`), then the head."""
    from moebench.offload import logits as head
    from moebench.sequential import forward_layers

    total, count = 0.0, 0
    hidden = forward_layers(model, ids, batch_size)
    for start, h in zip(range(0, len(ids), batch_size), hidden):
        batch = ids[start : start + batch_size].to(h.device)
        out = head(model, h).float()
        total += F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def perplexity(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 8) -> float:
    """Perplexity of ``model`` over the windows ``ids [n, seqlen]``."""
    total, count = 0.0, 0
    with progress_bar("perplexity", len(ids)) as advance:
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size].to(next(model.parameters()).device)
            nll, n = window_nll(model, batch)
            total, count = total + nll, count + n
            advance(len(batch))
    return math.exp(total / count)


def _setting(entry: dict) -> str:
    """``embedded:prose test, seqlen 128``: the evaluation text and window a perplexity belongs to."""
    if not isinstance(entry, dict):
        return ""
    return f"{entry.get('data')} {entry.get('split', '')}, seqlen {entry.get('seqlen')}".replace("  ", " ")


class Perplexity(Metric):
    """Perplexity over fixed non-overlapping windows of an evaluation split."""

    name = "perplexity"
    Params = PerplexityParams
    streams = True
    columns = (
        Column("perplexity", label="ppl", order=10, delta=True, tolerance={"rel": 0.01}, setting=_setting, leaderboard=0),
        # the evaluation setting stored beside the value, not figures to compare
        Column("perplexity.seqlen", skip=True),
        Column("perplexity.windows", skip=True),
        Column("perplexity.tokens", skip=True),
    )

    def measure(self, model: MoEModel, params: PerplexityParams, ctx: Context) -> dict:
        ids = windows(encode(model.tokenizer, load_text(params.data, params.split)), params.seqlen, params.max_samples)
        if model.stream is not None:
            value = streamed_perplexity(model, ids, params.batch_size)
        else:
            value = perplexity(model.model, ids, params.batch_size)
        return {
            "perplexity": {
                "value": value,
                "data": params.data,
                "split": params.split,
                "seqlen": params.seqlen,
                "windows": len(ids),
                "tokens": ids.numel(),
            }
        }


def parameter_counts(model: MoEModel) -> dict[str, int]:
    """Total parameters, and those a token activates (routed experts counted top-k of E).

    MoE modules the adapter cannot see into (fusion blocks) report what a token leaves
    unused themselves, through an ``inactive_numel()`` method.
    """
    seen, total = set(), 0
    for p in model.model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    # quantized storage modules hold their weights as buffers; they say how many they encode
    total += sum(getattr(m, "stored_numel", 0) for m in model.model.modules())
    inactive = 0
    for block in model.blocks():
        per_expert = _expert_numel(block)
        inactive += per_expert * (block.num_experts - min(block.top_k, block.num_experts))
    inactive += sum(m.inactive_numel() for m in model.model.modules() if callable(getattr(m, "inactive_numel", None)))
    return {"total": total, "active": total - inactive}


def _expert_numel(block) -> int:
    """Weights of one routed expert, read from shapes: quantized storage is never dequantized to count it."""
    shapes = getattr(block.experts, "shapes", None) if getattr(block.experts, "quantized", False) else None
    if shapes:
        return sum(rows * cols for rows, cols in shapes.values())
    return (block.gate_up_proj.numel() + block.down_proj.numel()) // max(block.num_experts, 1)


def routed_experts(model: MoEModel) -> int:
    """Routed experts over all MoE layers, those in opaque (fusion) blocks included via their ``routed_experts``."""
    opaque = sum(m.routed_experts for m in model.model.modules() if isinstance(getattr(m, "routed_experts", None), int))
    return sum(model.expert_counts().values()) + opaque


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor in the state dict as stored (packed quantized tensors at their packed size)."""
    seen, total = set(), 0
    for tensor in model.state_dict(keep_vars=True).values():
        # a streamed model's layers are on meta (no storage): tied tensors are the same object there
        key = id(tensor) if tensor.is_meta else (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


class ModelSize(Metric):
    """Parameter counts (total, active per token) and weight bytes as stored; measured on every run."""

    name = "size"
    always = True
    streams = True  # shapes only: works on a streamed model's meta layers
    # sizes are deterministic: gated exactly
    columns = (
        Column("params.total", label="params", order=20, delta=True, tolerance={"rel": 0.0}, si=True),
        Column("params.active", label="active", order=21, delta=True, tolerance={"rel": 0.0}, si=True, leaderboard=2),
        Column("weight_bytes", label="weights", order=30, delta=True, tolerance={"rel": 0.0}, leaderboard=1, size=True),
        Column("experts", order=40, tolerance={"rel": 0.0}),
        Column("blocks", order=60, tolerance={"rel": 0.0}),
    )

    def measure(self, model: MoEModel, params, ctx: Context) -> dict:
        return {
            "params": parameter_counts(model),
            "weight_bytes": weight_bytes(model.model),
            "experts": routed_experts(model),
            "blocks": len(model.layers),
        }


@hookimpl
def register_metrics():
    return [Perplexity, ModelSize]


@hookimpl
def register_report_plots():
    from .plots import PLOTS

    return PLOTS
