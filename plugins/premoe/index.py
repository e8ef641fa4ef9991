"""PreMoe (Pei et al., arXiv 2505.17639): keep only the experts a task needs, found by retrieval.

- **PEP, probabilistic expert pruning.** A task's *task-conditioned expected selection
  score* (TCESS) of expert ``e`` in a MoE layer is the mean over the task's tokens of a
  marker: the router logit of ``e`` when ``e`` is among the token's top-``k`` experts (and,
  with a threshold ``r > 0``, its probability renormalised over those ``k`` is at least
  ``r``), else 0. The ``keep`` experts with the highest TCESS stay. The reference code
  marks ``k = 1`` expert per token whatever the model's top-k; that is the default, and
  ``k = 0`` (the layer's own top-k) is moebench's variant.
- **TAER, task-adaptive expert retrieval.** Offline, each task of a collection is stored
  compactly: the TCESS vector of one *key* layer goes into a FAISS index, and every MoE
  layer's expert ranking is stored as a permutation of the key layer's ranking. Online,
  a query prompt's own key-layer TCESS (one forward pass, which only needs the layers
  up to the key layer's router) finds the nearest stored task, whose rankings say which
  experts to keep in every layer.

An index on disk is a folder: ``index.faiss`` (the keys) and ``patterns.safetensors``
(the permutations) whose header names the tasks, the settings, a checksum of the FAISS
file and the model it was built for (MoE layers, expert counts, top-k, a digest of the
router weights). Loading refuses a corrupt index, or one built for another model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from moebench.errors import MoebenchError, did_you_mean

if TYPE_CHECKING:
    from moebench.adapter import MoEModel
    from moebench.calibration import Calibration, CalibrationSpec

FORMAT = "moebench-premoe"
VERSION = 1
RESERVED = {"retrieve"}


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite's ``[tasks]`` table: where its text comes from.

    ``data`` calibrates the task's pattern (train split) and is what the task is
    evaluated on (test split); held-out queries come from ``query`` (validation split),
    which defaults to ``data``.
    """

    name: str
    data: str
    query: str | None = None

    @property
    def query_data(self) -> str:
        return self.query or self.data


TASK_FIELDS = {"data": "data spec of the task's text (train: calibration, test: evaluation)", "query": "data spec of held-out queries (validation split); default: data"}


def parse_tasks(raw: Any, err: Callable[[str, str], Exception] | None = None) -> dict[str, TaskSpec]:
    """Validate a suite's ``[tasks]`` table: ``[tasks.NAME] data = "SCHEME:ARG"`` (``query`` optional).

    ``err(field, message)`` builds the exception (the suite parser passes one naming the
    file); by default a :class:`MoebenchError`.
    """
    from moebench.data import DataSpec
    from moebench.plugins import host

    def fail(where: str, message: str) -> Exception:
        return err(where, message) if err else MoebenchError(f"{where}: {message}")

    if raw in (None, {}):
        return {}
    if not isinstance(raw, Mapping):
        raise fail("tasks", 'expected a table of tasks, e.g. [tasks.prose] data = "embedded:prose"')
    tasks = {}
    schemes = host().data_sources
    for name, table in raw.items():
        where = f"tasks.{name}"
        if name in RESERVED:
            raise fail(where, f"{name!r} is reserved (premoe's task = 'retrieve'); choose another task name")
        if not isinstance(table, Mapping):
            raise fail(where, 'expected a table, e.g. data = "embedded:prose"')
        for key in table:
            if key not in TASK_FIELDS:
                raise fail(f"{where}.{key}", f"unknown field{did_you_mean(key, TASK_FIELDS)}; expected one of {', '.join(TASK_FIELDS)}")
        if "data" not in table:
            raise fail(f"{where}.data", 'missing; expected a data spec like "embedded:prose" or "file:PATH"')
        for key in TASK_FIELDS:
            if key not in table:
                continue
            value = table[key]
            if not isinstance(value, str):
                raise fail(f"{where}.{key}", f"expected a data spec string, got {value!r}")
            try:
                spec = DataSpec.parse(value)
            except MoebenchError as exc:
                raise fail(f"{where}.{key}", str(exc)) from None
            if spec.scheme not in schemes:
                raise fail(f"{where}.{key}", f"unknown data scheme {spec.scheme!r}{did_you_mean(spec.scheme, schemes)}; known: {', '.join(sorted(schemes))}")
        tasks[name] = TaskSpec(name, table["data"], table.get("query"))
    return tasks


# --------------------------------------------------------------------------- PEP


def tcess(logits: torch.Tensor, top_k: int, threshold: float = 0.0) -> torch.Tensor:
    """Task-conditioned expected selection score ``[E]`` from router logits ``[T, E]``.

    Each token marks its ``top_k`` highest-logit experts with their logits; with
    ``threshold > 0`` only those whose probability renormalised over those (a softmax of
    the top logits) is at least ``threshold``. The score is the marker averaged over
    tokens. Top-k is re-derived from the logits (score-correction biases are not applied).
    """
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise MoebenchError(f"router logits must be [tokens, experts] with tokens > 0, got {tuple(logits.shape)}")
    logits = logits.float()
    k = min(top_k, logits.shape[1])
    values, indices = logits.topk(k, dim=-1)
    if threshold > 0:
        values = values * (values.softmax(dim=-1) >= threshold)
    markers = torch.zeros_like(logits).scatter_(1, indices, values)
    return markers.mean(0)


def marked(k: int, top_k: int) -> int:
    """Experts a token marks in TCESS: ``k``, or the layer's ``top_k`` when ``k`` is 0."""
    return k if k > 0 else top_k


def layer_scores(router_logits: Mapping[int, torch.Tensor], top_k: Mapping[int, int], threshold: float = 0.0, k: int = 1) -> dict[int, torch.Tensor]:
    """TCESS of every MoE layer: ``{layer: [E]}`` from ``{layer: logits [T, E]}`` (``k`` as in :class:`IndexSettings`)."""
    return {layer: tcess(logits, marked(k, top_k[layer]), threshold) for layer, logits in sorted(router_logits.items())}


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Experts from most to least important; ties keep index order (deterministic)."""
    return torch.sort(scores, descending=True, stable=True).indices


# --------------------------------------------------------------------------- patterns


@dataclass
class Pattern:
    """One task's expert importance, compactly: the key layer's TCESS and a permutation per MoE layer.

    ``perms[i][key_order[r]]`` is layer ``i``'s rank-``r`` expert, where ``key_order`` ranks
    the key layer's experts; so the key vector plus ``L × E`` small integers give every
    layer's ranking.
    """

    key: torch.Tensor  # [E] float32
    perms: torch.Tensor  # [L, E] int16

    @classmethod
    def from_scores(cls, scores: Sequence[torch.Tensor], key_layer: int) -> Pattern:
        counts = {s.numel() for s in scores}
        if len(counts) != 1:
            raise MoebenchError(f"PreMoe patterns need the same routed expert count in every MoE layer; got {sorted(counts)}")
        key = scores[key_layer].float().clone()
        key_order = ranking(key)
        perms = torch.empty(len(scores), key.numel(), dtype=torch.int16)
        for i, s in enumerate(scores):
            perms[i, key_order] = ranking(s).to(torch.int16)
        return cls(key, perms)

    def rankings(self) -> list[torch.Tensor]:
        key_order = ranking(self.key)
        return [perm.long()[key_order] for perm in self.perms]

    def keep(self, n: int) -> list[list[int]]:
        """The ``n`` most important experts of each MoE layer (in rank order)."""
        return [r[:n].tolist() for r in self.rankings()]


# --------------------------------------------------------------------------- model identity


@dataclass(frozen=True)
class ModelSignature:
    """What an index must match: MoE layers, expert counts, top-k, and the router weights' digest."""

    model_type: str
    moe_layers: tuple[int, ...]
    num_experts: tuple[int, ...]
    top_k: tuple[int, ...]
    router_digest: str

    @classmethod
    def of(cls, model: MoEModel, router_weight: Callable | None = None) -> ModelSignature:
        """The signature of ``model``; ``router_weight(block)`` supplies router weights that are not resident."""
        h = hashlib.sha256()
        blocks = list(model.blocks())
        for b in blocks:
            weight = router_weight(b) if router_weight is not None else b.router_weight
            # bfloat16 bytes: the same checkpoint loaded in float32 or bfloat16 hashes alike
            h.update(weight.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
        return cls(
            model_type=str(getattr(model.config, "model_type", "")),
            moe_layers=tuple(b.layer for b in blocks),
            num_experts=tuple(b.num_experts for b in blocks),
            top_k=tuple(b.top_k for b in blocks),
            router_digest=h.hexdigest()[:16],
        )

    def check(self, built: ModelSignature, where: str) -> None:
        """Raise a one-line error when ``built`` (an index's) does not describe this model."""
        for name, what in (
            ("model_type", "model type"),
            ("moe_layers", "MoE layers"),
            ("num_experts", "routed experts per layer"),
            ("top_k", "top-k per layer"),
            ("router_digest", "router weights (a different checkpoint)"),
        ):
            mine, theirs = getattr(self, name), getattr(built, name)
            if mine != theirs:
                raise MoebenchError(f"{where}: index was built for another model: {what} {_short(theirs)} there, {_short(mine)} here")

    @classmethod
    def from_dict(cls, d: dict) -> ModelSignature:
        return cls(d["model_type"], tuple(d["moe_layers"]), tuple(d["num_experts"]), tuple(d["top_k"]), d["router_digest"])


def _short(value) -> str:
    return str(list(value)) if isinstance(value, tuple) else repr(value)


# --------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class IndexSettings:
    """How patterns are scored and compared (part of the index's identity)."""

    threshold: float = 0.0
    key_layer: int = 0  # position among the MoE layers
    metric: Literal["l2", "cosine"] = "l2"
    k: int = 1  # experts a token marks in TCESS; 0: the layer's own top-k (moebench's earlier variant)


@dataclass
class TaskIndex:
    """Stored task patterns with a FAISS index over their keys."""

    tasks: list[str]
    patterns: list[Pattern]
    signature: ModelSignature
    settings: IndexSettings = field(default_factory=IndexSettings)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. calibration spec, model identity
    _faiss: Any = field(default=None, repr=False)
    _searching: Any = field(default=None, repr=False, compare=False)  # the index searched (a GPU copy when there is one)

    def __post_init__(self):
        if len(self.tasks) != len(self.patterns) or not self.tasks:
            raise MoebenchError("a PreMoe index needs one pattern per task and at least one task")
        if self._faiss is None:
            self._faiss = _faiss_index(torch.stack([p.key for p in self.patterns]), self.settings.metric)

    @property
    def keys(self) -> torch.Tensor:
        return torch.stack([p.key for p in self.patterns])

    def search(self, key: torch.Tensor, k: int | None = None) -> list[tuple[str, float]]:
        """Nearest stored tasks to a query key, best first: ``[(task, distance)]`` (cosine: 1 - similarity)."""
        k = min(k or len(self.tasks), len(self.tasks))
        query = _prepare(key.float().reshape(1, -1), self.settings.metric)
        if self._searching is None:
            self._searching = _searcher(self._faiss)
        distances, ids = self._searching.search(query, k)
        out = []
        for d, i in zip(distances[0].tolist(), ids[0].tolist()):
            out.append((self.tasks[i], 1.0 - d if self.settings.metric == "cosine" else d))
        return out

    def keep(self, task: str, n: int) -> dict[int, list[int]]:
        """Task ``task``'s ``n`` most important experts in every MoE layer."""
        if task not in self.tasks:
            raise MoebenchError(f"task {task!r} is not in the index{did_you_mean(task, self.tasks)}; it holds {', '.join(self.tasks)}")
        kept = self.patterns[self.tasks.index(task)].keep(n)
        return dict(zip(self.signature.moe_layers, kept))

    # -- disk ----------------------------------------------------------------------------
    def save(self, folder) -> Path:
        import faiss
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._faiss, str(folder / "index.faiss"))
        header = {
            "format": FORMAT,
            "version": str(VERSION),
            "tasks": json.dumps(self.tasks),
            "signature": json.dumps(asdict(self.signature)),
            "settings": json.dumps(asdict(self.settings)),
            "info": json.dumps(self.info, default=str),
            "index_sha256": _sha256(folder / "index.faiss"),
        }
        perms = torch.stack([p.perms for p in self.patterns])
        save_file({"perms": perms.contiguous()}, str(folder / "patterns.safetensors"), metadata=header)
        return folder

    @classmethod
    def load(cls, folder, model: MoEModel | None = None) -> TaskIndex:
        """Read an index back; checks its integrity, and that it was built for ``model`` when given."""
        import faiss
        from safetensors import SafetensorError, safe_open

        folder = Path(folder)
        where = f"PreMoe index {folder}"
        for name in ("index.faiss", "patterns.safetensors"):
            if not (folder / name).is_file():
                raise MoebenchError(f"{where}: missing {name} (expected a folder written by TaskIndex.save)")
        try:
            with safe_open(str(folder / "patterns.safetensors"), framework="pt") as f:
                header = f.metadata() or {}
                perms = f.get_tensor("perms")
        except (SafetensorError, OSError, KeyError) as exc:
            raise MoebenchError(f"{where}: patterns.safetensors is corrupt ({exc})") from None
        if header.get("format") != FORMAT:
            raise MoebenchError(f"{where}: not a PreMoe index (format {header.get('format')!r})")
        if header.get("version") != str(VERSION):
            raise MoebenchError(f"{where}: index version {header.get('version')} is not supported (expected {VERSION}); rebuild it")
        if _sha256(folder / "index.faiss") != header.get("index_sha256"):
            raise MoebenchError(f"{where}: index.faiss is corrupt (checksum differs from the one recorded at save)")
        try:
            tasks = json.loads(header["tasks"])
            signature = ModelSignature.from_dict(json.loads(header["signature"]))
            settings = IndexSettings(**{"k": 0, **json.loads(header["settings"])})  # indexes saved before k existed used top-k
            info = json.loads(header.get("info", "{}"))
            index = faiss.read_index(str(folder / "index.faiss"))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise MoebenchError(f"{where}: header or index unreadable ({exc})") from None
        n, e = len(tasks), signature.num_experts[0] if signature.num_experts else 0
        if index.ntotal != n or index.d != e or tuple(perms.shape) != (n, len(signature.moe_layers), e):
            raise MoebenchError(
                f"{where}: inconsistent: {n} tasks, {e} experts, {len(signature.moe_layers)} MoE layers, "
                f"but the FAISS index holds {index.ntotal} keys of size {index.d} and patterns have shape {tuple(perms.shape)}"
            )
        expected = torch.arange(e)
        if not all(torch.equal(p.long().sort().values, expected) for p in perms.reshape(-1, e)):
            raise MoebenchError(f"{where}: patterns are corrupt (a layer's ranking is not a permutation of its experts)")
        keys = torch.from_numpy(index.reconstruct_n(0, n)).float()
        if settings.metric == "cosine":
            _check_unit(keys, where)
        patterns = [Pattern(keys[i].clone(), perms[i].clone()) for i in range(n)]
        loaded = cls(tasks, patterns, signature, settings, info, _faiss=index)
        if model is not None:
            ModelSignature.of(model).check(signature, where)
        return loaded


def _check_unit(keys: torch.Tensor, where: str) -> None:
    if not torch.allclose(keys.norm(dim=-1), torch.ones(len(keys)), atol=1e-3):
        raise MoebenchError(f"{where}: cosine index holds keys that are not unit vectors (corrupt)")


def _prepare(x: torch.Tensor, metric: str) -> np.ndarray:
    x = x.float()
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=-1)
    return np.ascontiguousarray(x.numpy(), dtype="float32")


def _faiss_index(keys: torch.Tensor, metric: str):
    import faiss

    if metric not in ("l2", "cosine"):
        raise MoebenchError(f"index metric {metric!r}: expected 'l2' or 'cosine'")
    index = faiss.IndexFlatL2(keys.shape[1]) if metric == "l2" else faiss.IndexFlatIP(keys.shape[1])
    index.add(_prepare(keys, metric))
    return index


def _searcher(index):
    """The index itself, or a GPU copy of it when faiss was built with GPU support and a GPU is present."""
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def faiss_device() -> str:
    import faiss

    return "gpu" if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 else "cpu"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- building and querying


def _service(spec: "CalibrationSpec | Calibration", cache: bool = True) -> "Calibration":
    """The calibration service a run already has (``ctx.calibration``), or one for these settings."""
    from moebench.calibration import Calibration

    return spec if isinstance(spec, Calibration) else Calibration(spec, cache=cache)


def task_scores(model: MoEModel, data: str, spec: "CalibrationSpec | Calibration", threshold: float = 0.0, cache: bool = True, k: int = 1) -> dict[int, torch.Tensor]:
    """TCESS per MoE layer of ``model`` over ``data`` (train split), through the calibration service (cached)."""
    logits = _service(spec, cache).for_data(data).stats(model, ["router_logits"])["router_logits"]
    return layer_scores(logits, {b.layer: b.top_k for b in model.blocks()}, threshold, k)


def build(
    model: MoEModel,
    tasks: Mapping[str, TaskSpec],
    spec: "CalibrationSpec | Calibration",
    settings: IndexSettings = IndexSettings(),
    cache: bool = True,
) -> TaskIndex:
    """One pattern per task from its calibration text, indexed by key-layer TCESS."""
    service = _service(spec, cache)
    spec = service.spec
    if not tasks:
        raise MoebenchError("PreMoe needs at least one task; add [tasks.NAME] data = '...' tables to the suite")
    signature = ModelSignature.of(model)
    _check_key_layer(settings.key_layer, signature)
    patterns = []
    for task in tasks.values():
        scores = task_scores(model, task.data, service, settings.threshold, cache, settings.k)
        patterns.append(Pattern.from_scores([scores[layer] for layer in signature.moe_layers], settings.key_layer))
    info = {"model": model.identity, "calibration": spec.key(), "tasks": {t.name: t.data for t in tasks.values()}}
    return TaskIndex(list(tasks), patterns, signature, settings, info)


def build_streaming(
    path,
    tasks: Mapping[str, TaskSpec],
    spec: CalibrationSpec,
    settings: IndexSettings = IndexSettings(),
    *,
    dtype: str = "bfloat16",
    device: str = "cpu",
) -> TaskIndex:
    """:func:`build` for a checkpoint too large to load: each task's calibration streams one layer at a time.

    Same patterns as :func:`build` on the loaded model (FP8 checkpoints dequantized on read).
    """
    from moebench import checkpoint

    service = _service(spec, cache=False)
    spec = service.spec
    if not tasks:
        raise MoebenchError("PreMoe needs at least one task; add [tasks.NAME] data = '...' tables to the suite")
    stream = checkpoint.LayerStream(path, dtype=dtype, device=device)
    signature = ModelSignature.of(stream.model, stream.router_weight)
    _check_key_layer(settings.key_layer, signature)
    top_k = {b.layer: b.top_k for b in stream.model.blocks()}
    patterns = []
    for task in tasks.values():
        windows = service.for_data(task.data).windows(stream.model.tokenizer)
        logits = stream.statistics(["router_logits"], windows, spec.batch_size, spec.seed)["router_logits"]
        scores = layer_scores(logits, top_k, settings.threshold, settings.k)
        patterns.append(Pattern.from_scores([scores[layer] for layer in signature.moe_layers], settings.key_layer))
    info = {"model": stream.model.identity, "calibration": spec.key(), "tasks": {t.name: t.data for t in tasks.values()}}
    return TaskIndex(list(tasks), patterns, signature, settings, info)


def cached(model: MoEModel, tasks: Mapping[str, TaskSpec], spec: "CalibrationSpec | Calibration", settings: IndexSettings, cache: bool = True) -> TaskIndex:
    """:func:`build`, saved under the cache and reused while model, tasks, calibration and settings agree."""
    from moebench import paths

    service = _service(spec, cache)
    spec = service.spec
    blob = json.dumps(
        {
            "model": model.identity,
            "edits": model.lineage,
            "signature": asdict(ModelSignature.of(model)),
            "tasks": {t.name: t.data for t in tasks.values()},
            "calibration": spec.key(),
            "settings": asdict(settings),
            "version": VERSION,
        },
        sort_keys=True,
    )
    folder = paths.cache_dir("premoe") / hashlib.sha1(blob.encode()).hexdigest()[:20]
    if cache and (folder / "patterns.safetensors").exists():
        return TaskIndex.load(folder, model)
    index = build(model, tasks, service, settings, cache)
    if cache:
        import shutil
        import tempfile

        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        index.save(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process saved the same index first
            shutil.rmtree(tmp, ignore_errors=True)
    return index


@torch.no_grad()
def query_scores(model: MoEModel, ids: torch.Tensor, threshold: float = 0.0, k: int = 1) -> dict[int, torch.Tensor]:
    """TCESS per MoE layer over a query's tokens ``ids [n, len]`` (one forward pass)."""
    from moebench.plugins import host

    stat = host().statistic("router_logits")(model)
    handles = stat.attach()
    try:
        model.model(input_ids=ids.to(model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return layer_scores(stat.result(), {b.layer: b.top_k for b in model.blocks()}, threshold, k)


def query_key(model: MoEModel, ids: torch.Tensor, settings: IndexSettings) -> torch.Tensor:
    """The query's key: its TCESS in the key layer."""
    scores = query_scores(model, ids, settings.threshold, settings.k)
    return scores[model.moe_layers[settings.key_layer]]


def _check_key_layer(key_layer: int, signature: ModelSignature) -> None:
    if not 0 <= key_layer < len(signature.moe_layers):
        raise MoebenchError(f"key_layer {key_layer}: expected a position among the {len(signature.moe_layers)} MoE layers (0..{len(signature.moe_layers) - 1})")


def load_for_query(
    path,
    index: TaskIndex,
    ids: torch.Tensor,
    keep: int,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    storage: Literal["dense", "nf4"] = "dense",
):
    """Deploy from a checkpoint: route the query up to the key layer, retrieve, load only the kept experts.

    The query's key needs only the layers before the key layer's router, read one at
    a time (no routed experts at all); then the model is loaded with the retrieved
    task's ``keep`` experts per layer. ``storage = "nf4"`` then stores the kept routed
    experts in 4 bits through the ``bnb_4bit`` method (bitsandbytes NF4 blocks).
    Returns ``(MoEModel, LoadReport, matches)``.
    """
    if storage not in ("dense", "nf4"):
        raise MoebenchError(f"storage {storage!r}: expected 'dense' or 'nf4'")
    from moebench import checkpoint
    from moebench.plugins import host

    stream = checkpoint.LayerStream(path, dtype=dtype, device=device)
    ModelSignature.of(stream.model, stream.router_weight).check(index.signature, f"PreMoe index for {path}")
    key_layer = index.signature.moe_layers[index.settings.key_layer]
    stat = host().statistic("router_logits")(stream.model)
    handles = stat.attach()
    try:
        stream.run(ids, stop_at_router=key_layer)
    finally:
        for h in handles:
            h.remove()
    key = tcess(stat.result()[key_layer], marked(index.settings.k, stream.model.block(key_layer).top_k), index.settings.threshold)
    matches = index.search(key)
    read_for_query = stream.ckpt.bytes_read
    del stream
    model, report = checkpoint.load(path, keep=index.keep(matches[0][0], keep), dtype=dtype, device=device)
    report.bytes_read += read_for_query
    if storage == "nf4":
        from moebench.method import Context

        method = host().method("bnb_4bit")()
        method.apply(model, method.Params(), Context(device=device))
        report.notes.append("kept routed experts stored as bitsandbytes NF4 blocks")
    return model, report, matches
