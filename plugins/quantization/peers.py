"""moebench's GPTQ beside GPTQModel's (optional extra ``peer-gptq``), for peer checks.

GPTQModel (ModelCloud/GPTQModel, https://github.com/ModelCloud/GPTQModel) is the maintained
successor of AutoGPTQ and keeps the reference GPTQ loop (IST-DASLab/gptq). Its ``GPTQ``
class quantizes one ``nn.Linear`` from the inputs it is fed; :func:`gptqmodel_gptq` feeds
it the same weight and calibration inputs moebench's :func:`~.quant.gptq` gets (as
``H = X^T X``), with the settings mapped one to one: ``bits``, ``group_size``, ``sym`` =
``symmetric``, ``desc_act`` = ``act_order`` with ``static_groups`` (moebench fixes
act-order group scales up front), ``damp_percent`` = ``damp``, block size 128, and
GPTQModel's own extensions off (``act_group_aware``). Used by
``tests/test_peer_gptqmodel.py`` and ``bench/peer_gptqmodel.py`` only.

GPTQModel 7.6.0 is the newest release that installs beside torch 2.13.0, but it pins
``numpy==2.2.6``: install the extra in its own environment (docs/benchmarks.md, "Peer checks").
"""

from __future__ import annotations

import contextlib
import io

import torch
from torch import nn

from moebench.errors import MoebenchError

from .quant import Quantized


def _gptq_class():
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its import prints a banner
            from gptqmodel.quantization.config import QuantizeConfig
            from gptqmodel.quantization.gptq import GPTQ
    except ImportError:
        raise MoebenchError(
            "gptqmodel is not installed: the GPTQ peer check needs the optional extra (pip install -e '.[peer-gptq]')"
        ) from None
    return GPTQ, QuantizeConfig


def gptqmodel_gptq(
    w: torch.Tensor,
    inputs: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
) -> Quantized:
    """GPTQModel's GPTQ of ``w [rows, cols]`` on calibration ``inputs [tokens, cols]``, as codes, scales and zeros.

    Codes are recovered from its dequantized weight and its own (float32) scales and zeros,
    per column through its ``g_idx``; they are returned in column order with per-group
    scale and zero ``[rows, groups]`` as :class:`~.quant.Quantized` holds them.
    """
    GPTQ, QuantizeConfig = _gptq_class()
    rows, cols = w.shape
    lin = nn.Linear(cols, rows, bias=False)
    lin.weight.data = w.detach().float().clone()
    config = QuantizeConfig(
        bits=bits, group_size=group_size, sym=symmetric, desc_act=act_order, static_groups=act_order,
        act_group_aware=False, damp_percent=damp, offload_to_disk=False,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        task = GPTQ(lin, config)
        task.quantizer.configure(perchannel=True)
        task.add_batch(inputs.detach().float(), None)
        scale, zero, g_idx, *_ = task.hf_quantize(
            blocksize=128, percdamp=damp, damp_auto_increment=0.0, group_size=group_size,
            actorder=act_order, static_groups=act_order, act_group_aware=False,
        )
    deq = lin.weight.data.float()
    scale, zero = scale.float().reshape(rows, -1), zero.float().reshape(rows, -1)
    idx = g_idx.long() if g_idx is not None else torch.zeros(cols, dtype=torch.long)
    codes = torch.round(deq / scale[:, idx]) + zero[:, idx]
    g = cols if group_size <= 0 or group_size >= cols else group_size
    return Quantized(codes.clamp(0, 2**bits - 1).to(torch.uint8), scale, zero, bits, g)


@torch.no_grad()
def expert_inputs(model, layer: int, expert: int, windows: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"gate" | "up" | "down": (weight, inputs)}`` of one routed expert, on every token entering the MoE block.

    Every calibration token (not only those routed to the expert) so that each Hessian is
    full rank and both libraries see exactly the same inputs.
    """
    block = model.block(layer)
    moe = model.adapter.moe_block(model.layers[layer])
    seen: list[torch.Tensor] = []
    hook = moe.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).float()))
    try:
        model.model(input_ids=windows)
    finally:
        hook.remove()
    x = torch.cat(seen)
    gate, up, down = (t.float() for t in block.expert(expert))
    hidden = block.experts.act_fn(x @ gate.T) * (x @ up.T)
    return {"gate": (gate, x), "up": (up, x), "down": (down, hidden)}
