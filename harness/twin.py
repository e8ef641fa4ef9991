"""Shape twins: real MoE models' shapes with seeded random weights, for time and memory at real width.

``twin:NAME[?layers=N&seed=S]`` is a checkpoint with the published configuration of a
real model (``harness/twins/NAME.json``, each citing the model card it was copied from),
its layer count cut to ``N`` (dense-first layers and shared experts kept), the zoo's
tokenizer (vocabulary resized to it) and random weights scaled like a trained model:

- activations keep unit scale through every projection (std ``1/sqrt(fan_in)``);
- each sublayer's output projection (``o_proj``, ``down_proj``, routed and shared) is
  scaled by ``OUT_GAIN`` so a decoder layer changes the residual stream by a fraction of
  its norm, as trained models' layers do (measured by :func:`layer_output_ratios`);
- routers have unit-scale logits over random directions, so tokens spread over all
  experts instead of collapsing onto a few (measured by :func:`expert_load`);
- norms are ones; DeepSeek-V3's score-correction bias is zero.

Twins exist to measure time, memory and correctness of the harness and the methods at
real width. Their perplexity and task scores mean nothing: never compare a method's
quality on a twin.

The checkpoint is written layer by layer (one safetensors shard per decoder layer plus
one for embeddings, final norm and head), each tensor drawn directly in the target dtype
from a generator seeded by the twin's seed and the tensor's name. Peak memory while
building is one layer, so a twin larger than RAM can be built and then streamed; nothing
is ever materialised in float32 unless the dtype is float32. Checkpoints are cached under
``cache_dir("twins")`` keyed by name, layers, seed, dtype and the recipe.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .errors import MoebenchError, did_you_mean
from .paths import cache_dir

CONFIGS = Path(__file__).parent / "twins"
RECIPE = 1  # bump when the weight recipe changes: part of every cache key
OUT_GAIN = 0.5  # output projections' gain: measured per-layer residual updates of about 0.15x the stream's norm
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def names() -> list[str]:
    """The twins' names (what suites write as ``twin:NAME``)."""
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def published(name: str) -> dict[str, Any]:
    """The published configuration of ``name`` as shipped (``_source`` cites its model card)."""
    if name not in names():
        raise MoebenchError(f"unknown twin {name!r}{did_you_mean(name, names())}; expected one of {', '.join(names())}")
    return json.loads((CONFIGS / f"{name}.json").read_text())


EXPERT_FIELDS = ("n_routed_experts", "num_local_experts", "num_experts")


def parse_source(text: str) -> tuple[str, dict[str, int]]:
    """``NAME`` or ``NAME?layers=N&seed=S&experts=E`` (a ``twin:`` source without the prefix) as ``(name, options)``.

    ``experts=E`` keeps only E routed experts per layer (top-k capped at E): a cost knob
    for dry runs of real-width code on the CPU (bench/gpu_smoke.sh --cpu), not a real shape.
    """
    name, _, query = text.partition("?")
    full = published(name)["num_hidden_layers"]
    options: dict[str, int] = {}
    for part in filter(None, query.split("&")):
        key, _, value = part.partition("=")
        if key not in ("layers", "seed", "experts") or not value.isdigit():
            raise MoebenchError(f"twin:{text}: expected twin:NAME or twin:NAME?layers=N&seed=S&experts=E with whole numbers, got {part!r}")
        options[key] = int(value)
    if not 1 <= options.get("layers", full) <= full:
        raise MoebenchError(f"twin:{text}: layers must be between 1 and {full} (the real model's depth), got {options['layers']}")
    routed = next(published(name)[f] for f in EXPERT_FIELDS if f in published(name))
    if not 1 <= options.get("experts", routed) <= routed:
        raise MoebenchError(f"twin:{text}: experts must be between 1 and {routed} (the real model's routed experts), got {options['experts']}")
    return name, options


def config(name: str, layers: int | None = None, dtype: str = "bfloat16", experts: int | None = None):
    """The transformers config of a twin: published shape, ``layers`` deep, zoo vocabulary.

    With fewer layers the real model's dense-first layers are kept (DeepSeek's
    ``first_k_dense_replace``), capped so that at least one MoE layer remains.
    """
    from transformers import AutoConfig

    from . import zoo

    fields = {k: v for k, v in published(name).items() if not k.startswith("_")}
    model_type = fields.pop("model_type")
    full = fields["num_hidden_layers"]
    layers = full if layers is None else layers
    fields["num_hidden_layers"] = layers
    if "first_k_dense_replace" in fields:
        fields["first_k_dense_replace"] = min(fields["first_k_dense_replace"], max(0, layers - 1))
    if experts is not None:
        for f in EXPERT_FIELDS:
            if f in fields:
                fields[f] = experts
        fields["num_experts_per_tok"] = min(fields["num_experts_per_tok"], experts)
        if fields.get("n_group", 1) > 1 and experts % fields["n_group"]:
            fields.update(n_group=1, topk_group=1)
    fields.update(vocab_size=zoo.VOCAB_SIZE, bos_token_id=0, eos_token_id=1, pad_token_id=2, dtype=dtype)
    cfg = AutoConfig.for_model(model_type, **fields)
    cfg.moebench_twin = {"name": name, "layers": layers, "full_layers": full, "experts": experts, "source": published(name)["_source"]}
    return cfg


def _generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha1(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def tensor(key: str, shape, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """One twin tensor, drawn in ``dtype`` from a generator seeded by ``seed`` and its name."""
    leaf = key.rsplit(".", 1)[-1]
    if len(shape) == 1 or leaf == "e_score_correction_bias":
        fill = 1.0 if key.endswith("norm.weight") else 0.0
        return torch.full(tuple(shape), fill, dtype=dtype)
    out = torch.empty(tuple(shape), dtype=dtype)
    if "embed_tokens" in key:
        std = 1.0
    else:
        std = 1.0 / math.sqrt(shape[-1])  # fan-in is the last dim for Linear and packed experts alike
        if leaf in ("down_proj",) or key.endswith(("o_proj.weight", "down_proj.weight")):
            std *= OUT_GAIN
    return out.normal_(0.0, std, generator=_generator(seed, key))


@torch.no_grad()
def initialize(model, seed: int = 0) -> None:
    """Overwrite every parameter and persistent buffer of ``model`` with the twin recipe (any width)."""
    for key, value in model.state_dict().items():
        value.copy_(tensor(key, value.shape, value.dtype, seed))


def _key(name: str, layers: int, seed: int, dtype: str, experts: int | None = None) -> str:
    import transformers

    payload = {"config": published(name), "layers": layers, "seed": seed, "dtype": dtype, "recipe": RECIPE,
               **({"experts": experts} if experts is not None else {}),
               "out_gain": OUT_GAIN, "transformers": transformers.__version__.split(".")[0]}
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _shapes(cfg) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every persistent tensor's name and shape, from a model built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def build(name: str, *, layers: int | None = None, seed: int = 0, dtype: str = "bfloat16", experts: int | None = None,
          progress: bool = False) -> Path:
    """The folder of twin ``name`` (config, tokenizer, sharded safetensors, ``twin.json``), written if needed."""
    from safetensors.torch import save_file

    from . import zoo
    from .zoo import _locked

    if dtype not in DTYPES:
        raise MoebenchError(f"twin dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    cfg = config(name, layers, dtype, experts)
    layers = cfg.num_hidden_layers
    root = cache_dir("twins")
    tag = f"-E{experts}" if experts is not None else ""
    final = root / f"{name}-L{layers}{tag}-s{seed}-{dtype}-{_key(name, layers, seed, dtype, experts)}"
    if (final / "twin.json").exists():
        return final
    with _locked(root / f".{final.name}.lock"):
        if (final / "twin.json").exists():
            return final
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp"))
        try:
            start = time.perf_counter()
            shapes = _shapes(cfg)
            groups: dict[str, list[str]] = {}
            for key in shapes:
                parts = key.split(".")
                group = f"layer{int(parts[2]):03d}" if key.startswith("model.layers.") else "outer"
                groups.setdefault(group, []).append(key)
            ordered = sorted(groups)
            weight_map, total = {}, 0
            for i, group in enumerate(ordered):
                file = f"model-{i + 1:05d}-of-{len(ordered):05d}.safetensors"
                state = {k: tensor(k, shapes[k], DTYPES[dtype], seed) for k in groups[group]}
                total += sum(t.numel() * t.element_size() for t in state.values())
                save_file(state, str(tmp / file), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(state, file))
                del state
                if progress:
                    print(f"twin:{name}: wrote {file}", flush=True)
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n"
            )
            cfg.save_pretrained(tmp)
            zoo.tokenizer().save_pretrained(tmp)
            info = {
                "name": name, "layers": layers, "experts": experts, "seed": seed, "dtype": dtype, "recipe": RECIPE, "out_gain": OUT_GAIN,
                "source": published(name)["_source"], "bytes": total, "build_seconds": round(time.perf_counter() - start, 1),
                "note": "shape twin: random weights; measures time, memory and correctness at real width, not quality",
            }
            (tmp / "twin.json").write_text(json.dumps(info, indent=1) + "\n")
            tmp.chmod(0o755)
            for file in tmp.iterdir():
                file.chmod(0o644)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def layer_output_ratios(model, input_ids: torch.Tensor) -> list[float]:
    """Per decoder layer, ``|h_out - h_in| / |h_in|`` (how much each layer moves the residual stream)."""
    out = model(input_ids=input_ids, output_hidden_states=True)
    hs = out.hidden_states
    return [((hs[i + 1] - hs[i]).float().norm() / hs[i].float().norm()).item() for i in range(len(hs) - 1)]


def expert_load(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per MoE layer, each expert's share of the routed slots on ``input_ids`` (sums to 1)."""
    from .adapter import MoEModel
    from .plugins import host

    moe = MoEModel(model, host().adapter_for(model))
    shares: list[torch.Tensor] = []
    counts: dict[int, torch.Tensor] = {}

    def hook(layer, n):
        def record(module, args):
            idx = args[1].flatten()
            counts[layer] = counts.get(layer, torch.zeros(n, dtype=torch.long)) + torch.bincount(idx[idx < n], minlength=n)
        return record

    handles = [moe.block(i).experts.register_forward_pre_hook(hook(i, moe.block(i).num_experts)) for i in moe.moe_layers]
    try:
        model(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    for i in sorted(counts):
        shares.append(counts[i].float() / counts[i].sum())
    return shares
