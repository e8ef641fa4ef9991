"""``device = "auto"``: a model spread over GPUs, CPU memory and disk by accelerate's device map.

:func:`dispatch` places a model that is already built (every model moebench saved with its
own structure: per-layer expert counts, skipped blocks, fusion modules) the way
``from_pretrained(device_map="auto")`` places a plain checkpoint: whole decoder layers
(``_no_split_modules``) on the GPUs in order, then CPU memory, then an offload folder on
disk, within ``[hardware] max_memory``.

Compression edits weights in place, which accelerate's offloading cannot hold: an
offloaded module keeps its weights on the ``meta`` device and reloads them (read-only,
for a disk offload) on every call. Before a pipeline runs, :func:`materialize` therefore
loads each offloaded module's weights into CPU memory and makes it run there, on the
device that holds it; modules already on a GPU stay and are edited there. So edits and
layer-sequential work (each layer's statistics and solves on its own device) run where
the weights are; the cost is that the offloaded part must fit in CPU memory while a
compressed model is edited and evaluated. A baseline (no edits) keeps its disk offload.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from typing import Any

import torch

from . import paths

DEVICE_KEYS = ("cpu", "mps")


def parse_max_memory(table: dict[str, Any] | None) -> dict[int | str, int | str] | None:
    """``[hardware] max_memory`` for accelerate: GPU indices as ints ("0" -> 0), sizes as given.

    Keys: a GPU index or ``cpu``/``mps``; values: a size such as ``"20GiB"``/``"500MB"`` or
    a number of bytes. A ``ValueError`` starting with ``max_memory`` names what is wrong.
    """
    if table is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    out: dict[int | str, int | str] = {}
    for key, value in table.items():
        name = str(key)
        if not (name.isdigit() or name in DEVICE_KEYS):
            raise ValueError(f"max_memory key {name!r}: expected a GPU index (\"0\", \"1\"...) or one of {', '.join(DEVICE_KEYS)}")
        try:
            size = convert_file_size_to_int(value)
        except (ValueError, TypeError):
            size = -1
        if isinstance(value, bool) or size < 0:
            raise ValueError(f"max_memory {name} = {value!r}: expected a size such as \"20GiB\" or \"500MB\", or a number of bytes")
        out[int(name) if name.isdigit() else name] = value
    return out


def offload_folder() -> str:
    """A fresh folder under the cache for one model's disk offload (see :func:`owned_by`)."""
    return tempfile.mkdtemp(prefix="offload-", dir=paths.cache_dir("offload"))


def owned_by(model: torch.nn.Module, folder: str) -> None:
    """Remove the offload ``folder`` when ``model`` is freed (at once if nothing was offloaded to disk)."""
    if "disk" in (getattr(model, "hf_device_map", None) or {}).values():
        weakref.finalize(model, shutil.rmtree, folder, True)
    else:
        shutil.rmtree(folder, ignore_errors=True)


def dispatch(model: torch.nn.Module, max_memory: dict | None, dtype: torch.dtype) -> torch.nn.Module:
    """Spread a built model over the available devices (whole decoder layers), offloading the rest to disk."""
    from accelerate import dispatch_model, infer_auto_device_map

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(model, max_memory=parse_max_memory(max_memory), no_split_module_classes=no_split, dtype=dtype)
    folder = offload_folder()
    dispatch_model(model, device_map, offload_dir=folder)
    model.hf_device_map = device_map
    owned_by(model, folder)
    return model


def offloaded(model: torch.nn.Module) -> list[str]:
    """Names of the modules whose weights accelerate keeps off the device they run on (CPU or disk)."""
    return [name for name, module in model.named_modules() for hook in _align_hooks(module) if hook.offload]


def materialize(model: torch.nn.Module) -> list[str]:
    """Load every offloaded module's weights into CPU memory (writable copies) and run it there.

    Returns the names of the modules it changed (none for a model without offload).
    """
    from accelerate.utils import named_module_tensors, set_module_tensor_to_device

    moved = []
    for name, module in model.named_modules():
        for hook in _align_hooks(module):
            if not hook.offload:
                continue
            tensors = named_module_tensors(module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules, remove_non_persistent=True)
            for tensor_name, _ in list(tensors):
                value = hook.weights_map[tensor_name]
                set_module_tensor_to_device(module, tensor_name, "cpu", value=value.detach().to("cpu", copy=True))
            hook.offload = False
            hook.execution_device = torch.device("cpu")
            hook.weights_map = None
            moved.append(name)
    return moved


def _align_hooks(module: torch.nn.Module) -> list:
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]
