"""Reading large MoE checkpoints piecemeal: kept experts only, FP8 blocks dequantized, one layer at a time.

A model that does not fit in memory can still be compressed if it is never loaded
whole. :class:`Checkpoint` opens a folder of safetensors files memory-mapped and reads
tensors, or single experts' rows of them, on demand, counting the bytes it reads.
:func:`load` builds a model on the meta device, keeps only the experts asked for, and
fills it from the checkpoint, so its memory shrinks with the number of experts kept.
:class:`LayerStream` runs calibration text through a model one decoder layer at a
time: only one layer's weights are resident, the rest stay on the meta device.

Both checkpoint layouts transformers 5 reads are understood: the packed in-memory
layout (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``) that
moebench writes for restructured models, and the original per-expert layout of real
DeepSeek / Qwen / OLMoE (``experts.{e}.gate_proj.weight``...) and Mixtral
(``block_sparse_moe.experts.{e}.w1.weight``...) checkpoints.

DeepSeek-V3/R1 release their weights in FP8: every linear weight of the decoder layers
(attention, dense MLP, shared and routed experts; not the router, norms, embeddings or
head) is stored as ``float8_e4m3fn`` with a ``weight_scale_inv`` of one float32 per
128×128 block, and ``weight ≈ fp8 * weight_scale_inv`` blockwise. Those are
dequantized here in plain PyTorch, so they load on the CPU and on GPUs without FP8
kernels. :func:`write_fp8` writes a checkpoint in that format (for tests, and to
shrink a checkpoint on disk).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import MoEModel
from .forward import StopForward, forward_windows
from .errors import MoebenchError

FP8_BLOCK = 128
#: largest finite float8_e4m3fn value
E4M3_MAX = 448.0
SCALE_SUFFIXES = ("_scale_inv",)  # ``x.weight`` -> ``x.weight_scale_inv``; ``x.gate_up_proj`` -> ``x.gate_up_proj_scale_inv``
#: checkpoint-name renames to the in-memory names (Mixtral's original layout)
RENAMES = ((".block_sparse_moe.", ".mlp."),)
#: original per-expert projection names: (gate, up, down)
EXPERT_PROJ = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


# --------------------------------------------------------------------------- FP8 blocks


def quantize_fp8(weight: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8 [.., R, C], scale_inv [.., ceil(R/b), ceil(C/b)])`` with ``weight ≈ fp8 * scale_inv`` per block.

    DeepSeek-V3's block quantization: each ``block × block`` tile is scaled so its largest
    magnitude maps to the e4m3 maximum (448); partial tiles at the edges are allowed.
    """
    *lead, rows, cols = weight.shape
    r, c = -(-rows // block), -(-cols // block)
    padded = F.pad(weight.detach().float(), (0, c * block - cols, 0, r * block - rows))
    tiles = padded.reshape(*lead, r, block, c, block)
    scale = tiles.abs().amax(dim=(-3, -1)).clamp_min(1e-12) / E4M3_MAX
    q = (tiles / scale[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(*lead, r * block, c * block)[..., :rows, :cols].contiguous(), scale


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK, dtype=torch.float32) -> torch.Tensor:
    """Blockwise ``q * scale_inv`` in float32, then ``dtype``, in plain PyTorch (no FP8 kernels needed)."""
    *lead, rows, cols = q.shape
    r, c = -(-rows // block), -(-cols // block)
    if tuple(scale_inv.shape) != (*lead, r, c):
        raise MoebenchError(
            f"FP8 scale of shape {tuple(scale_inv.shape)} does not fit a weight of shape {tuple(q.shape)} "
            f"in {block}x{block} blocks (expected {(*lead, r, c)})"
        )
    x = q.float()
    if r * block != rows or c * block != cols:
        x = F.pad(x, (0, c * block - cols, 0, r * block - rows))
    x = x.view(*lead, r, block, c, block).mul_(scale_inv.float()[..., :, None, :, None])
    return x.view(*lead, r * block, c * block)[..., :rows, :cols].to(dtype).contiguous()


def fp8_targets(name: str, tensor: torch.Tensor) -> bool:
    """Whether DeepSeek-V3's FP8 release stores this tensor in FP8: 2-D linear weights inside decoder layers, router excepted."""
    return (
        tensor.ndim == 2
        and name.endswith(".weight")
        and ".layers." in name
        and not name.endswith((".gate.weight", "norm.weight"))
        and tensor.is_floating_point()
    )


def write_fp8(source, dest, block: int = FP8_BLOCK) -> Path:
    """Write the checkpoint folder ``source`` to ``dest`` in DeepSeek-V3's FP8 block format.

    Weights are written in the original per-expert layout with ``weight_scale_inv``
    companions, and ``quantization_config`` says ``fp8`` / ``e4m3`` / ``[block, block]``,
    as in the DeepSeek-V3 release. Other files (tokenizer, generation config) are copied.
    """
    import shutil

    from safetensors.torch import save_file

    source, dest = Path(source), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint(source)
    state: dict[str, torch.Tensor] = {}
    for name in ckpt.names():
        tensor = ckpt.read(name)
        if fp8_targets(name, tensor):
            state[name], state[f"{name}_scale_inv"] = quantize_fp8(tensor, block)
        else:
            state[name] = tensor
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [block, block],
    }
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for file in source.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and file.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(file, dest / file.name)
    return dest


def fp8_block(config) -> int | None:
    """The FP8 block size a config's ``quantization_config`` declares, or None when it is not FP8 blocks."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, Mapping) else qc.to_dict()
    if qc.get("quant_method") != "fp8":
        raise MoebenchError(
            f"checkpoint is quantized with {qc.get('quant_method')!r}; moebench.checkpoint reads unquantized "
            "or FP8 block (DeepSeek-V3 format) checkpoints"
        )
    size = qc.get("weight_block_size") or [FP8_BLOCK, FP8_BLOCK]
    if len(size) != 2 or size[0] != size[1]:
        raise MoebenchError(f"FP8 weight_block_size {size}: expected a square block like [128, 128]")
    return int(size[0])


# --------------------------------------------------------------------------- reading


class Checkpoint:
    """A safetensors checkpoint folder, memory-mapped; tensors (or rows of them) read on demand.

    ``bytes_read`` counts the bytes of every tensor or slice materialised from the
    files (FP8 weights at one byte per value, their scales included). What
    :meth:`load` returns owns its memory, and the maps are closed after every
    ``release_every`` bytes, so pages of the files do not pile up in this process.
    """

    release_every = 64 * 2**20

    def __init__(self, path, block: int = FP8_BLOCK):
        from safetensors import SafetensorError

        self.path = Path(path)
        self.block = block
        self.bytes_read = 0
        self._since_release = 0
        index = self.path / "model.safetensors.index.json"
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise MoebenchError(f"{self.path}: no *.safetensors files (expected a checkpoint folder)")
        self._files: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        try:
            if index.exists():
                weight_map = json.loads(index.read_text())["weight_map"]
                self._files = {name: self.path / file for name, file in weight_map.items()}
            else:
                for file in files:
                    for name in self._open(file).keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                        self._files[name] = file
        except (SafetensorError, OSError, ValueError, KeyError) as exc:  # a truncated or foreign file: say which
            raise MoebenchError(f"{self.path}: cannot read the safetensors checkpoint ({exc})") from None
        self.release()
        # in-memory name -> checkpoint name (renames undone)
        self._by_canonical = {_canonical(n): n for n in self._files}

    def _open(self, file: Path):
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def release(self) -> None:
        """Close the memory maps (their pages stop counting as this process's memory); reopened on demand."""
        self._handles.clear()
        self._since_release = 0

    def names(self) -> list[str]:
        """Tensor names as stored (scales included)."""
        return sorted(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    @property
    def fp8(self) -> bool:
        return any(n.endswith(SCALE_SUFFIXES) for n in self._files)

    def read(self, name: str, rows: Sequence[int] | None = None) -> torch.Tensor:
        """The stored tensor ``name`` (or its ``rows`` along dim 0, read run by run), as stored.

        A whole tensor may be a view of the file's memory map; :meth:`load` copies.
        """
        if name not in self._files:
            raise MoebenchError(f"{self.path}: checkpoint has no tensor {name!r}")
        handle = self._open(self._files[name])
        rows = self._rows(name, rows)
        if rows is None:
            tensor = handle.get_tensor(name)
        else:
            piece = handle.get_slice(name)
            tensor = torch.cat([piece[a:b] for a, b in _runs(rows)]) if len(rows) else torch.empty(0)
        n = tensor.numel() * tensor.element_size()
        self.bytes_read += n
        self._since_release += n
        return tensor

    def _rows(self, name: str, rows: Sequence[int] | None) -> Sequence[int] | None:
        """``rows``, or None when they are every row in order: the whole tensor is then read once, without
        the copy that joining row runs makes (a streamed layer's experts: 15 GB for DeepSeek-V3's gate_up)."""
        if rows is not None and len(rows) and name in self._files:
            if list(rows) == list(range(self._shape(name)[0])):
                return None
        return rows

    def load(self, name: str, rows: Sequence[int] | None = None, dtype=torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` as ``dtype`` in memory of its own (or written into ``out``); FP8 weights dequantized."""
        rows = self._rows(name, rows)
        tensor = self.read(name, rows)
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_name = f"{name}_scale_inv"
            if scale_name not in self._files:
                raise MoebenchError(f"{self.path}: FP8 tensor {name!r} has no {scale_name!r}")
            result = dequantize_fp8(tensor, self.read(scale_name, rows), self.block, dtype)
        elif out is not None:
            result = tensor
        elif tensor.is_floating_point() and tensor.dtype != dtype:
            result = tensor.to(dtype)
        elif rows is not None:
            result = tensor  # rows are read into memory of their own already: no second copy
        else:
            result = tensor.clone()  # not a view of the map, so the map can close
        if out is not None:
            out.copy_(result)
            result = out
        del tensor
        if self._since_release >= self.release_every:
            self.release()
        return result

    def stored_name(self, model_name: str) -> str | None:
        """The checkpoint name holding the in-memory tensor ``model_name`` (renames undone), if any."""
        return self._by_canonical.get(model_name)

    # -- experts --------------------------------------------------------------------
    def experts(self, path: str, keep: Sequence[int] | None, num_experts: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed ``(gate_up [k, 2I, H], down [k, H, I])`` of experts ``keep`` of the experts module at ``path``.

        Reads only those experts, from either layout.
        """
        keep = list(range(num_experts)) if keep is None else list(keep)
        packed = self.stored_name(f"{path}.gate_up_proj")
        if packed is not None:
            down = self.stored_name(f"{path}.down_proj")
            return self.load(packed, keep, dtype), self.load(down, keep, dtype)
        for gate_name, up_name, down_name in EXPERT_PROJ:
            if self.stored_name(f"{path}.0.{gate_name}.weight") is None:
                continue
            gate_up = down = None
            for j, e in enumerate(keep):
                names = [self.stored_name(f"{path}.{e}.{p}.weight") for p in (gate_name, up_name, down_name)]
                if None in names:
                    raise MoebenchError(f"{self.path}: expert {e} of {path} is missing from the checkpoint")
                if gate_up is None:  # filled in place, expert by expert
                    inter, hidden = self._shape(names[0])
                    gate_up = torch.empty(len(keep), 2 * inter, hidden, dtype=dtype)
                    down = torch.empty(len(keep), hidden, inter, dtype=dtype)
                self.load(names[0], dtype=dtype, out=gate_up[j, :inter])
                self.load(names[1], dtype=dtype, out=gate_up[j, inter:])
                self.load(names[2], dtype=dtype, out=down[j])
            return gate_up, down
        raise MoebenchError(f"{self.path}: no routed experts for {path} (neither packed gate_up_proj nor per-expert weights)")

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._files[name]).get_slice(name).get_shape())


def _canonical(name: str) -> str:
    for old, new in RENAMES:
        name = name.replace(old, new)
    return name


def _runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs ``[(start, stop)]`` of ``rows`` in the given order (so slicing keeps that order)."""
    runs: list[list[int]] = []
    for r in rows:
        if runs and r == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([r, r + 1])
    return [(a, b) for a, b in runs]


# --------------------------------------------------------------------------- loading


@dataclass
class LoadReport:
    """What a piecemeal load read: bytes from the files, and how many routed experts it kept."""

    bytes_read: int = 0
    experts_kept: int = 0
    experts_total: int = 0
    fp8: bool = False
    notes: list[str] = field(default_factory=list)


def skeleton(path, *, dtype: torch.dtype = torch.float32, config=None) -> tuple[MoEModel, Any]:
    """The model of checkpoint ``path`` built on the meta device (no memory), with its adapter and config."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from .models import apply_structure, load_config
    from .plugins import host

    config = config or load_config(path)
    fp8_block(config)  # refuse other quantization formats up front
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantized on read; the model itself is plain
    adapter = host().adapter_for(config)
    with torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        structure = getattr(config, "moebench", None)
        if structure:
            apply_structure(model, structure)
    return MoEModel(model.eval(), adapter, source=str(path)), config


def load(
    path,
    *,
    keep: Mapping[int, Sequence[int]] | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
) -> tuple[MoEModel, LoadReport]:
    """Load checkpoint ``path`` reading only experts ``keep[layer]`` of each listed MoE layer.

    Layers not in ``keep`` are read whole. FP8 block checkpoints are dequantized to
    ``dtype`` on read. The kept experts are renumbered ``0..k-1`` in the given order,
    exactly as :meth:`MoEModel.keep_experts` would after a full load (the lineage says
    so too, so calibration caches agree).
    """
    from .models import DTYPES, fingerprint, reproducible_experts

    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    config = _config(path)
    ckpt = Checkpoint(path, block=fp8_block(config) or FP8_BLOCK)
    moe, config = skeleton(path, dtype=dtype, config=config)
    report = LoadReport(fp8=ckpt.fp8, experts_total=sum(moe.expert_counts().values()))
    keep = {int(k): list(v) for k, v in (keep or {}).items()}
    unknown = set(keep) - set(moe.moe_layers)
    if unknown:
        raise MoebenchError(f"{path}: keep names layers {sorted(unknown)} without a MoE block; MoE layers are {moe.moe_layers}")
    full_counts = moe.expert_counts()
    for layer, kept in keep.items():
        report.notes += [f"layer {layer}: {n}" for n in moe.keep_experts(layer, kept)]
    state = read_state(ckpt, moe, keep, full_counts, dtype=dtype, device=device)
    _assign(moe, state, where=str(path))
    left = [n for n, t in [*moe.model.named_parameters(), *moe.model.named_buffers()] if t.is_meta]
    if left:
        raise MoebenchError(f"{path}: checkpoint has nothing for {left[:3]}")
    moe.model.to(device)
    reproducible_experts(moe.model, device)
    report.bytes_read = ckpt.bytes_read
    report.experts_kept = sum(moe.expert_counts().values())
    moe.identity = f"{path}@{fingerprint(path)}"
    moe.tokenizer = _tokenizer(path)
    return moe, report


def read_state(
    ckpt: Checkpoint,
    moe: MoEModel,
    keep: Mapping[int, Sequence[int]],
    full_counts: Mapping[int, int],
    *,
    prefix: str = "",
    skip: Iterable[str] = (),
    experts: bool = True,
    dtype=torch.float32,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """The in-memory state dict entries under ``prefix`` (minus ``skip`` prefixes), read from ``ckpt``.

    Routed experts and their router rows are read only for the kept experts;
    ``experts=False`` leaves the routed experts out altogether.
    """
    names = {id(m): n for n, m in moe.model.named_modules()}
    special: dict[str, tuple] = {}  # model key -> how to read it
    for block in moe.blocks():
        rows = keep.get(block.layer)
        epath = names[id(block.experts)]
        special[f"{epath}.gate_up_proj"] = ("experts", epath, rows, full_counts[block.layer], 0)
        special[f"{epath}.down_proj"] = ("experts", epath, rows, full_counts[block.layer], 1)
        if rows is not None:
            rpath = names[id(block.router)]
            for buf in ("weight", *moe.adapter.expert_buffers):
                special[f"{rpath}.{buf}"] = ("rows", rows)
    skip = tuple(skip)
    state: dict[str, torch.Tensor] = {}
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    tied = set(getattr(moe.model, "_tied_weights_keys", None) or [])
    for key in moe.model.state_dict(keep_vars=True):
        if not key.startswith(prefix) or (skip and key.startswith(skip)):
            continue
        how = special.get(key)
        if how is not None and how[0] == "experts":
            if not experts:
                continue
            _, epath, rows, count, which = how
            if epath not in cache:
                cache[epath] = ckpt.experts(epath, rows, count, dtype)
            state[key] = cache[epath][which].to(device)
            continue
        stored = ckpt.stored_name(key)
        if stored is None:
            if key in tied or _is_tied(key, moe):
                continue
            raise MoebenchError(f"{ckpt.path}: checkpoint has no tensor for {key!r}")
        rows = how[1] if how is not None else None
        state[key] = ckpt.load(stored, rows, dtype).to(device)
    return state


def _is_tied(key: str, moe: MoEModel) -> bool:
    return key == "lm_head.weight" and bool(getattr(moe.config, "tie_word_embeddings", False))


def _assign(moe: MoEModel, state: dict[str, torch.Tensor], where: str, root: nn.Module | None = None, skip: Sequence[nn.Module] = ()) -> None:
    """Put ``state`` into the (meta) model, then rebuild the computed buffers under ``root`` (minus ``skip``)."""
    _, unexpected = moe.model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise MoebenchError(f"{where}: unexpected tensors {unexpected[:3]}")
    if getattr(moe.config, "tie_word_embeddings", False):
        moe.model.tie_weights()
    _init_buffers(moe.model, root if root is not None else moe.model, skip)


def _init_buffers(model: nn.Module, root: nn.Module, skip: Sequence[nn.Module] = ()) -> None:
    """Computed (non-persistent) buffers left on meta, e.g. rotary ``inv_freq``: rebuilt as transformers does."""
    skipped = {id(m) for s in skip for m in s.modules()}
    for module in root.modules():
        if id(module) in skipped:
            continue
        meta = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not meta:
            continue
        for n in meta:
            module._buffers[n] = torch.empty_like(module._buffers[n], device="cpu")
        model._init_weights(module)


def _config(path):
    from .models import load_config

    return load_config(path)


def _tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, config=_config(path))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- streaming


class LayerStream:
    """A checkpoint's model with its decoder layers on the meta device, run one layer at a time.

    Everything outside the decoder layers (embeddings, final norm, head, rotary tables)
    is loaded; a layer's weights are read when its turn comes and dropped after it has
    processed every window. ``max_resident`` records how many layers were ever resident
    at once (1). Statistics attach to the skeleton's modules exactly as on a full model.
    """

    def __init__(self, path, *, keep: Mapping[int, Sequence[int]] | None = None, dtype: str | torch.dtype = "float32", device: str = "cpu",
                 head: bool = False, identity: str | None = None):
        from .models import DTYPES, fingerprint

        self.path = Path(path)
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.device = device
        config = _config(path)
        self.ckpt = Checkpoint(path, block=fp8_block(config) or FP8_BLOCK)
        self.model, config = skeleton(path, dtype=self.dtype, config=config)
        from .models import reproducible_experts

        reproducible_experts(self.model.model, device)
        self.full_counts = self.model.expert_counts()
        self.keep = {int(k): list(v) for k, v in (keep or {}).items()}
        for layer, kept in self.keep.items():
            self.model.keep_experts(layer, kept)
        self.model.identity = identity or f"{path}@{fingerprint(path)}"
        self.model.tokenizer = _tokenizer(path)
        self.layers = self.model.layers
        names = {id(m): n for n, m in self.model.model.named_modules()}
        self._layer_prefix = [names[id(layer)] + "." for layer in self.layers]
        skip = list(self._layer_prefix)
        if not head:  # the output side (final norm, head) is not run by :meth:`run`: left on meta, never read
            outputs = [m for m in (self.model.model.get_output_embeddings(), getattr(self.model.model.model, "norm", None)) if m is not None]
            skip += [names[id(m)] + "." for m in outputs]
        state = read_state(self.ckpt, self.model, self.keep, self.full_counts, skip=skip, dtype=self.dtype, device=device)
        _assign(self.model, state, str(path), skip=list(self.layers))
        self.resident: set[int] = set()
        self.max_resident = 0

    def reopen(self, path) -> None:
        """Read the decoder layers from checkpoint ``path`` from now on (a model the skeleton's structure
        already describes, e.g. one a streamed compression step wrote); what is resident stays."""
        config = _config(path)
        self.path = Path(path)
        self.ckpt = Checkpoint(path, block=fp8_block(config) or FP8_BLOCK)
        self.keep = {}
        self.full_counts = self.model.expert_counts()

    def layer_prefix(self, i: int) -> str:
        """State-dict prefix of decoder layer ``i`` (``model.layers.3.``)."""
        return self._layer_prefix[i]

    def load_layer(self, i: int, experts: bool = True) -> None:
        """Read decoder layer ``i`` (without its routed experts when ``experts`` is false)."""
        state = read_state(
            self.ckpt, self.model, self.keep, self.full_counts, prefix=self._layer_prefix[i], experts=experts, dtype=self.dtype, device=self.device
        )
        _assign(self.model, state, str(self.path), root=self.layers[i])
        self.resident.add(i)
        self.max_resident = max(self.max_resident, len(self.resident))

    def router_weight(self, block) -> torch.Tensor:
        """A MoE block's router weight read from the checkpoint (kept rows only), without loading its layer."""
        name = {id(m): n for n, m in self.model.model.named_modules()}[id(block.router)] + ".weight"
        stored = self.ckpt.stored_name(name)
        if stored is None:
            raise MoebenchError(f"{self.path}: checkpoint has no tensor for {name!r}")
        return self.ckpt.load(stored, self.keep.get(block.layer), self.dtype)

    def free_layer(self, i: int) -> None:
        self.layers[i].to("meta")
        self.resident.discard(i)

    @torch.no_grad()
    def run(self, windows: torch.Tensor, batch_size: int = 8, *, stop_at_router: int | None = None) -> torch.Tensor:
        """Pass ``windows [n, seqlen]`` through every decoder layer, layer by layer; returns the last hidden states.

        With ``stop_at_router=L`` the pass ends once layer ``L``'s router has run: layers
        before it are read whole, layer ``L`` without its routed experts (enough for a
        routing pattern, e.g. PreMoe's retrieval key).
        """
        hidden, kwargs = self._inputs(windows, batch_size)
        last = len(self.layers) - 1 if stop_at_router is None else stop_at_router
        for i in range(last + 1):
            partial = i == stop_at_router
            self.load_layer(i, experts=not partial)
            handle = None
            if partial:
                block = self.model.block(i)
                if block is None:
                    raise MoebenchError(f"layer {i} has no MoE router; MoE layers are {self.model.moe_layers}")

                def stop(module, args, output):
                    raise StopForward

                handle = block.router.register_forward_hook(stop)
            try:
                for b, (h, kw) in enumerate(zip(hidden, kwargs)):
                    try:
                        out = self.layers[i](h, **kw)
                    except StopForward:
                        continue
                    hidden[b] = out[0] if isinstance(out, (tuple, list)) else out
            finally:
                if handle is not None:
                    handle.remove()
                self.free_layer(i)
        return torch.cat(hidden)

    def _inputs(self, windows: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], list[dict]]:
        """Each batch's hidden states and keyword arguments as they enter the first decoder layer."""
        hidden, kwargs = [], []

        def catch(module, args, kw):
            hidden.append(args[0] if args else kw.pop("hidden_states"))
            kwargs.append(dict(kw))
            raise StopForward

        handle = self.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for _ in forward_windows(self.model.model, windows, batch_size, self.device):
                pass
        finally:
            handle.remove()
        return hidden, kwargs

    def statistics(self, names: Sequence[str], windows: torch.Tensor, batch_size: int = 8, seed: int = 0) -> dict[str, Any]:
        """Calibration statistics gathered layer by layer (those that look at one layer at a time)."""
        from .calibration import check_streamable
        from .plugins import host

        check_streamable(names)
        collectors = [host().statistic(n)(self.model, seed=seed) for n in names]
        handles = [h for c in collectors for h in c.attach()]
        try:
            self.run(windows, batch_size)
        finally:
            for h in handles:
                h.remove()
        return {c.name: c.result() for c in collectors}

