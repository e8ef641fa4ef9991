"""Distillation healing: the original model teaches the compressed one on calibration text.

Any method can call :func:`heal` after its edit with the parameters it wants trained
(LoRA terms, projections, merged experts); everything else stays frozen. The loss is
the logit KL divergence (teacher to student, with a temperature), the per-layer output
MSE (each decoder layer's output against the teacher's, relative to its size), or both.
The loss curve, the loss before and after on a fixed batch, and the wall time go into
the method's record.

The teacher is the *original* model: ``ctx.teacher`` when a caller put one
there, else a fresh load of ``model.source`` with the suite's dtype and device. Loading
after the edit (rather than copying before it) means the two copies alive together are
the original and the already smaller student, never two originals; the teacher is
released when healing ends.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from moebench.params import param

if TYPE_CHECKING:
    from moebench.adapter import MoEModel
    from moebench.method import Context


@dataclass
class HealParams:
    """Distillation healing settings (a method's ``heal = {...}`` table)."""

    steps: int = param(0, help="optimizer steps (0: no healing)")
    lr: float | None = param(None, help="AdamW learning rate (default: 1e-3 when only adapters or a LoRA train, 1e-4 when merged experts do)")
    loss: Literal["kl", "mse", "kl+mse"] = param("kl", help="kl: logit KL to the teacher; mse: per-layer output MSE; kl+mse: their sum")
    temperature: float = param(1.0, help="softmax temperature of the KL loss")
    batch_size: int = param(4, help="windows per step")
    data: str | None = param(None, help="training text (default: the suite's calibration data)")
    samples: int | None = param(None, help="windows drawn from data (default: the calibration samples)")
    seqlen: int | None = param(None, help="tokens per window (default: the calibration seqlen)")
    train: Literal["auto", "adapters", "experts", "all", "lora"] = param(
        "auto",
        help="auto: the method's new adapters, else its merged experts; adapters; experts (merged experts and "
        "router rows); all: both; lora: a peft LoRA on the merged experts, merged back after training",
    )
    lora_rank: int = param(8, help="rank of the peft LoRA when train = 'lora'")
    seed: int = param(0, help="seed for window order")

    def check(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("samples", "seqlen"):
            value = getattr(self, name)
            if value is not None and value < (2 if name == "seqlen" else 1):
                raise ValueError(f"{name} must be >= {2 if name == 'seqlen' else 1}, got {value}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")


def enabled(spec: HealParams | None) -> bool:
    return spec is not None and spec.steps > 0


#: default learning rates: fresh adapters (B = 0) take large steps, trained expert weights small ones
DEFAULT_LR = {"adapters": 1e-3, "lora": 1e-3, "experts": 1e-4, "all": 1e-4}


def resolved(spec: HealParams, trains: str) -> HealParams:
    """``spec`` with its learning rate filled in for what is trained (``adapters``, ``lora``, ``experts`` or ``all``)."""
    return spec if spec.lr is not None else replace(spec, lr=DEFAULT_LR[trains])


def teacher_for(model: MoEModel, ctx: Context) -> tuple[torch.nn.Module, str]:
    """The original model and where it came from (``context``: ``ctx.teacher``, or ``source``)."""
    if ctx.teacher is not None:
        from moebench.adapter import MoEModel

        teacher = ctx.teacher  # a MoEModel or the causal LM itself
        return (teacher.model if isinstance(teacher, MoEModel) else teacher), "context"
    if not model.source:
        raise RuntimeError("healing needs the original model: load the model from a source, or set ctx.teacher")
    from moebench.models import load

    suite_model = ctx.suite.model if ctx.suite is not None else None
    dtype = suite_model.dtype if suite_model is not None else _dtype_name(model)
    device = suite_model.device if suite_model is not None else str(model.device)
    trust = suite_model.trust_remote_code if suite_model is not None else False
    threads = ctx.suite.hardware.threads if ctx.suite is not None else None
    return load(model.source, dtype=dtype, device=device, trust_remote_code=trust, threads=threads).model, "source"


def windows_for(model: MoEModel, spec: HealParams, ctx: Context) -> torch.Tensor:
    """Training windows: the heal data if named, else the suite's calibration windows."""
    from moebench.data import calibration_windows

    cal = ctx.calibration.spec if ctx.calibration is not None else None
    seqlen = spec.seqlen or (cal.seqlen if cal else 128)
    samples = spec.samples or (cal.samples if cal else 16)
    if spec.data is None and cal is not None and seqlen == cal.seqlen and samples == cal.samples:
        return ctx.calibration.windows(model.tokenizer)
    data = spec.data or (cal.data if cal else None)
    if data is None:
        raise RuntimeError("healing needs training text: set heal.data or add a [calibration] table")
    return calibration_windows(data, model.tokenizer, seqlen, samples, spec.seed)


def heal(
    model: MoEModel,
    parameters: Iterable[torch.nn.Parameter],
    spec: HealParams,
    ctx: Context,
    teacher: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Train ``parameters`` of ``model`` to match the teacher; returns what goes in the record.

    The record holds ``loss_curve`` (one value per step), ``loss_before``/``loss_after``
    (the same fixed batch, no gradient), ``trained_parameters`` (element count),
    ``teacher`` (where it came from) and ``seconds``.
    """
    t0 = time.perf_counter()
    spec = resolved(spec, "all")
    params = _unique(parameters)
    if not params:
        raise ValueError("healing has no parameters to train")
    own_teacher = teacher is None
    origin = "given"
    if own_teacher:
        teacher, origin = teacher_for(model, ctx)
    teacher.eval()
    student = model.model
    data = windows_for(model, spec, ctx)
    device = model.device
    generator = torch.Generator().manual_seed(spec.seed)
    fixed = data[: spec.batch_size].to(device)

    flags = {id(p): p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    was_training = student.training
    student.eval()  # no dropout or router jitter: the loss is deterministic
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    curve: list[float] = []
    try:
        before = _loss(student, teacher, fixed, spec, grad=False)
        order = torch.randperm(len(data), generator=generator)
        cursor = 0
        for _ in range(spec.steps):
            if cursor + spec.batch_size > len(order):
                order, cursor = torch.randperm(len(data), generator=generator), 0
            batch = data[order[cursor : cursor + spec.batch_size]].to(device)
            cursor += spec.batch_size
            loss = _loss(student, teacher, batch, spec, grad=True)
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"healing diverged (loss {loss.item()}); lower heal.lr (now {spec.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            curve.append(_sig(loss.item()))
        after = _loss(student, teacher, fixed, spec, grad=False)
    finally:
        for p in student.parameters():
            p.requires_grad_(flags.get(id(p), True))
            p.grad = None
        student.train(was_training)
        if own_teacher:
            del teacher
            gc.collect()
    model.record_edit(f"heal({digest(spec, params)})")  # healed weights must not share calibration caches
    return {
        "steps": spec.steps,
        "train": spec.train,
        "loss": spec.loss,
        "lr": spec.lr,
        "loss_before": _sig(before),
        "loss_after": _sig(after),
        "loss_curve": curve,
        "trained_parameters": sum(p.numel() for p in params),
        "teacher": origin,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def distillation_loss(student: torch.nn.Module, teacher: torch.nn.Module, batch: torch.Tensor, spec: HealParams) -> float:
    """The loss :func:`heal` optimises, on one batch, without gradient (for checks and tests)."""
    return _loss(student, teacher, batch, spec, grad=False)


def _loss(student, teacher, batch: torch.Tensor, spec: HealParams, grad: bool):
    want_hidden = "mse" in spec.loss
    with torch.no_grad():
        t_out = teacher(input_ids=batch, use_cache=False, output_hidden_states=want_hidden)
    with torch.set_grad_enabled(grad):
        s_out = student(input_ids=batch, use_cache=False, output_hidden_states=want_hidden)
        total = 0.0
        if "kl" in spec.loss:
            total = total + kl_loss(s_out.logits, t_out.logits, spec.temperature)
        if want_hidden:
            total = total + layer_mse(s_out.hidden_states, t_out.hidden_states)
    return total if grad else float(total)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T² · KL(teacher ‖ student)`` of the next-token distributions, averaged over tokens."""
    t = temperature
    s = F.log_softmax(student_logits.float().reshape(-1, student_logits.shape[-1]) / t, dim=-1)
    p = F.log_softmax(teacher_logits.float().reshape(-1, teacher_logits.shape[-1]) / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


def layer_mse(student_hidden, teacher_hidden) -> torch.Tensor:
    """Mean over decoder layers of ``‖s - t‖² / ‖t‖²`` on each layer's output (the embeddings are skipped).

    Layer counts that differ (blocks dropped earlier in a pipeline) compare the last outputs only.
    """
    pairs = list(zip(student_hidden[1:], teacher_hidden[1:])) if len(student_hidden) == len(teacher_hidden) else [(student_hidden[-1], teacher_hidden[-1])]
    losses = [((s.float() - t.float()) ** 2).sum() / (t.float() ** 2).sum().clamp_min(1e-12) for s, t in pairs]
    return torch.stack(losses).mean()


def lora_heal(model: MoEModel, spec: HealParams, ctx: Context, targets: list[str]) -> dict[str, Any]:
    """Heal through a peft LoRA on packed expert parameters (``targets``: parameter names such as
    ``model.layers.1.mlp.experts.gate_up_proj``), then merge it back so the architecture stays standard."""
    from peft import LoraConfig, get_peft_model

    spec = resolved(spec, "lora")
    flags = {name: p.requires_grad for name, p in model.model.named_parameters()}
    config = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_rank, target_modules=[], target_parameters=targets, lora_dropout=0.0)
    wrapped = get_peft_model(model.model, config)  # injects the LoRA into model.model in place
    trainable = [p for n, p in wrapped.named_parameters() if "lora_" in n]
    try:
        result = heal(model, trainable, spec, ctx)
    finally:
        model.model = wrapped.merge_and_unload()
        for name, p in model.model.named_parameters():
            p.requires_grad_(flags.get(name, True))
    result["lora_rank"] = spec.lora_rank
    result["lora_merged"] = True
    return result


def _sig(x: float) -> float:
    """Six significant digits: small distillation losses must not round to zero in the record."""
    return float(f"{x:.6g}")


def _unique(parameters: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for p in parameters:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def digest(spec: HealParams, params: list[torch.nn.Parameter]) -> str:
    blob = json.dumps({"spec": asdict(spec), "shapes": [list(p.shape) for p in params]}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _dtype_name(model: MoEModel) -> str:
    dtype = next(model.model.parameters()).dtype
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
