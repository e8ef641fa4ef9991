"""Expert slimming by quantization: RTN, GPTQ, AWQ and bitsandbytes 4-bit storage (arXiv 2406.02500).

``rtn``, ``gptq`` and ``awq`` quantize the weight matrices of the module kinds in
``targets`` group-wise (asymmetric, float16 scales, see :mod:`moebench_plugins.quantization.quant`); a packed
expert is two matrices, ``gate_up [2I, H]`` and ``down [H, I]``, and GPTQ/AWQ solve
each expert on the tokens routed to it, layer-sequentially. With ``storage = "fake"``
the weights are dequantized back into the original dtype (the record says so and gives
the theoretical bytes); with ``storage = "int4"`` (or ``"int8"``) they are replaced by
:class:`PackedInt4Experts` / :class:`PackedInt4Linear`, which hold packed 4-bit (or plain
8-bit) codes and dequantize on the fly, so weight bytes are measured. ``bnb_4bit`` stores NF4/FP4
codes made by bitsandbytes (:class:`Bnb4bitExperts`, :class:`Bnb4bitLinear`).

AWQ folds each expert's down scale into its up rows; the gate/up scale (shared by a
block's experts by default, per matrix with ``objective = "matrix"``) stays inside the
quantized weights (``Q(W s) / s``, or an ``input_scale`` buffer when stored) instead of
being folded into the preceding norm, which the router reads too.

Every storage class rebuilds from its ``init`` (recorded by ``MoEModel.replace_module``)
and its buffers, so stored models save and reload through ``moebench.models.load_pretrained``.
Float metadata (scales, absmax) is kept as bit patterns in integer buffers so that
loading in another dtype never rounds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from moebench.adapter import MoEModel
from moebench.errors import MoebenchError
from moebench.hookspecs import hookimpl
from moebench.method import Context, Method
from moebench.models import DTYPES
from moebench.params import param
from moebench_plugins.quantization.quant import (
    BITS,
    Quantized,
    RoutedExperts,
    awq_block_scale,
    awq_clip,
    awq_scale,
    clip_groups,
    expand_groups,
    gptq,
    group_size_for,
    pack_int4,
    rtn,
    theoretical_bits,
    unpack_int4,
)
from moebench.sequential import Group, check_targets, static_steps

FAKE = "{method}: weights are fake-quantized (quantized, then dequantized back to {dtype}); bytes are theoretical"
NO_TOKENS = "{n} routed expert(s) received no calibration tokens; they were quantized round-to-nearest"
MATRICES = ("gate_up_proj", "down_proj")


def _dtype_name(dtype: torch.dtype) -> str:
    return next((k for k, v in DTYPES.items() if v == dtype), "float32")


def _half_bits(x: torch.Tensor) -> torch.Tensor:
    """float16 values kept as their int16 bit pattern (so ``model.to(dtype)`` leaves them alone)."""
    return x.to(torch.float16).view(torch.int16)


def _from_half_bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.float16).float()


# -- storage: routed experts ----------------------------------------------------------------
class QuantizedExperts(nn.Module):
    """Routed experts whose weights live in quantized buffers; each routed expert is dequantized on the fly.

    Keeps what the MoE block and the adapter read: ``num_experts``, ``act_fn``,
    ``forward(hidden_states, top_k_index, top_k_weights)`` and read-only
    ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` (dequantized on access).
    """

    quantized = True

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str, dtype: str = "float32"):
        super().__init__()
        from transformers.activations import ACT2FN

        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.act_fn = ACT2FN[hidden_act]
        self.compute_dtype = DTYPES[dtype]
        self.shapes = {"gate_up_proj": (2 * intermediate_size, hidden_size), "down_proj": (hidden_size, intermediate_size)}

    def weight(self, attr: str, e: int) -> torch.Tensor:
        """Expert ``e``'s ``attr`` matrix dequantized to float32."""
        raise NotImplementedError

    @property
    def stored_numel(self) -> int:
        """How many weights the buffers encode (counted as parameters by the size metric)."""
        return self.num_experts * sum(r * c for r, c in self.shapes.values())

    def _full(self, attr: str) -> torch.Tensor:
        return torch.stack([self.weight(attr, e) for e in range(self.num_experts)]).to(self.compute_dtype)

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return self._full("gate_up_proj")

    @property
    def down_proj(self) -> torch.Tensor:
        return self._full("down_proj")

    def __setattr__(self, name, value):
        if name in MATRICES:
            raise MoebenchError(
                f"experts are stored quantized ({type(self).__name__}); drop, merge or prune experts before quantizing them"
            )
        super().__setattr__(name, value)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            if not 0 <= e < self.num_experts:
                continue
            tok, pos = torch.where(top_k_index == e)
            x = hidden_states[tok]
            gate, up = F.linear(x, self.weight("gate_up_proj", e).to(x.dtype)).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.weight("down_proj", e).to(x.dtype))
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


class PackedInt4Experts(QuantizedExperts):
    """Experts as packed int4 codes (two per byte; ``bits = 8``: one code per byte), float16 group scales
    and zero points (one byte each).

    With ``input_scales`` (AWQ) each expert also keeps a float16 scale per input channel
    that divides the dequantized columns.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str,
                 group_size: int = 128, input_scales: bool = False, dtype: str = "float32", bits: int = 4):
        super().__init__(num_experts, hidden_size, intermediate_size, hidden_act, dtype)
        self.input_scales = input_scales
        self.bits = bits
        self.group_sizes = {}
        for attr, (rows, cols) in self.shapes.items():
            g = group_size_for(group_size, cols)
            self.group_sizes[attr] = g
            p = attr[: -len("_proj")]
            groups = math.ceil(cols / g)
            self.register_buffer(f"{p}_qweight", torch.zeros(num_experts, rows, _code_bytes(cols, bits), dtype=torch.uint8))
            self.register_buffer(f"{p}_scales", torch.zeros(num_experts, rows, groups, dtype=torch.int16))
            self.register_buffer(f"{p}_zeros", torch.zeros(num_experts, rows, groups, dtype=torch.uint8))
            if input_scales:
                self.register_buffer(f"{p}_input_scale", torch.zeros(num_experts, cols, dtype=torch.int16))

    def fill(self, attr: str, q: Quantized, input_scale: torch.Tensor | None = None) -> None:
        """Store ``q`` (codes ``[E, rows, cols]``) and, for AWQ, the input scales ``[E, cols]``."""
        p = attr[: -len("_proj")]
        if q.bits != self.bits or q.group_size != self.group_sizes[attr]:
            raise ValueError(f"{attr}: expected {self.bits}-bit codes with group size {self.group_sizes[attr]}")
        getattr(self, f"{p}_qweight").copy_(_pack(q.codes, self.bits))
        getattr(self, f"{p}_scales").copy_(_half_bits(q.scale))
        getattr(self, f"{p}_zeros").copy_(q.zero.to(torch.uint8))
        if self.input_scales:
            getattr(self, f"{p}_input_scale").copy_(_half_bits(input_scale))

    def weight(self, attr: str, e: int) -> torch.Tensor:
        p = attr[: -len("_proj")]
        cols = self.shapes[attr][1]
        g = self.group_sizes[attr]
        codes = _unpack(getattr(self, f"{p}_qweight")[e], cols, self.bits).float()
        scale = expand_groups(_from_half_bits(getattr(self, f"{p}_scales")[e]), g, cols)
        zero = expand_groups(getattr(self, f"{p}_zeros")[e].float(), g, cols)
        w = (codes - zero) * scale
        if self.input_scales:
            w = w / _from_half_bits(getattr(self, f"{p}_input_scale")[e])[None, :]
        return w


def _code_bytes(cols: int, bits: int) -> int:
    return (cols + 1) // 2 if bits == 4 else cols


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_int4(codes) if bits == 4 else codes.to(torch.uint8)


def _unpack(stored: torch.Tensor, cols: int, bits: int) -> torch.Tensor:
    return unpack_int4(stored, cols) if bits == 4 else stored


class Bnb4bitExperts(QuantizedExperts):
    """Experts as bitsandbytes 4-bit blocks (NF4 or FP4 codes, one float32 absmax per block), per expert."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str,
                 quant_type: str = "nf4", blocksize: int = 64, dtype: str = "float32"):
        super().__init__(num_experts, hidden_size, intermediate_size, hidden_act, dtype)
        self.quant_type, self.blocksize = quant_type, blocksize
        for attr, (rows, cols) in self.shapes.items():
            p = attr[: -len("_proj")]
            n = rows * cols
            self.register_buffer(f"{p}_data", torch.zeros(num_experts, (n + 1) // 2, dtype=torch.uint8))
            self.register_buffer(f"{p}_absmax", torch.zeros(num_experts, math.ceil(n / blocksize), dtype=torch.int32))

    def fill(self, attr: str, weights: torch.Tensor) -> None:
        """Quantize ``weights [E, rows, cols]`` with bitsandbytes, expert by expert."""
        p = attr[: -len("_proj")]
        for e in range(self.num_experts):
            data, absmax = _bnb_quantize(weights[e], self.quant_type, self.blocksize)
            getattr(self, f"{p}_data")[e].copy_(data)
            getattr(self, f"{p}_absmax")[e].copy_(absmax)

    def weight(self, attr: str, e: int) -> torch.Tensor:
        p = attr[: -len("_proj")]
        data, absmax = getattr(self, f"{p}_data")[e], getattr(self, f"{p}_absmax")[e]
        return _bnb_dequantize(data, absmax, self.shapes[attr], self.quant_type, self.blocksize)


def _bnb_quantize(w: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    from bitsandbytes import functional as bnbf

    data, state = bnbf.quantize_4bit(w.float().contiguous(), blocksize=blocksize, quant_type=quant_type)
    return data.reshape(-1), state.absmax.float().view(torch.int32)


def _bnb_dequantize(data, absmax, shape, quant_type: str, blocksize: int) -> torch.Tensor:
    from bitsandbytes import functional as bnbf

    state = bnbf.QuantState(
        absmax=absmax.view(torch.float32), shape=torch.Size(shape), code=bnbf.get_4bit_type(quant_type, device=data.device),
        blocksize=blocksize, quant_type=quant_type, dtype=torch.float32,
    )
    return bnbf.dequantize_4bit(data, state)


# -- storage: Linear layers ---------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """A Linear layer whose weight lives in quantized buffers; ``weight`` dequantizes on access."""

    quantized = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: str = "float32"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = DTYPES[dtype]
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.compute_dtype)) if bias else None

    @property
    def stored_numel(self) -> int:
        return self.in_features * self.out_features

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize().to(self.compute_dtype)

    def __setattr__(self, name, value):
        if name == "weight":
            raise MoebenchError(f"this Linear layer is stored quantized ({type(self).__name__}); its weight is read-only")
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class PackedInt4Linear(QuantizedLinear):
    """A Linear layer as packed int4 codes (``bits = 8``: one code per byte) with float16 group scales (and AWQ input scales)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 128,
                 input_scales: bool = False, dtype: str = "float32", bits: int = 4):
        super().__init__(in_features, out_features, bias, dtype)
        self.group_size = group_size_for(group_size, in_features)
        self.input_scales = input_scales
        self.bits = bits
        groups = math.ceil(in_features / self.group_size)
        self.register_buffer("qweight", torch.zeros(out_features, _code_bytes(in_features, bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.int16))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        if input_scales:
            self.register_buffer("input_scale", torch.zeros(in_features, dtype=torch.int16))

    def fill(self, q: Quantized, input_scale: torch.Tensor | None = None) -> None:
        if q.bits != self.bits or q.group_size != self.group_size:
            raise ValueError(f"expected {self.bits}-bit codes with group size {self.group_size}")
        self.qweight.copy_(_pack(q.codes, self.bits))
        self.scales.copy_(_half_bits(q.scale))
        self.zeros.copy_(q.zero.to(torch.uint8))
        if self.input_scales:
            self.input_scale.copy_(_half_bits(input_scale))

    def dequantize(self) -> torch.Tensor:
        cols = self.in_features
        codes = _unpack(self.qweight, cols, self.bits).float()
        w = (codes - expand_groups(self.zeros.float(), self.group_size, cols)) * expand_groups(
            _from_half_bits(self.scales), self.group_size, cols
        )
        return w / _from_half_bits(self.input_scale)[None, :] if self.input_scales else w


class Bnb4bitLinear(QuantizedLinear):
    """A Linear layer as bitsandbytes NF4/FP4 blocks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant_type: str = "nf4",
                 blocksize: int = 64, dtype: str = "float32"):
        super().__init__(in_features, out_features, bias, dtype)
        self.quant_type, self.blocksize = quant_type, blocksize
        n = in_features * out_features
        self.register_buffer("data", torch.zeros((n + 1) // 2, dtype=torch.uint8))
        self.register_buffer("absmax", torch.zeros(math.ceil(n / blocksize), dtype=torch.int32))

    def fill(self, w: torch.Tensor) -> None:
        data, absmax = _bnb_quantize(w, self.quant_type, self.blocksize)
        self.data.copy_(data)
        self.absmax.copy_(absmax)

    def dequantize(self) -> torch.Tensor:
        return _bnb_dequantize(self.data, self.absmax, (self.out_features, self.in_features), self.quant_type, self.blocksize)


def _spec(module: nn.Module, init: dict) -> dict:
    return {"class": f"{__name__}:{type(module).__name__}", "init": init}


def store_experts(model: MoEModel, path: str, cls: type, fill: dict, **init) -> nn.Module:
    """Replace the experts module at ``path`` by ``cls`` filled per matrix (``fill[attr]`` = args of ``fill``)."""
    old = model.model.get_submodule(path)
    full = dict(
        num_experts=old.gate_up_proj.shape[0],
        hidden_size=old.gate_up_proj.shape[2],
        intermediate_size=old.down_proj.shape[2],
        hidden_act=model.config.hidden_act,
        dtype=_dtype_name(old.gate_up_proj.dtype),
        **init,
    )
    new = cls(**full).to(old.gate_up_proj.device)
    for attr, args in fill.items():
        new.fill(attr, *args)
    model.replace_module(path, new, _spec(new, full))
    return new


def store_linear(model: MoEModel, path: str, cls: type, args: tuple, **init) -> nn.Module:
    old = model.model.get_submodule(path)
    full = dict(in_features=old.in_features, out_features=old.out_features, bias=old.bias is not None,
                dtype=_dtype_name(old.weight.dtype), **init)
    new = cls(**full).to(old.weight.device)
    if old.bias is not None:
        new.bias.data.copy_(old.bias.data)
    new.fill(*args)
    model.replace_module(path, new, _spec(new, full))
    return new


def stored_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for name, t in module.state_dict().items() if name != "bias")


# -- methods ------------------------------------------------------------------------------
@dataclass
class QuantParams:
    bits: int = param(4, help="bits per weight: 2, 3, 4 or 8")
    group_size: int = param(128, help="input columns sharing one scale and zero point (-1: one group per output row)")
    targets: list[str] = param(
        default_factory=lambda: ["experts"], help="module kinds quantized: experts, shared, attention, dense"
    )
    storage: Literal["fake", "int4", "int8"] = param(
        "fake",
        help="fake: dequantized back to the original dtype (theoretical bytes); "
        "int4: packed 4-bit codes dequantized on the fly (measured bytes; needs bits = 4); "
        "int8: one 8-bit code per byte, likewise (needs bits = 8)",
    )
    symmetric: bool = param(
        False,
        help="true: zero point fixed at 2**(bits-1), scale max|w| / ((2**bits-1)/2) (GPTQ's sym=True), which saved "
        "int4 models need to be written in the compressed-tensors format transformers and vLLM load; "
        "false: min-max scale and zero point per group (the papers' reference default)",
    )

    def check(self):
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size must be -1 (per row) or >= 1, got {self.group_size}")
        if self.storage in ("int4", "int8") and self.bits != int(self.storage[3:]):
            raise ValueError(f"storage '{self.storage}' needs bits = {self.storage[3:]}, got bits = {self.bits}")
        check_targets(self.targets)


@dataclass
class GPTQParams(QuantParams):
    act_order: bool = param(False, help="quantize columns by decreasing Hessian diagonal (group scales fixed up front)")
    damp: float = param(0.01, help="dampening added to the Hessian diagonal, as a fraction of its mean")
    block_size: int = param(128, help="columns per lazy-update block")
    router_weighted: bool = param(
        False, help="weight each routed token's input by its routing weight in the expert Hessians (false: plain X^T X, as AutoGPTQ/GPTQModel)"
    )
    true_sequential: bool = param(
        True, help="true: down_proj (and o_proj) Hessians come from the already-quantized gate/up (q/k/v), as the reference; "
        "false: every Hessian of a layer from its unquantized weights (moebench's earlier variant)"
    )
    group_scales: Literal["block_start", "updated"] = param(
        "block_start", help="block_start: a group's scale is fitted to its columns as they stood when their 128-column block "
        "began, as the reference code (IST-DASLab/gptq, GPTQModel); updated: after the error feedback of earlier columns "
        "in the block (moebench's earlier variant); differs only for groups narrower than block_size"
    )
    expert_chunk: int | None = param(
        None, help="gather and solve a layer's routed experts this many at a time, so only "
        "their Hessians are held (DeepSeek-V3: 52 GB for 256 experts at once); needs true_sequential; same codes"
    )

    def check(self):
        super().check()
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.expert_chunk is not None and (self.expert_chunk < 1 or not self.true_sequential):
            raise ValueError(f"expert_chunk must be a positive number of experts with true_sequential = true, got {self.expert_chunk}")


@dataclass
class AWQParams(QuantParams):
    grid: int = param(20, help="scale exponents tried in [0, 1) (and clip ratios per 1/grid)")
    clip: bool = param(True, help="also search a per-group weight clipping range")
    max_samples: int = param(4096, help="calibration input rows kept per matrix (and per experts block) for the searches")
    objective: Literal["block", "matrix"] = param(
        "block",
        help="block: routed experts' gate/up share one scale searched on the MoE block's output, down's scale is folded "
        "into up (llm-awq / AutoAWQ); matrix: every matrix searched on its own output (moebench's earlier variant)",
    )
    router_weighted: bool = param(
        False, help="weight each routed token's input by its routing weight in the per-matrix searches and clipping"
    )

    def check(self):
        super().check()
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")


class _Quantizer(Method):
    """Shared flow: quantize each targeted group, write it back (fake) or store it packed (int4), account bits per kind."""

    Params = QuantParams
    collect: tuple[str, ...] = ()
    streams = True  # one layer at a time (ctx.sequential / static_steps): runs with [model] offload

    def apply(self, model: MoEModel, params: QuantParams, ctx: Context) -> dict:
        if self.collect:
            run = ctx.sequential(model, self.name, targets=params.targets, collect=self.collect_for(params),
                               router_weighted=params.router_weighted, windows=self.calibration_windows(model, params, ctx),
                               **self.run_options(params))
            steps = run
        else:
            run, steps = None, static_steps(model, params.targets)
        tally = Tally()
        dtype = None
        extra: dict = {}
        for step in steps:
            packed: dict[str, dict] = {}
            self.prepare_step(step, params, extra)
            for group in step.sequential() if getattr(params, "true_sequential", False) else step.groups:
                dtype = group.weight.dtype
                q, in_scale = self.quantize(group, params, extra)
                tally.add(group, params, in_scale is not None)
                for c in group.chunks():  # dequantized a slice at a time: no float32 copy of the whole layer
                    w = q.select(c).dequantize()
                    group.weight[c] = (w if in_scale is None else w / in_scale[c, None, :]).to(dtype)
                if params.storage != "fake":
                    parts = packed.setdefault(group.path, {})
                    if group.attr in parts:  # the next slice of the same experts (expert_chunk): codes joined in expert order
                        first, q0, s0 = parts[group.attr]
                        group, q, in_scale = first, Quantized.cat([q0, q]), None if s0 is None else torch.cat([s0, in_scale])
                    parts[group.attr] = (group, q, in_scale)
            for path, parts in packed.items():
                tally.stored(self._store(model, path, parts, params), next(iter(parts.values()))[0].kind)
        changes = {"bits": params.bits, "group_size": params.group_size, "symmetric": params.symmetric, "storage": params.storage,
                   **tally.summary(params.storage)}
        changes.update(self.variant(params))
        if params.storage == "fake":
            ctx.note(FAKE.format(method=self.name, dtype=_dtype_name(dtype) if dtype is not None else "the model dtype"))
        if run is not None:
            changes["calibration"] = run.summary()
            if run.experts_without_tokens:
                ctx.note(NO_TOKENS.format(n=run.experts_without_tokens))
        changes.update(self.summarize(extra))
        return changes

    def run_options(self, params) -> dict:
        return {}

    def calibration_windows(self, model: MoEModel, params, ctx: Context) -> torch.Tensor | None:
        """The token windows the layer-sequential pass runs (None: the suite's calibration windows)."""
        return None

    def collect_for(self, params) -> tuple[str, ...]:
        """The statistics the calibration pass gathers for ``params``."""
        return self.collect

    def prepare_step(self, step, params, extra: dict) -> None:
        """Work a layer needs before its groups are quantized one by one (AWQ's block search)."""

    def variant(self, params) -> dict:
        """Which variant of the method ran, for the record."""
        return {}

    def summarize(self, extra: dict) -> dict:
        """What the method noted per matrix, condensed for the record."""
        return extra

    def quantize(self, group: Group, params, extra: dict) -> tuple[Quantized, torch.Tensor | None]:
        raise NotImplementedError

    @staticmethod
    def _store(model: MoEModel, path: str, parts: dict, params: QuantParams) -> nn.Module:
        """Replace the module at ``path`` by its packed int4 form (``parts``: attr -> (group, codes, input scales))."""
        group, q, scale = next(iter(parts.values()))
        init = {"group_size": params.group_size, "input_scales": scale is not None,
                **({"bits": params.bits} if params.bits != 4 else {})}
        if group.attr == "weight":
            return store_linear(model, path, PackedInt4Linear, (_first(q), None if scale is None else scale[0]), **init)
        return store_experts(model, path, PackedInt4Experts, {attr: (q, s) for attr, (_, q, s) in parts.items()}, **init)


def _stack(qs: list[Quantized]) -> Quantized:
    """Per-expert codes as one ``[E, rows, cols]`` stack."""
    return Quantized(torch.stack([q.codes for q in qs]), torch.stack([q.scale for q in qs]),
                     torch.stack([q.zero for q in qs]), qs[0].bits, qs[0].group_size)


def _first(q: Quantized) -> Quantized:
    return Quantized(q.codes[0], q.scale[0], q.zero[0], q.bits, q.group_size)


class RTN(_Quantizer):
    """Round-to-nearest group-wise quantization (data-free baseline)."""

    name = "rtn"

    def quantize(self, group, params, extra):
        return Quantized.cat([rtn(group.weight[c], params.bits, params.group_size, params.symmetric) for c in group.chunks()]), None


class GPTQ(_Quantizer):
    """GPTQ (arXiv 2210.17323; github.com/IST-DASLab/gptq, AutoGPTQ/GPTQModel): column-by-column quantization with
    inverse-Hessian error feedback, per expert on the tokens routed to it.

    Defaults follow the reference: unweighted Hessians ``X^T X`` and "true sequential"
    order (down_proj's Hessian from the outputs of the already-quantized gate/up, o_proj's
    from the quantized q/k/v). ``router_weighted`` and ``true_sequential = false`` keep
    moebench's earlier variant, and so does ``group_scales = "updated"``. Deviations: Hessians
    are sums, not AutoGPTQ's running ``2/n``-scaled mean (a positive factor, which the
    damping's relative form absorbs); codes are chosen against the float16-rounded scale
    that is stored (GPTQModel chooses them against float32, then stores float16). With
    that rounding off, the codes equal GPTQModel 7.6.0's (tests/test_peer_gptqmodel.py).
    """

    name = "gptq"
    Params = GPTQParams
    needs_calibration = True
    collect = ("hessian",)

    def quantize(self, group, params: GPTQParams, extra):
        parts = []
        for c in group.chunks():  # the solve's float32 copies (W, H, its inverse factor) for a slice of experts at a time
            h = group.stats.hessian[c]
            unseen = group.stats.tokens[c] == 0
            if unseen.any():  # identity Hessian: no error feedback, i.e. round-to-nearest
                h = h.clone()
                h[unseen] = torch.eye(h.shape[-1], device=h.device)
            parts.append(gptq(group.weight[c], h, params.bits, params.group_size, params.act_order, params.damp, params.block_size,
                              params.symmetric, group_weights=params.group_scales))
        return Quantized.cat(parts), None

    def run_options(self, params: GPTQParams) -> dict:
        return {"staged": params.true_sequential, **({"expert_chunk": params.expert_chunk} if params.expert_chunk else {})}

    def variant(self, params: GPTQParams) -> dict:
        order = ("true sequential: each Hessian from the already-quantized earlier stages (reference)" if params.true_sequential
                 else "parallel: every Hessian from the unquantized layer (moebench variant)")
        hessian = "routing-weighted (moebench variant)" if params.router_weighted else "unweighted X^T X (reference)"
        scales = ("group scales from the block-start weights (reference)" if params.group_scales == "block_start"
                  else "group scales after in-block error feedback (moebench variant)")
        return {"variant": {"order": order, "hessian": hessian, "group_scales": scales}}


class AWQ(_Quantizer):
    """AWQ (arXiv 2306.00978; github.com/mit-han-lab/llm-awq, casper-hansen/AutoAWQ): activation-aware
    per-input-channel scales searched on a grid, weight clipping, then group-wise quantization.

    ``objective = "block"`` (default) follows AutoAWQ's MoE models (Mixtral, DeepSeek-V2,
    Qwen-MoE): one scale for every routed expert's gate and up, searched on the output of
    the whole experts block (:func:`awq_block_scale`); each expert's down scale is searched
    on down's own output and folded into the up rows (``prev_op = up_proj``), so down needs
    no stored scale; clipping is searched per matrix and group on its own inputs.
    Deviations, one line each:

    * the gate/up scale is kept with the quantized weights (``Q(W s) / s``, a stored input
      scale) instead of being folded into ``post_attention_layernorm``: the router reads
      that norm too (AutoAWQ leaves the router to see the scaled input);
    * the objective is the routed experts' output (shared experts, attention and dense
      MLPs are searched per matrix on their own output, not with their neighbours);
    * the grid uses activation means only (llm-awq), not AutoAWQ's ``duo_scaling`` weight term;
    * inputs are capped at ``max_samples`` rows per block/matrix.

    ``objective = "matrix"`` is moebench's earlier variant: every matrix (each expert's
    gate_up and down) gets its own scale searched on its own output.
    """

    name = "awq"
    Params = AWQParams
    needs_calibration = True
    collect = ("abs", "samples")

    def run_options(self, params: AWQParams) -> dict:
        return {"max_samples": params.max_samples}

    def collect_for(self, params: AWQParams) -> tuple[str, ...]:
        return self.collect + (("calls",) if params.objective == "block" else ())

    def variant(self, params: AWQParams) -> dict:
        weighting = "; routing-weighted inputs (moebench variant)" if params.router_weighted else "; unweighted inputs (reference)"
        if params.objective == "block":
            return {"variant": "block: one gate/up scale per experts block on the block output, down scale folded into up (reference)" + weighting}
        return {"variant": "matrix: every matrix's scale on its own output (moebench variant)" + weighting}

    def quantize(self, group, params: AWQParams, extra):
        pending = extra.get("_pending", {})
        if group.name in pending:
            return pending.pop(group.name)
        return self._per_matrix(group, params, extra)

    def prepare_step(self, step, params: AWQParams, extra: dict) -> None:
        if params.objective != "block":
            return
        by_module: dict[int, dict[str, Group]] = {}
        for g in step.groups:
            if g.attr in MATRICES:
                by_module.setdefault(id(g.module), {})[g.attr] = g
        for pair in by_module.values():
            if set(pair) == set(MATRICES) and pair["gate_up_proj"].stats.calls:
                self._block(pair["gate_up_proj"], pair["down_proj"], params, extra)

    def _block(self, gu: Group, dn: Group, params: AWQParams, extra: dict) -> None:
        """AWQ on one experts block: the shared gate/up scale, per-expert down scales folded into up, clipping, codes."""
        experts_mod = gu.module
        x, index, weights = gu.stats.routed()
        block = RoutedExperts(experts_mod.gate_up_proj.data, experts_mod.down_proj.data, experts_mod.act_fn, x, index, weights)
        s1, alpha, ratio = awq_block_scale(block, x.abs().mean(0), params.bits, params.group_size, params.grid, params.symmetric)
        extra.setdefault("awq_alpha", {}).setdefault("experts", []).append(alpha)
        extra.setdefault("awq_error_vs_rtn", {}).setdefault("experts", []).append(ratio)
        E, rows, _ = gu.weight.shape
        inter = rows // 2
        parts: dict[str, list] = {"gate_up_proj": [], "down_proj": []}
        for e in range(E):
            wd = dn.weight[e].float()
            xd = dn.stats.sample(e)
            s2 = torch.ones(wd.shape[-1], device=wd.device)
            if xd.shape[0]:
                s2, a2, r2 = awq_scale(wd, xd, dn.stats.abs[e] / dn.stats.tokens[e], params.bits, params.group_size, params.grid,
                                       symmetric=params.symmetric)
                extra["awq_alpha"]["experts"].append(a2)
                extra["awq_error_vs_rtn"]["experts"].append(r2)
            wgu = gu.weight[e].float()
            wgu[inter:] /= s2[:, None]  # fold down's scale into the up rows: act(g) * (u / s2) feeds W_d * s2
            parts["gate_up_proj"].append(self._clipped(wgu * s1, gu.stats.sample(e) / s1, params))
            parts["down_proj"].append(self._clipped(wd * s2, xd / s2, params))
        pending = extra.setdefault("_pending", {})
        pending[gu.name] = (_stack(parts["gate_up_proj"]), s1.expand(E, -1))
        pending[dn.name] = (_stack(parts["down_proj"]), torch.ones(E, dn.weight.shape[-1], device=s1.device))

    @staticmethod
    def _clipped(scaled: torch.Tensor, x: torch.Tensor, params: AWQParams) -> Quantized:
        if params.clip and x.shape[0]:
            clip = awq_clip(scaled, x, params.bits, params.group_size, params.grid, symmetric=params.symmetric)
            scaled = clip_groups(scaled, clip, params.group_size)
        return rtn(scaled, params.bits, params.group_size, params.symmetric)

    def _per_matrix(self, group, params: AWQParams, extra):
        w = group.weight.float()
        stats = group.stats
        codes, scales, zeros, in_scales = [], [], [], []
        alphas = extra.setdefault("awq_alpha", {})
        ratios = extra.setdefault("awq_error_vs_rtn", {})
        for b in range(w.shape[0]):
            x = stats.sample(b)
            if x.shape[0] == 0:  # no routed tokens: round-to-nearest
                s = torch.ones(w.shape[-1], device=w.device)
                q = rtn(w[b], params.bits, params.group_size, params.symmetric)
            else:
                mean = stats.abs[b] / stats.tokens[b]
                s, alpha, ratio = awq_scale(w[b], x, mean, params.bits, params.group_size, params.grid, symmetric=params.symmetric)
                alphas.setdefault(group.kind, []).append(alpha)
                ratios.setdefault(group.kind, []).append(ratio)
                q = self._clipped(w[b] * s, x / s, params)
            codes.append(q.codes)
            scales.append(q.scale)
            zeros.append(q.zero)
            in_scales.append(s)
        q = Quantized(torch.stack(codes), torch.stack(scales), torch.stack(zeros), params.bits, q.group_size)
        return q, torch.stack(in_scales)

    def summarize(self, extra: dict) -> dict:
        """Per module kind: the mean chosen scale exponent, and the sample error against RTN (mean, worst)."""
        alphas, ratios = extra.get("awq_alpha", {}), extra.get("awq_error_vs_rtn", {})
        return {
            "awq_alpha_mean": {k: round(sum(v) / len(v), 4) for k, v in alphas.items()},
            "awq_error_vs_rtn": {k: {"mean": round(sum(v) / len(v), 4), "max": round(max(v), 4)} for k, v in ratios.items()},
        }


@dataclass
class Bnb4bitParams:
    quant_type: Literal["nf4", "fp4"] = param("nf4", help="bitsandbytes 4-bit code: nf4 (normal float) or fp4")
    blocksize: int = param(64, help="weights sharing one absmax (bitsandbytes: 64, 128, 256, ... 4096)")
    targets: list[str] = param(default_factory=lambda: ["experts"], help="module kinds stored: experts, shared, attention, dense")

    def check(self):
        if self.blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"blocksize must be a power of two in 64..4096, got {self.blocksize}")
        check_targets(self.targets)


class Bnb4bit(Method):
    """Store weights as bitsandbytes NF4/FP4 blocks; dequantized on the fly (bytes measured)."""

    name = "bnb_4bit"
    Params = Bnb4bitParams

    def apply(self, model: MoEModel, params: Bnb4bitParams, ctx: Context) -> dict:
        tally = Tally()
        init = {"quant_type": params.quant_type, "blocksize": params.blocksize}
        for step in static_steps(model, params.targets):
            experts: dict[str, dict] = {}
            for group in step.groups:
                tally.add(group, None, False)
                if group.attr == "weight":
                    tally.stored(store_linear(model, group.path, Bnb4bitLinear, (group.weight[0],), **init), group.kind)
                else:
                    experts.setdefault(group.path, {})[group.attr] = (group.weight,)
            for path, fill in experts.items():
                tally.stored(store_experts(model, path, Bnb4bitExperts, fill, **init), "experts")
        return {"quant_type": params.quant_type, "blocksize": params.blocksize, "storage": "bnb_4bit", **tally.summary("stored")}


class Tally:
    """Weights, original and quantized bytes per module kind, theoretical or measured."""

    def __init__(self):
        self.weights: dict[str, int] = {}
        self.original: dict[str, int] = {}
        self.theoretical_bits: dict[str, float] = {}
        self.measured: dict[str, int] = {}

    def add(self, group: Group, params, input_scales: bool) -> None:
        w = group.weight
        k = group.kind
        self.weights[k] = self.weights.get(k, 0) + w.numel()
        self.original[k] = self.original.get(k, 0) + w.numel() * w.element_size()
        if params is not None:
            bits = theoretical_bits(params.bits, params.group_size, w.shape[-1], params.symmetric) * w.numel()
            if input_scales:
                bits += 16 * w.shape[0] * w.shape[-1]
            self.theoretical_bits[k] = self.theoretical_bits.get(k, 0.0) + bits

    def stored(self, module: nn.Module, kind: str) -> None:
        self.measured[kind] = self.measured.get(kind, 0) + stored_bytes(module)

    def summary(self, storage: str) -> dict:
        out = {"weights": self.weights, "original_bytes": self.original}
        if self.theoretical_bits:
            out["theoretical_bytes"] = {k: math.ceil(v / 8) for k, v in self.theoretical_bits.items()}
        if storage == "fake":
            out["bits_per_weight"] = {k: round(v / self.weights[k], 4) for k, v in self.theoretical_bits.items()}
            out["bits_per_weight_basis"] = "theoretical"
        else:
            out["stored_bytes"] = self.measured
            out["bits_per_weight"] = {k: round(8 * v / self.weights[k], 4) for k, v in self.measured.items()}
            out["bits_per_weight_basis"] = "measured"
        return out


@hookimpl
def register_module_classes():
    """The stored-weight modules quantized models save (rebuilt from their init on reload)."""
    return [PackedInt4Experts, Bnb4bitExperts, PackedInt4Linear, Bnb4bitLinear]


@hookimpl
def register_methods():
    from .moequant import MoEQuant

    return [RTN, GPTQ, AWQ, Bnb4bit, MoEQuant]


@hookimpl
def save_standard_format(model, folder):
    """Packed int4 models with symmetric groups are written in the compressed-tensors format, bitsandbytes 4-bit
    Linear layers in transformers' bitsandbytes serialization (see :mod:`.export`)."""
    from .export import save, save_bnb

    return save(model, folder) or save_bnb(model, folder)
