"""Efficiency metrics: FLOPs per token, peak memory and checkpoint size, prefill/decode speed.

Every figure says how it was obtained (a ``how`` or ``kind`` field next to it):

- ``flops``: counted by torch's ``FlopCounterMode`` while the model runs one prefill
  (routing included: only the experts a token is sent to do work), per token; the
  analytic count from the architecture (2 x active matrix parameters + attention) is
  recorded beside it, and a disagreement is noted in the record.
- ``memory``: peak memory while the model prefills and greedily decodes a configured
  workload — CUDA peak allocated on a GPU (counter reset before the workload); on the
  CPU, the peak RSS of a new process that loads the saved checkpoint and runs the
  workload (this process's RSS carries the heap of earlier runs, and ``ru_maxrss``
  never goes down) — and the size of the safetensors checkpoint the model saves to.
- ``speed``: wall-clock prefill and decode (greedy, KV cache) tokens/s, median of
  repeats after warm-up, with the spread, and speedups against the suite's baseline
  measured earlier in the same process.

Weights that are exact zeros stored densely (masked sparsity) are noted: FLOPs, memory
and speed include them, since no kernel here skips them.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moebench.adapter import MoEModel
from moebench.columns import Column
from moebench.data import SPLITS, encode, load_text
from moebench.memory import status_kib
from moebench.errors import MoebenchError
from moebench.hookspecs import hookimpl
from moebench.method import Context, Metric
from moebench.params import param
from moebench import sequential
from moebench_plugins.metrics import parameter_counts

ZERO_NOTE_THRESHOLD = 0.05  # share of exact-zero matrix weights above which a run is told it is computing zeros


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def prompt_ids(model: MoEModel, data: str, split: str, batch: int, length: int) -> torch.Tensor:
    """``[batch, length]`` token ids: consecutive windows of real text (routing depends on the tokens)."""
    ids = encode(model.tokenizer, load_text(data, split))
    if ids.numel() < length:
        raise MoebenchError(f"data {data} ({split}) has {ids.numel()} tokens, fewer than one prompt of {length}")
    n = ids.numel() // length
    rows = ids[: n * length].view(n, length)
    if n < batch:
        rows = rows.repeat(math.ceil(batch / n), 1)
    return rows[:batch].to(model.device)


def note_dense_zeros(model: MoEModel, ctx: Context) -> float:
    """Share of exact zeros among floating-point matrix weights; noted when large (masked sparsity computes them)."""
    zeros = total = 0
    seen = set()
    for p in model.model.parameters():
        if id(p) in seen or p.ndim < 2 or not p.is_floating_point():
            continue
        seen.add(id(p))
        zeros += int((p.detach() == 0).sum())
        total += p.numel()
    share = zeros / total if total else 0.0
    if share > ZERO_NOTE_THRESHOLD:
        ctx.note(
            f"{share:.0%} of matrix weights are exact zeros stored densely: FLOPs, memory and speed "
            "count them (masked sparsity; no kernel here skips zeros)"
        )
    return share


# ----------------------------------------------------------------------------- FLOPs


def _grouped_mm_flops(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None = None, *args, out_val=None, **kwargs) -> int:
    """``_grouped_mm`` (transformers' packed-expert kernel): 2 x rows x K x N over the rows the groups cover."""
    used = int(offs[-1]) if offs is not None and offs.numel() else None
    if a.dim() == 2 and b.dim() == 3:  # [S, K] x [G, K, N], groups along S
        return 2 * (used if used is not None else a.shape[0]) * a.shape[1] * b.shape[2]
    if a.dim() == 3 and b.dim() == 2:  # [G, M, K] x [K, N_total], groups along N
        return 2 * a.shape[1] * a.shape[2] * (used if used is not None else b.shape[1])
    if a.dim() == 2 and b.dim() == 2:  # [M, K_total] x [K_total, N], groups along K
        return 2 * a.shape[0] * (used if used is not None else a.shape[1]) * b.shape[1]
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]  # batched [G, M, K] x [G, K, N]


def _sdpa_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, out_val=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query.shape, key.shape, value.shape)


_grouped_mm_flops._get_raw = True  # FlopCounterMode passes tensors (we need offs), not shapes
_sdpa_flops._get_raw = True


def flop_formulas() -> dict:
    """Formulas for ops torch's counter does not know but MoE models run (CPU attention, grouped expert GEMMs)."""
    aten = torch.ops.aten
    mapping = {}
    for name, fn in (("_grouped_mm", _grouped_mm_flops), ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_flops)):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = fn
    try:  # transformers' fallback when torch has no grouped GEMM
        mapping[torch.ops.transformers.grouped_mm_fallback] = _grouped_mm_flops
    except (AttributeError, RuntimeError):
        pass
    return mapping


@torch.no_grad()
def count_flops(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """FLOPs torch's ``FlopCounterMode`` counts for one forward over ``ids`` (matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=flop_formulas())
    with counter:
        model(input_ids=ids, use_cache=False)
    return counter.get_total_flops()


def attention_shape(config) -> tuple[int, int, int]:
    """``(heads, query/key head dim, value head dim)`` of the architecture's attention."""
    heads = config.num_attention_heads
    if getattr(config, "qk_nope_head_dim", None) is not None:  # DeepSeek multi-head latent attention
        return heads, config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, dim, dim


def analytic_flops_per_token(model: MoEModel, seqlen: int) -> float:
    """2 x active matrix parameters + attention, per token of a ``seqlen``-token prefill.

    Active parameters count top-k of each layer's routed experts. The input embedding
    is a lookup and vectors (norms, biases) are elementwise, so neither is a matmul.
    Attention is ``2 x heads x seqlen x (d_qk + d_v)`` per layer: every query against
    every key, as torch's counter counts it (the causal mask is not subtracted).
    """
    active = parameter_counts(model)["active"]
    seen, vectors = set(), 0
    for p in model.model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            vectors += p.numel() if p.ndim < 2 else 0
    embed = model.model.get_input_embeddings().weight
    head = model.model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is embed
    matrices = active - vectors - (0 if tied else embed.numel())
    heads, d_qk, d_v = attention_shape(model.config)
    attention = 2 * heads * seqlen * (d_qk + d_v) * len(model.layers)
    return float(2 * matrices + attention)


def skipped_flops_per_token(model: MoEModel, rules: dict) -> float:
    """Expert FLOPs per token that runtime routing rules skipped in the last forward (2 x expert params x skipped slots)."""
    skipped = 0.0
    for layer, rule in rules.items():
        realised = rule.realised_top_k()
        if realised is None:
            continue
        block = model.block(layer)
        per_expert = block.gate_up_proj[0].numel() + block.down_proj[0].numel()
        skipped += 2 * per_expert * (min(block.top_k, block.num_experts) - realised)
    return skipped


@dataclass
class FlopsParams:
    seqlen: int = param(128, help="prefill length in tokens the FLOPs are counted over")
    batch_size: int = param(1, help="sequences in the counted prefill")
    data: str = param("embedded:prose", help="data spec of the prompt text (routing depends on the tokens)")
    split: str = param("test", help="split the prompt comes from")

    def check(self):
        if self.seqlen < 1 or self.batch_size < 1:
            raise ValueError(f"seqlen and batch_size must be >= 1, got {self.seqlen} and {self.batch_size}")
        _check_split(self.split)


class Flops(Metric):
    """FLOPs per token of a prefill, counted with torch's FlopCounterMode (routing included)."""

    name = "flops"
    Params = FlopsParams
    columns = (
        Column("flops_per_token", label="FLOPs/tok", order=70, delta=True, tolerance={"rel": 0.001}, si=True),
        Column("flops.*", detail=True, si=True),
    )

    def measure(self, model: MoEModel, params: FlopsParams, ctx: Context) -> dict:
        ids = prompt_ids(model, params.data, params.split, params.batch_size, params.seqlen)
        rules = model.routing_rules()
        for rule in rules.values():
            rule.reset()
        measured = count_flops(model.model, ids) / ids.numel()
        analytic = analytic_flops_per_token(model, params.seqlen) - skipped_flops_per_token(model, rules)
        note_dense_zeros(model, ctx)
        if abs(measured - analytic) > 0.02 * analytic:
            ctx.note(
                f"flops: FlopCounterMode counted {measured:.4g}/token but the architecture implies {analytic:.4g}/token: "
                "some ops (e.g. custom quantized kernels) are not counted, or the model computes more than its active parameters"
            )
        extra = {"realised_top_k": {layer: rule.realised_top_k() for layer, rule in rules.items()}} if rules else {}
        return {
            "flops_per_token": measured,
            "flops": {
                **extra,
                "analytic_per_token": analytic,
                "how": f"measured: torch FlopCounterMode over one {params.batch_size}x{params.seqlen}-token prefill "
                "(matmuls and attention; elementwise ops not counted); analytic: 2 x active matrix params + attention "
                "(less the experts runtime routing skipped in that prefill, realised_top_k per layer)",
            },
        }


# ----------------------------------------------------------------------------- generation


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stamp(stamps: dict[str, float], stage: str, device: torch.device) -> None:
    """Note the clock under ``stage`` once the device has finished the work queued so far."""
    _sync(device)
    stamps[stage] = time.perf_counter()


class _Stamp:
    """A stopping criterion that never stops: it notes the clock when the first new token is chosen.

    ``generate`` calls its stopping criteria once per new token, after choosing it, so the
    first call ends the prefill (the prompt's forward pass and the first greedy choice).
    """

    def __init__(self, stamps: dict[str, float] | None, device: torch.device):
        self.stamps, self.device = stamps, device

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.stamps is not None and "prefilled" not in self.stamps:
            _stamp(self.stamps, "prefilled", self.device)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, stamps: dict[str, float] | None = None) -> torch.Tensor:
    """Greedy ``model.generate`` of exactly ``new_tokens`` tokens after ``ids`` (KV cache, no EOS stop); returns them ``[B, n]``.

    transformers' own loop: a prefill that computes only the last position's logits, then
    one cached step per token, with the cache handled as the model expects (no
    hand-written ``past_key_values`` passing, which transformers 5 deprecates).
    ``stamps``, when given, receives clock readings (device synchronised) at ``"start"``,
    ``"prefilled"`` (first new token chosen) and ``"done"``.
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    def mark(stage: str) -> None:
        if stamps is not None:
            _stamp(stamps, stage, ids.device)

    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=getattr(model.config, "pad_token_id", None) or 0,
    )
    mark("start")
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        generation_config=config,
        stopping_criteria=StoppingCriteriaList([_Stamp(stamps, ids.device)]),
    )
    mark("done")
    return out[:, ids.shape[1] :]


# ----------------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    hwm, rss = status_kib("VmHWM"), status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024  # reset took effect


def rss_bytes() -> int | None:
    kib = status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int:
    """The process's peak RSS: VmHWM where available, else ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    kib = status_kib("VmHWM")
    return kib * 1024 if kib is not None else sequential.peak_rss_bytes()  # ru_maxrss


def _devices(model: torch.nn.Module) -> list[torch.device]:
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)


def measure_peak(model: torch.nn.Module, ids: torch.Tensor, decode: int) -> dict[str, Any]:
    """Peak memory while ``model`` prefills ``ids`` and decodes ``decode`` tokens, in this process.

    ``peak`` is CUDA peak allocated on a GPU, else the process peak RSS; ``before`` is the
    reading just before the workload. Raises RuntimeError on a CPU where the peak-RSS
    mark cannot be reset (it would then hold the whole process's history).
    """
    gc.collect()
    cuda = _devices(model)
    if cuda:
        for d in cuda:
            torch.cuda.synchronize(d)
            torch.cuda.reset_peak_memory_stats(d)
        before = sum(torch.cuda.memory_allocated(d) for d in cuda)
        greedy_generate(model, ids, decode)
        peak = sum(torch.cuda.max_memory_allocated(d) for d in cuda)
        return {"peak": peak, "before": before, "kind": "cuda_peak_allocated"}
    if not reset_peak_rss():
        raise RuntimeError("the process peak-RSS mark cannot be reset here")
    before = rss_bytes()
    greedy_generate(model, ids, decode)
    return {"peak": peak_rss_bytes(), "before": before, "kind": "process_peak_rss"}


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of the safetensors weight files in a saved model folder."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def stored_formats(model: torch.nn.Module) -> str:
    """Bytes of the state dict per stored dtype, e.g. ``"float32 9.8 MiB, uint8 1.2 MiB"``."""
    by_dtype: dict[str, int] = {}
    seen = set()
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key in seen:
            continue
        seen.add(key)
        name = str(tensor.dtype).removeprefix("torch.")
        by_dtype[name] = by_dtype.get(name, 0) + tensor.numel() * tensor.element_size()
    return ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(by_dtype.items(), key=lambda kv: -kv[1]))


def fresh_process_peak(folder: Path, ids: torch.Tensor, decode: int, dtype: str, device: str) -> dict[str, Any]:
    """Load the checkpoint in ``folder`` in a new Python process, run the workload there, return its figures.

    The child reports its RSS after imports (``runtime``), before the workload
    (``before``) and its peak during the workload, so runs compare on equal footing.
    """
    torch.save(ids.cpu(), Path(folder) / "moebench-prompt.pt")
    spec = json.dumps({"folder": str(folder), "decode": decode, "dtype": dtype, "device": device})
    proc = subprocess.run([sys.executable, "-m", "moebench_plugins.metrics.efficiency", spec], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"fresh-process measurement failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fresh_process_main(spec: dict) -> dict:
    """Child side of :func:`fresh_process_peak`: load, reset the peak mark where possible, run, report."""
    from transformers import AutoModelForCausalLM

    from moebench.models import DTYPES, load_config, load_pretrained
    from moebench.plugins import host

    host()  # plugins and the model's class imported first, so ``runtime`` holds all the code
    AutoModelForCausalLM._model_mapping[type(load_config(spec["folder"]))]
    gc.collect()
    runtime = rss_bytes()
    model = load_pretrained(spec["folder"], dtype=DTYPES[spec["dtype"]], device=spec["device"])
    ids = torch.load(Path(spec["folder"]) / "moebench-prompt.pt", weights_only=True).to(spec["device"])
    try:
        out = measure_peak(model, ids, spec["decode"])
        out["kind"] = "fresh_" + out["kind"]
    except RuntimeError:  # no resettable mark: the peak includes loading the checkpoint
        before = rss_bytes()
        greedy_generate(model, ids, spec["decode"])
        out = {"peak": peak_rss_bytes(), "before": before, "kind": "fresh_process_peak_rss_including_load"}
    out["runtime"] = runtime
    return out


@dataclass
class MemoryParams:
    seqlen: int = param(256, help="prompt tokens of the measured workload")
    decode: int = param(16, help="tokens greedily decoded after the prompt (KV cache)")
    batch_size: int = param(1, help="sequences in the measured workload")
    data: str = param("embedded:prose", help="data spec of the prompt text")
    split: str = param("test", help="split the prompt comes from")
    checkpoint: bool = param(True, help="save the model to a temporary folder and record its size on disk (writes the whole model)")
    checkpoint_dir: str | None = param(None, help="where that temporary folder goes (default: the system's temp dir)")
    fresh_process: bool | None = param(
        None,
        help="measure in a new process that loads the saved checkpoint (default: on the CPU, where this "
        "process's RSS carries earlier runs; not on a GPU, where the peak counter resets exactly)",
    )

    def check(self):
        if min(self.seqlen, self.decode, self.batch_size) < 1:
            raise ValueError("seqlen, decode and batch_size must be >= 1")
        if self.checkpoint_dir is not None and not os.path.isdir(self.checkpoint_dir):
            raise ValueError(f"checkpoint_dir must be an existing folder, got {self.checkpoint_dir!r}")
        if self.fresh_process and not self.checkpoint:
            raise ValueError("fresh_process needs checkpoint = true (the new process loads the saved checkpoint)")
        _check_split(self.split)


KIND_HELP = {
    "cuda_peak_allocated": "CUDA peak allocated (weights, activations, KV cache) after a counter reset",
    "fresh_process_peak_rss": "peak RSS of a new process that loaded the checkpoint (mark reset after loading)",
    "fresh_process_peak_rss_including_load": "peak RSS of a new process, loading the checkpoint included",
    "fresh_cuda_peak_allocated": "CUDA peak allocated in a new process that loaded the checkpoint",
    "process_peak_rss": "peak RSS of this process during the workload (mark reset before it); includes the "
    "runtime and heap this process kept from earlier runs",
}


class Memory(Metric):
    """Peak memory of a prefill + decode workload (CUDA peak allocated / process peak RSS) and checkpoint size."""

    name = "memory"
    Params = MemoryParams
    columns = (
        Column("peak_memory_bytes", label="peak mem", order=80, process=True),
        Column("memory.*above_runtime*", detail=True),
        Column("memory.*increase_bytes*", detail=True),
        Column("memory.*", process=True),
    )

    def measure(self, model: MoEModel, params: MemoryParams, ctx: Context) -> dict:
        note_dense_zeros(model, ctx)
        info: dict[str, Any] = {"stored_formats": stored_formats(model.model)}
        ids = prompt_ids(model, params.data, params.split, params.batch_size, params.seqlen)
        fresh = params.fresh_process if params.fresh_process is not None else not _devices(model.model)
        peak = None
        with tempfile.TemporaryDirectory(prefix="moebench-ckpt-", dir=params.checkpoint_dir) as tmp:
            saved = False
            if params.checkpoint:
                try:
                    model.save(tmp)
                    info["checkpoint_bytes"] = checkpoint_bytes(Path(tmp))
                    saved = True
                except Exception as exc:  # the other figures still stand
                    ctx.note(f"memory: the model could not be saved to measure its checkpoint: {type(exc).__name__}: {exc}")
            if fresh and saved:
                dtype = str(next(model.model.parameters()).dtype).removeprefix("torch.")
                try:
                    peak = fresh_process_peak(Path(tmp), ids, params.decode, dtype, str(model.device))
                except RuntimeError as exc:
                    ctx.note(f"memory: measured in this process instead: {exc}")
        if peak is None:
            try:
                peak = measure_peak(model.model, ids, params.decode)
            except RuntimeError:
                raise MoebenchError("memory: the peak-RSS mark cannot be reset here and no fresh process could measure it") from None
        workload = f"{params.batch_size}x{params.seqlen}-token prefill + {params.decode} greedy decode steps"
        info.update(peak_kind=peak["kind"], increase_bytes=None if peak["before"] is None else peak["peak"] - peak["before"])
        if peak.get("runtime") is not None:
            info["above_runtime_bytes"] = peak["peak"] - peak["runtime"]
        info["how"] = (
            f"measured: {KIND_HELP.get(peak['kind'], peak['kind'])}, during a {workload}; increase_bytes: that peak "
            "minus the reading just before the workload; above_runtime_bytes: minus the new process's RSS before "
            "loading the model; checkpoint_bytes: the *.safetensors files MoEModel.save writes"
        )
        return {"peak_memory_bytes": peak["peak"], "memory": info}


# ----------------------------------------------------------------------------- speed


def _spread(values: list[float]) -> float:
    """(max - min) / median: the relative spread of repeated timings."""
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid else 0.0


def time_generation(model: torch.nn.Module, ids: torch.Tensor, decode: int, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Prefill and decode tokens/s of ``repeats`` timed runs after ``warmup`` untimed ones."""
    batch, length = ids.shape
    runs: dict[str, list[float]] = {"prefill_tok_s": [], "decode_tok_s": []}
    for i in range(warmup + repeats):
        stamps: dict[str, float] = {}
        greedy_generate(model, ids, decode + 1, stamps)
        if i >= warmup:
            runs["prefill_tok_s"].append(batch * length / (stamps["prefilled"] - stamps["start"]))
            runs["decode_tok_s"].append(batch * decode / (stamps["done"] - stamps["prefilled"]))
    return runs


@dataclass
class SpeedParams:
    prefill: int = param(128, help="prompt tokens per sequence")
    decode: int = param(32, help="tokens decoded per sequence (greedy, KV cache), timed after the prefill")
    batch_sizes: list[int] = param(default_factory=lambda: [1], help="batch sizes measured; the first is the headline")
    warmup: int = param(1, help="untimed runs before timing")
    repeats: int = param(3, help="timed runs; the median is reported")
    data: str = param("embedded:prose", help="data spec of the prompt text")
    split: str = param("test", help="split the prompt comes from")

    def check(self):
        if self.prefill < 1 or self.decode < 1:
            raise ValueError(f"prefill and decode must be >= 1, got {self.prefill} and {self.decode}")
        if not self.batch_sizes or min(self.batch_sizes) < 1 or len(set(self.batch_sizes)) < len(self.batch_sizes):
            raise ValueError(f"batch_sizes must be a non-empty list of distinct positive integers, got {self.batch_sizes}")
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"warmup must be >= 0 and repeats >= 1, got {self.warmup} and {self.repeats}")
        _check_split(self.split)


class Speed(Metric):
    """Prefill and decode tokens/s (median of repeats after warm-up) and speedups against the baseline run."""

    name = "speed"
    Params = SpeedParams
    relative = True  # speedups need the baseline measured in this process (ctx.baseline)
    columns = (
        Column("speed.prefill_tok_s", label="prefill tok/s", order=90, better="higher"),
        Column("speed.decode_tok_s", label="decode tok/s", order=91, better="higher"),
        Column("speed.speedup_prefill", label="prefill ×", order=92, better="higher"),
        Column("speed.speedup_decode", label="decode ×", order=93, better="higher", leaderboard=3),
        Column("speed.*_spread", hidden=True, better="higher"),
        Column("speed.runs.*", detail=True, better="higher"),
        Column("speed.by_batch.*", detail=True, better="higher"),
        Column("speed.*", better="higher", process=True),
    )

    def measure(self, model: MoEModel, params: SpeedParams, ctx: Context) -> dict:
        note_dense_zeros(model, ctx)
        sizes = "/".join(map(str, params.batch_sizes))
        setup = f"batch {sizes}, prefill {params.prefill}, decode {params.decode}, {params.repeats} repeats after {params.warmup} warm-up"
        base = (ctx.baseline or {}).get("speed")
        if base is not None and base.get("setup") != setup:
            ctx.note("speed: the baseline was measured with other settings; no speedup recorded")
            base = None
        # The baseline run itself (and its re-measurement on resume) has no baseline before it.
        itself = base is None and ctx.baseline is None and not model.lineage
        rows = {}
        for batch in params.batch_sizes:
            ids = prompt_ids(model, params.data, params.split, batch, params.prefill)
            runs = time_generation(model.model, ids, params.decode, params.warmup, params.repeats)
            ref = (base or {}) if batch == params.batch_sizes[0] else (base or {}).get("by_batch", {}).get(f"batch_{batch}", {})
            row: dict[str, Any] = {}
            for stage in ("prefill", "decode"):
                values = runs[f"{stage}_tok_s"]
                row[f"{stage}_tok_s"] = statistics.median(values)
                row[f"{stage}_spread"] = _spread(values)
                if ref.get(f"{stage}_tok_s"):
                    row[f"speedup_{stage}"] = row[f"{stage}_tok_s"] / ref[f"{stage}_tok_s"]
                elif itself:
                    row[f"speedup_{stage}"] = 1.0
            row["runs"] = runs
            rows[batch] = row
        first, *others = params.batch_sizes
        speed = dict(rows[first])
        speed.update(
            setup=setup,
            how="measured: wall clock (device synchronised), median of repeats; spread = (max - min) / median; "
            "prefill computes only the last position's logits, as generate does",
            speedup_against="the suite's baseline, measured earlier in this process" if base is not None
            else "itself (the baseline run)" if itself else None,
        )
        if others:
            speed["by_batch"] = {f"batch_{b}": rows[b] for b in others}
        return {"speed": speed}


@hookimpl
def register_metrics():
    return [Flops, Memory, Speed]



def plot_speedup(table):
    """Prefill and decode speedups per run against the baseline (a report plot)."""
    from moebench.render import Plot, ok_runs, bars_plot

    title, df = "Speedup per method", table.df
    cols = [c for c in ("speed.speedup_prefill", "speed.speedup_decode") if c in df and ok_runs(df)[c].notna().any()]
    if not cols:
        return Plot(title, None, "no speed measurements in these results (add an [eval.speed] table to the suite)")
    return bars_plot(df, cols, title, "× the baseline's tokens/s (higher is better)",
                     "tokens/s of each run divided by the baseline's, measured in the same process", reference=1.0)


@hookimpl
def register_report_plots():
    from moebench.render import ReportPlot

    return [ReportPlot("Speedup per method", plot_speedup, order=30)]


if __name__ == "__main__":  # the new process of a fresh-process memory measurement
    print(json.dumps(_fresh_process_main(json.loads(sys.argv[1]))))
