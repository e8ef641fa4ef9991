"""Loading models: zoo names, local folders and hub ids, with dtype and device placement.

``load(source)`` returns a :class:`MoEModel` (the model with its architecture adapter).
``load_pretrained(path)`` reloads a model moebench saved, including structures plain
transformers cannot rebuild from its config (expert counts that differ per layer,
skipped MoE blocks, moebench module classes). Such a folder's ``config.json`` carries a
model type no transformers release knows (:func:`refuse_plain_loaders`), so a plain
``AutoModelForCausalLM.from_pretrained`` stops with an error naming this loader instead
of silently re-initialising the weights it cannot place; :func:`load_config` reads it.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from .adapter import MoEModel, PassThrough, install_routing
from .errors import MoebenchError
from .plugins import host

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(source: str, threads: int | None = None, dtype: str = "bfloat16") -> str:
    """A model source as a local folder or hub id; ``zoo:NAME`` builds (or finds) the zoo checkpoint.

    ``threads``: the suite's ``[hardware] threads``, which a zoo build trains on too.
    ``twin:NAME?layers=N`` writes (or finds) a shape twin stored in ``dtype`` (see :mod:`moebench.twin`).
    """
    if source.startswith("zoo:"):
        from . import zoo

        name, options = zoo.parse_source(source[4:])
        return str(zoo.path(name, threads=threads, **options))
    if source.startswith("twin:"):
        from . import twin

        name, options = twin.parse_source(source[5:])
        return str(twin.build(name, dtype=dtype, **options))
    return source


def load(
    source: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    max_memory: dict | None = None,
    threads: int | None = None,
) -> MoEModel:
    """Load a causal LM from a zoo name, local folder or hub id, and attach its adapter.

    ``threads`` (a suite's ``[hardware] threads``) is what a zoo build, if one is needed, trains on.
    """
    if dtype not in DTYPES:
        raise MoebenchError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    path = resolve(source, threads, dtype)
    from transformers import AutoTokenizer

    try:
        config = load_config(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoebenchError(f"model {source!r} could not be loaded: {first}") from None
    adapter = host().adapter_for(config)  # refuse unsupported architectures before reading weights
    model = load_pretrained(
        path,
        dtype=DTYPES[dtype],
        device=device,
        trust_remote_code=trust_remote_code,
        max_memory=max_memory,
        config=config,
    )
    reproducible_experts(model, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, config=config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise MoebenchError(f"model {source!r} has no usable tokenizer: {exc}") from None
    identity = f"{source}@{fingerprint(path)}" if Path(path).is_dir() else source
    return MoEModel(model, adapter, tokenizer=tokenizer, source=source, identity=identity)


#: a snapshot is kept only while its copy fits in this share of the available host memory
SNAPSHOT_SHARE = 0.4


def snapshot(model: MoEModel) -> MoEModel | None:
    """A host-memory copy of a freshly loaded model, or None when it would not fit comfortably.

    :func:`restore` turns it into a clean model for the next run in the time of a memory
    copy, where a reload re-reads, converts and re-packs the checkpoint (about a minute
    for DeepSeek-V2-Lite). The copy's parameters live on the CPU; a model on a GPU is
    moved to the host once, copied and moved back, so GPU memory never holds two copies.
    """
    module = model.model
    size = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    if size > SNAPSHOT_SHARE * available_host_bytes():
        return None
    device = model.device
    if device.type != "cpu":
        module.to("cpu")
    try:
        copy_ = copy.deepcopy(module)
    finally:
        if device.type != "cpu":
            module.to(device)
    return MoEModel(copy_, model.adapter, tokenizer=model.tokenizer, source=model.source, identity=model.identity)


def restore(pristine: MoEModel, device: str) -> MoEModel:
    """A fresh copy of a :func:`snapshot`, on ``device``, as :func:`load` would return it."""
    module = copy.deepcopy(pristine.model)
    if device not in ("cpu", "auto"):
        module.to(device)
    return MoEModel(module, pristine.adapter, tokenizer=pristine.tokenizer, source=pristine.source, identity=pristine.identity)


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def reproducible_experts(model, device: str) -> None:
    """On the CPU, run experts with the per-expert loop: bit-reproducible, where grouped_mm is not.

    ``auto`` without a GPU is the CPU too (spread over CPU memory and disk).
    """
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if on_cpu and hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation("eager")
        except (ValueError, NotImplementedError):
            pass


def load_pretrained(
    path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    trust_remote_code: bool = False,
    max_memory: dict | None = None,
    config=None,
):
    """Load a saved causal LM; rebuilds moebench structures recorded in ``config.moebench``."""
    from transformers import AutoModelForCausalLM

    from . import placement

    config = config or load_config(path, trust_remote_code=trust_remote_code)
    structure = getattr(config, "moebench", None)
    if not structure:
        kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
        if device == "auto":
            folder = placement.offload_folder()
            kwargs.update(device_map="auto", max_memory=placement.parse_max_memory(max_memory), offload_folder=folder)
        from .console import no_transformers_bars

        with no_transformers_bars():
            model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
        if device != "auto":
            model.to(device)
        else:
            placement.owned_by(model, folder)
        return model.eval()
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    apply_structure(model, structure)
    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise MoebenchError(
            f"{path}: checkpoint does not match its moebench structure "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    if device == "auto":  # built whole in CPU memory, then spread like from_pretrained(device_map="auto")
        return placement.dispatch(model.to(dtype=dtype), max_memory, dtype).eval()
    return model.to(device=device, dtype=dtype).eval()


#: what a plain loader is told to use instead (part of the refusal message)
from .saved import LOADER, refuse_plain_loaders  # noqa: E402,F401  (re-exported: moebench.models.LOADER)


def load_config(path, *, trust_remote_code: bool = False):
    """A folder's (or hub id's) config, including folders marked by :func:`refuse_plain_loaders`."""
    from transformers import AutoConfig

    file = Path(path) / "config.json"
    raw = json.loads(file.read_text()) if file.is_file() else {}
    marker = raw.get("moebench")
    real = marker.get("model_type") if isinstance(marker, dict) else None
    if not real or raw.get("model_type") == real:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if real not in CONFIG_MAPPING:
        raise MoebenchError(f"{file}: model type {real!r} is not known to this transformers version")
    raw["model_type"] = real
    raw["moebench"] = {k: v for k, v in raw["moebench"].items() if k != "model_type"}
    return CONFIG_MAPPING[real].from_dict(raw)


def apply_structure(model, structure: dict, where: str = "config.moebench") -> None:
    """Reshape a freshly built model to the structure a moebench save recorded.

    The structure is data: it is checked first (:func:`check_structure`), and custom
    modules are built only from classes on the allow-list plugins register
    (``register_module_classes``); nothing the file names is ever imported.
    """
    structure = check_structure(structure, where)
    moe = MoEModel(model, host().adapter_for(model))
    layers = len(moe.layers)
    for key in ("num_experts", "top_k", "router"):
        for layer in structure[key]:
            if int(layer) >= layers or moe.block(int(layer)) is None:
                raise MoebenchError(f"{where}.{key}: layer {layer} has no MoE block (the model has {layers} layers; MoE layers {moe.moe_layers})")
    for layer in structure["skip_moe"]:
        if layer >= layers:
            raise MoebenchError(f"{where}.skip_moe: layer {layer} is out of range (the model has {layers} layers)")
    for layer, n in structure["num_experts"].items():
        block = moe.block(int(layer))
        if n > block.num_experts:
            raise MoebenchError(f"{where}.num_experts.{layer}: {n} experts, more than the {block.num_experts} the config builds")
        block.experts.gate_up_proj = torch.nn.Parameter(block.gate_up_proj.data[:n].clone())
        block.experts.down_proj = torch.nn.Parameter(block.down_proj.data[:n].clone())
        block.experts.num_experts = n
        moe.adapter.slice_router(block.router, torch.arange(n))
    for layer, state in structure["router"].items():
        router = moe.block(int(layer)).router
        for key, value in state.items():
            setattr(router, key, value)
    for layer, k in structure["top_k"].items():
        moe.block(int(layer)).router.top_k = k
        if hasattr(moe.block(int(layer)).module, "top_k"):
            moe.block(int(layer)).module.top_k = k
    for layer in structure["skip_moe"]:
        moe.adapter.set_moe_block(moe.layers[layer], PassThrough())
    classes = host().module_classes
    for path, spec in structure["modules"].items():
        entry = f"{where}.modules[{path!r}]"
        cls = classes.get(spec["class"])
        if cls is None:
            raise MoebenchError(
                f"{entry}: class {spec['class']!r} is not on moebench's allow-list of module classes "
                f"(registered by plugins: {', '.join(sorted(classes)) or 'none'}); refusing to load it"
            )
        init = spec.get("init", {})
        try:
            inspect.signature(cls).bind(**init)
        except TypeError as exc:
            raise MoebenchError(f"{entry}: init arguments do not fit {spec['class']} ({exc})") from None
        parent_path, _, attr = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError:
            raise MoebenchError(f"{entry}: the model has no submodule {parent_path!r}") from None
        try:
            module = cls(**init)
        except MoebenchError as exc:
            raise MoebenchError(f"{entry}: {exc}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as exc:
            raise MoebenchError(f"{entry}: {spec['class']} could not be built from its init ({type(exc).__name__}: {exc})") from None
        setattr(parent, attr, module)
    install_routing(model, moe.adapter)  # routing rules rebuilt above act on their routers again


PLAIN = (str, int, float, bool, type(None))


def _plain(value, where: str) -> None:
    """Refuse anything but JSON data (str, numbers, bools, null, lists and str-keyed tables)."""
    if isinstance(value, PLAIN):
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise MoebenchError(f"{where}: key {k!r} is not a string")
            _plain(v, f"{where}.{k}")
        return
    raise MoebenchError(f"{where}: expected plain data (string, number, bool, list, table), got {type(value).__name__}")


def _layer_key(key, where: str) -> int:
    try:
        layer = int(key)
    except (TypeError, ValueError):
        layer = -1
    if isinstance(key, bool) or layer < 0:
        raise MoebenchError(f"{where}: {key!r} is not a layer index (expected a non-negative integer)")
    return layer


def check_structure(structure, where: str = "config.moebench") -> dict:
    """``config.moebench`` checked against its schema, every value plain data; one-line error otherwise."""
    if not isinstance(structure, dict):
        raise MoebenchError(f"{where}: expected a table, got {type(structure).__name__}")
    known = ("num_experts", "top_k", "router", "skip_moe", "modules", "model_type")
    for key in structure:
        if key not in known:
            raise MoebenchError(f"{where}.{key}: unknown field; expected one of {', '.join(known)}")
    _plain(structure, where)
    out: dict = {}
    for key in ("num_experts", "top_k"):
        table = structure.get(key) or {}
        if not isinstance(table, dict):
            raise MoebenchError(f"{where}.{key}: expected a table of layer -> count")
        for layer, n in table.items():
            _layer_key(layer, f"{where}.{key}")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise MoebenchError(f"{where}.{key}.{layer}: expected a positive integer, got {n!r}")
        out[key] = table
    routers = structure.get("router") or {}
    if not isinstance(routers, dict):
        raise MoebenchError(f"{where}.router: expected a table of layer -> router attributes")
    for layer, state in routers.items():
        _layer_key(layer, f"{where}.router")
        if not isinstance(state, dict):
            raise MoebenchError(f"{where}.router.{layer}: expected a table of router attributes")
        for k, v in state.items():
            if k.startswith("_") or not k.isidentifier() or not isinstance(v, (int, float, str, bool, type(None))):
                raise MoebenchError(f"{where}.router.{layer}.{k}: expected a public attribute with a number, string, bool or null value")
    out["router"] = routers
    skip = structure.get("skip_moe") or []
    if not isinstance(skip, list) or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in skip):
        raise MoebenchError(f"{where}.skip_moe: expected a list of layer indices")
    out["skip_moe"] = skip
    modules = structure.get("modules") or {}
    if not isinstance(modules, dict):
        raise MoebenchError(f"{where}.modules: expected a table of module path -> {{class, init}}")
    for path, spec in modules.items():
        entry = f"{where}.modules[{path!r}]"
        if not path or not all((part.isidentifier() and not part.startswith("_")) or part.isdigit() for part in path.split(".")):
            raise MoebenchError(f"{entry}: expected a dotted module path like model.layers.0.mlp")
        if not isinstance(spec, dict) or not isinstance(spec.get("class"), str) or set(spec) - {"class", "init"}:
            raise MoebenchError(f"{entry}: expected {{class = 'package.module:Class', init = {{...}}}}")
        init = spec.get("init", {})
        if not isinstance(init, dict):
            raise MoebenchError(f"{entry}.init: expected a table of keyword arguments")
        private = [k for k in init if k.startswith("_")]
        if private:
            raise MoebenchError(f"{entry}.init: private argument {private[0]!r} cannot come from a file")
    out["modules"] = modules
    return out


def fingerprint(path) -> str:
    """A short identity for a local checkpoint (config + weight file sizes and mtimes), for cache keys."""
    import hashlib

    path = Path(path)
    h = hashlib.sha1()
    if (path / "config.json").exists():
        h.update((path / "config.json").read_bytes())
    for file in sorted(path.glob("*.safetensors")):
        stat = file.stat()
        h.update(json.dumps([file.name, stat.st_size, stat.st_mtime_ns]).encode())
    return h.hexdigest()[:16]
