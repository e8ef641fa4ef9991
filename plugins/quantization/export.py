"""Packed int4/int8 models saved in the compressed-tensors format (what llm-compressor writes; transformers and vLLM load it).

transformers 5 holds a MoE block's experts as fused 3-D parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``), while a compressed-tensors checkpoint stores them per expert under
the family's original names (e.g. ``mlp.experts.3.gate_proj.weight_packed``, ``weight_scale``,
``weight_shape``). transformers' loader dequantizes each expert while loading
(``integrations/compressed_tensors.py: CompressedTensorsDequantize``) and its conversion
mapping merges them into the fused parameters; quantized ``nn.Linear`` layers (attention,
shared experts, dense MLPs) are held compressed by compressed-tensors and decompressed on
the first forward pass. So this export writes:

* the model's state in its original checkpoint names (transformers' own
  ``revert_weight_conversion``), with every quantized matrix replaced by what
  ``PackedQuantizationCompressor.compress`` makes of its dequantized weight and scales
  (compressed-tensors packs; moebench does not re-implement the packing);
* ``quantization_config`` (``quant_method = "compressed-tensors"``, ``format =
  "pack-quantized"``): one config group for the routed experts (targets ``re:...experts...``,
  which is how transformers finds the experts' scheme) and one per other group size.

What the format cannot state keeps moebench's own layout (refused by plain loaders), and
:func:`blockers` says why: asymmetric groups (the per-expert dequantizer reads no zero
point; quantize with ``symmetric = true``), AWQ's per-input-channel scales (no field for
them), routed experts whose matrices use different group sizes (transformers applies one
scheme to all of a model's experts), groups that do not divide a row, and any other
moebench structure (per-layer expert counts, skipped blocks, other moebench modules).
Scales are written as float32 holding the float16 values moebench quantized with, so
``code * scale`` is exact and transformers reproduces moebench's weights bit for bit.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from moebench.adapter import MoEModel

FORMAT = "compressed-tensors"
EXPERTS_TARGET = r"re:.*\.experts\.\d+\.[^.]+$"


@dataclass
class Matrix:
    """One quantized matrix (stack) in memory: dequantized float32 weight and per-element scale."""

    key: str
    weight: torch.Tensor
    scale: torch.Tensor
    group: int
    experts: bool
    bits: int


def _matrices(model: MoEModel) -> tuple[list[Matrix], list[str]]:
    """The packed int4 matrices of ``model``, and why it cannot be written (empty when it can)."""
    from moebench_plugins.quantization import PackedInt4Experts, PackedInt4Linear, _from_half_bits
    from moebench_plugins.quantization.quant import expand_groups

    model.sync_config()
    struct = model.structure()
    why = [f"moebench structure {k} (no field in a transformers config)" for k in ("num_experts", "top_k", "router", "skip_moe")
           if struct[k]]
    found: list[Matrix] = []
    for path, spec in struct["modules"].items():
        module = model.model.get_submodule(path)
        if isinstance(module, PackedInt4Experts):
            attrs = [(f"{p}_proj", f"{p}_") for p in ("gate_up", "down")]
            shapes = {a: module.shapes[a] for a, _ in attrs}
            groups = module.group_sizes
        elif isinstance(module, PackedInt4Linear):
            attrs = [("weight", "")]
            shapes = {"weight": (module.out_features, module.in_features)}
            groups = {"weight": module.group_size}
        else:
            why.append(f"{path}: {spec.get('class')} has no compressed-tensors form")
            continue
        if module.input_scales:
            why.append(f"{path}: AWQ per-input-channel scales (compressed-tensors has no field for them)")
            continue
        for attr, prefix in attrs:
            zeros = getattr(module, f"{prefix}zeros")
            if not bool((zeros == 2 ** (module.bits - 1)).all()):
                why.append(f"{path}: asymmetric groups (zero points); quantize with symmetric = true")
                break
            rows, cols = shapes[attr]
            g = groups[attr]
            if cols % g:
                why.append(f"{path}.{attr}: group size {g} does not divide the {cols} input columns")
                break
            scale = expand_groups(_from_half_bits(getattr(module, f"{prefix}scales")), g, cols)
            if attr == "weight":
                weight = module.dequantize()
            else:
                weight = torch.stack([module.weight(attr, e) for e in range(module.num_experts)])
            found.append(Matrix(f"{path}.{attr}", weight.float(), scale.float(), g, attr != "weight", module.bits))
    expert_groups = {(m.bits, m.group if m.group < m.weight.shape[-1] else -1) for m in found if m.experts}
    if len(expert_groups) > 1:
        why.append("routed experts' matrices use different group sizes or bits (transformers applies one scheme to every expert)")
    return found, why


def blockers(model: MoEModel) -> list[str]:
    """Why ``model`` cannot be written in the compressed-tensors format (empty: it can)."""
    found, why = _matrices(model)
    return why if found else why + ["no packed int4/int8 module"]


def _args(bits: int, group: int, cols: int):
    from compressed_tensors.quantization import QuantizationArgs

    if group >= cols:
        return QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel")
    return QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group)


def save(model: MoEModel, folder) -> str | None:
    """Write ``model`` into ``folder`` in the compressed-tensors format; ``None`` (nothing written) when it cannot be."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from transformers.core_model_loading import revert_weight_conversion

    found, why = _matrices(model)
    if why or not found:
        return None
    hf = model.model
    state = {k: v for k, v in hf.state_dict().items()}
    for prefix in {m.key.rpartition(".")[0] + "." for m in found}:  # the packed buffers; a Linear's bias stays
        for k in [k for k in state if k.startswith(prefix) and not k.endswith(".bias")]:
            del state[k]
    state.update({m.key: m.weight for m in found})
    original = revert_weight_conversion(hf, state)
    scales = revert_weight_conversion(hf, {m.key: m.scale for m in found})
    expert_names = {k for k in revert_weight_conversion(hf, {m.key: m.scale for m in found if m.experts})}
    groups: dict[tuple, dict] = {}  # (experts?, strategy args) -> {"args", "targets"}
    experts_args = None
    for key, scale in scales.items():
        name = key.removesuffix(".weight")
        is_expert = key in expert_names
        if not key.endswith(".weight") or (is_expert and not re.fullmatch(EXPERTS_TARGET[3:], name)):
            return None  # a family whose original names this export does not know
        rows, cols = scale.shape
        m = next(m for m in found if m.weight.shape[-1] == cols and m.experts == is_expert)
        g = m.group
        grouped = scale.reshape(rows, cols // g, g)
        if not bool((grouped == grouped[..., :1]).all()):
            return None  # the original layout is not row-major with contiguous groups (e.g. transposed): not written
        args = _args(m.bits, g, cols)
        if is_expert:
            experts_args = experts_args or args
            if (args.num_bits, args.strategy, args.group_size) != (experts_args.num_bits, experts_args.strategy,
                                                                 experts_args.group_size):
                return None
        entry = groups.setdefault((is_expert, args.num_bits, args.strategy, args.group_size), {"args": args, "targets": []})
        scheme = QuantizationScheme(targets=[name], weights=args, format="pack-quantized")
        packed = PackedQuantizationCompressor.compress({"weight": original.pop(key), "weight_scale": grouped[..., 0].contiguous()},
                                                       scheme)
        for suffix, tensor in packed.items():
            original[f"{name}.{suffix}"] = tensor
        if not is_expert:
            entry["targets"].append(name)
    config_groups = {}
    for i, ((is_expert, *_), entry) in enumerate(sorted(groups.items(), key=lambda kv: not kv[0][0])):
        targets = [EXPERTS_TARGET] if is_expert else entry["targets"]
        config_groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=entry["args"], format="pack-quantized")
    qconfig = QuantizationConfig(config_groups=config_groups, format="pack-quantized", quantization_status="compressed")
    structure = hf.config.moebench
    hf.config.moebench = None
    try:
        hf.save_pretrained(folder, state_dict={k: v.contiguous() for k, v in original.items()}, save_original_format=False)
    finally:
        hf.config.moebench = structure
    import compressed_tensors

    file = Path(folder) / "config.json"
    raw = json.loads(file.read_text())
    raw.pop("moebench", None)
    raw["quantization_config"] = {"version": compressed_tensors.__version__, "quant_method": FORMAT, "sparsity_config": {},
                                  "transform_config": {}, **qconfig.model_dump(exclude=["quant_method"])}
    file.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return FORMAT


# -- bitsandbytes ---------------------------------------------------------------------------
BNB_FORMAT = "bitsandbytes"


def bnb_blockers(model: MoEModel) -> list[str]:
    """Why ``model`` cannot be written in transformers' bitsandbytes 4-bit serialization (empty: it can).

    transformers replaces ``nn.Linear`` layers by ``bnb.nn.Linear4bit`` and loads their NF4/FP4
    blocks; a MoE block's fused 3-D expert parameters are no Linear, and the bitsandbytes
    quantizer has no per-expert dequantizer (unlike compressed-tensors), so routed experts
    stored 4-bit (``targets`` with ``experts``, the default) have no bitsandbytes form.
    """
    from moebench_plugins.quantization import Bnb4bitExperts, Bnb4bitLinear

    model.sync_config()
    struct = model.structure()
    why = [f"moebench structure {k} (no field in a transformers config)" for k in ("num_experts", "top_k", "router", "skip_moe")
           if struct[k]]
    kinds = set()
    for path, spec in struct["modules"].items():
        module = model.model.get_submodule(path)
        if isinstance(module, Bnb4bitExperts):
            why.append(f"{path}: routed experts are fused 3-D parameters, which transformers' bitsandbytes loader "
                       "neither holds 4-bit nor dequantizes (only nn.Linear layers)")
        elif isinstance(module, Bnb4bitLinear):
            kinds.add((module.quant_type, module.blocksize, module.compute_dtype))
        else:
            why.append(f"{path}: {spec.get('class')} has no bitsandbytes form")
    if len(kinds) > 1:
        why.append("layers with different quant types or compute dtypes (one BitsAndBytesConfig per model)")
    if not kinds and not why:
        why.append("no bitsandbytes 4-bit Linear layer")
    return why


def save_bnb(model: MoEModel, folder) -> str | None:
    """Write ``model`` into ``folder`` as transformers writes a ``load_in_4bit`` model; ``None`` when it cannot be.

    Each stored Linear's blocks and ``QuantState`` are serialized by bitsandbytes itself
    (``QuantState.as_dict(packed=True)``, what ``Linear4bit`` saves); every other Linear is
    named in ``llm_int8_skip_modules`` so that transformers leaves it in full precision.
    """
    from bitsandbytes import functional as bnbf
    from transformers import BitsAndBytesConfig

    from moebench_plugins.quantization import Bnb4bitLinear

    if bnb_blockers(model):
        return None
    hf = model.model
    stored = {path: m for path, m in hf.named_modules() if isinstance(m, Bnb4bitLinear)}
    first = next(iter(stored.values()))
    state = {k: v for k, v in hf.state_dict().items()}
    for path, m in stored.items():
        for k in [k for k in state if k.startswith(path + ".") and not k.endswith(".bias")]:
            del state[k]
        qs = bnbf.QuantState(absmax=m.absmax.view(torch.float32), shape=torch.Size((m.out_features, m.in_features)),
                             code=bnbf.get_4bit_type(m.quant_type, device=m.data.device), blocksize=m.blocksize,
                             quant_type=m.quant_type, dtype=m.compute_dtype)
        state[f"{path}.weight"] = m.data.reshape(-1, 1)
        for key, value in qs.as_dict(packed=True).items():
            state[f"{path}.weight.{key}"] = value
    skip = ["lm_head"] + [path for path, m in hf.named_modules() if type(m) is torch.nn.Linear and path != "lm_head"]
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=first.quant_type,
                                    bnb_4bit_compute_dtype=first.compute_dtype, llm_int8_skip_modules=skip)
    structure = hf.config.moebench
    hf.config.moebench = None
    try:
        hf.save_pretrained(folder, state_dict=state)
    finally:
        hf.config.moebench = structure
    file = Path(folder) / "config.json"
    raw = json.loads(file.read_text())
    raw.pop("moebench", None)
    raw["quantization_config"] = bnb_config.to_dict()
    file.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return BNB_FORMAT
