"""The calibration service: one pass of calibration text, every statistic a suite needs.

Methods name the statistics they read (``routing_counts``, ``layer_similarity``...).
:class:`Calibration` runs the calibration windows through the model once with every
missing statistic's hooks attached, and caches each result on disk keyed by (model
identity and edits so far, data spec, samples, seqlen, seed, statistic), so ten methods
that need routing counts cost one pass, in this process or the next. Caches are written
with ``torch.save`` and read with ``weights_only=True``.

A statistic is a small class (registered by plugins through ``register_statistics``)
that attaches hooks to the model and returns plain tensors, numbers, lists and dicts.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from . import paths
from .data import calibration_windows
from .forward import StopForward, forward_windows  # noqa: F401  (also importable from here, as before)

if TYPE_CHECKING:
    from .adapter import MoEModel


class Statistic:
    """Gathers one statistic during a calibration pass.

    ``attach`` registers hooks and returns their handles; the hooks accumulate into
    ``self``; ``result`` returns what methods read. Keep results small: per-layer
    vectors and matrices, or capped token samples.
    """

    name: ClassVar[str]
    #: its hooks look at one decoder layer at a time, so a layer-by-layer pass over a streamed
    #: checkpoint (:class:`moebench.checkpoint.LayerStream`) gives the same result as a full one
    streamable: ClassVar[bool] = False

    def __init__(self, model: "MoEModel", seed: int = 0):
        self.model = model
        self.seed = seed

    def attach(self) -> list:
        raise NotImplementedError

    def result(self) -> Any:
        raise NotImplementedError


def check_streamable(names) -> None:
    """A one-line error naming the statistics a layer-by-layer pass cannot gather (they relate several layers)."""
    from .errors import MoebenchError
    from .plugins import host

    refused = [n for n in names if not host().statistic(n).streamable]
    if refused:
        able = sorted(n for n, cls in host().statistics.items() if cls.streamable)
        raise MoebenchError(
            f"statistics {', '.join(refused)} relate several layers within one pass, so a model streamed layer by layer "
            f"([model] offload, checkpoint streaming) cannot gather them; streamable statistics: {', '.join(able)}"
        )


def hidden_in(args, kwargs) -> torch.Tensor:
    """The hidden states a module's forward pre-hook or hook received (first positional or ``hidden_states``)."""
    return args[0] if args else kwargs["hidden_states"]


class RouterStatistic(Statistic):
    """Base for statistics read off each MoE router's output: implement ``update(layer, block,
    logits, weights, indices)`` (the adapter's routing decision, detached) and ``result``."""

    def attach(self) -> list:
        handles = []
        for block in self.model.blocks():
            def hook(module, args, output, layer=block.layer, block=block):
                logits, weights, indices = self.model.adapter.route(output)
                self.update(layer, block, logits.detach(), weights.detach(), indices.detach())

            handles.append(block.router.register_forward_hook(hook))
        return handles

    def update(self, layer: int, block, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
        raise NotImplementedError


@dataclass
class CalibrationSpec:
    """Which text calibrates: ``data`` spec, number of windows, window length, seed."""

    data: str = "embedded:prose"
    samples: int = 32
    seqlen: int = 256
    seed: int = 0
    batch_size: int = 8

    def key(self) -> dict:
        return {"data": self.data, "samples": self.samples, "seqlen": self.seqlen, "seed": self.seed}


@dataclass
class Calibration:
    """Calibration data plus a two-level (memory, disk) cache of statistics."""

    spec: CalibrationSpec
    cache: bool = True
    #: what happened, for the run's log and record: passes run, statistics computed and reused
    passes: int = 0
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    _memory: dict[str, Any] = field(default_factory=dict)
    _windows: dict[int, torch.Tensor] = field(default_factory=dict)

    def windows(self, tokenizer) -> torch.Tensor:
        """The calibration token windows ``[samples, seqlen]`` (train split, seeded; large splits sampled by document)."""
        key = id(tokenizer)
        if key not in self._windows:
            self._windows[key] = calibration_windows(self.spec.data, tokenizer, self.spec.seqlen, self.spec.samples, self.spec.seed)
        return self._windows[key]

    def stats(self, model: "MoEModel", names) -> dict[str, Any]:
        """The named statistics for the model as it is now; computes all missing ones in one pass."""
        names = list(dict.fromkeys(names))
        out, missing = {}, []
        for name in names:
            key = self._key(model, name)
            if key in self._memory:
                out[name] = self._memory[key]
            elif self.cache and self._path(key).exists():
                out[name] = self._memory[key] = torch.load(self._path(key), weights_only=True)
                self.reused.append(name)
            else:
                missing.append(name)
        if missing:
            fresh = self.run(model, missing)
            for name, value in fresh.items():
                key = self._key(model, name)
                self._memory[key] = out[name] = value
                if self.cache:
                    _atomic_save(value, self._path(key))
            self.computed.extend(missing)
        return out

    def run(self, model: "MoEModel", names: list[str]) -> dict[str, Any]:
        """One forward pass over the calibration windows with every named statistic attached."""
        from .plugins import host
        from .progress import progress_bar

        if getattr(model, "stream", None) is not None:
            check_streamable(names)
        collectors = [host().statistic(n)(model, seed=self.spec.seed) for n in names]
        handles = [h for c in collectors for h in c.attach()]
        windows = self.windows(model.tokenizer)
        try:
            if getattr(model, "stream", None) is not None:  # [model] offload: the layer loop, one layer in memory
                from .sequential import forward_layers

                forward_layers(model, windows, self.spec.batch_size)
            else:
                with progress_bar(f"calibration ({', '.join(names)})", len(windows)) as advance:
                    for n in forward_windows(model.model, windows, self.spec.batch_size, model.device):
                        advance(n)
        finally:
            for h in handles:
                h.remove()
        self.passes += 1
        return {c.name: c.result() for c in collectors}

    def for_data(self, data: str) -> "Calibration":
        """The same calibration settings on other text (e.g. one PreMoe task's): its statistics are
        cached under their own keys, and what it computes or reuses is counted here too."""
        from dataclasses import replace

        other = Calibration(replace(self.spec, data=data), cache=self.cache)
        other.computed, other.reused = self.computed, self.reused  # one summary for the run
        return other

    def _key(self, model: "MoEModel", name: str) -> str:
        blob = json.dumps({"model": model.identity, "edits": model.lineage, "data": self.spec.key(), "stat": name}, sort_keys=True)
        return f"{name}-{hashlib.sha1(blob.encode()).hexdigest()[:20]}"

    def _path(self, key: str):
        return paths.cache_dir("calibration") / f"{key}.pt"

    def summary(self) -> dict[str, Any]:
        return {"passes": self.passes, "computed": sorted(set(self.computed)), "reused": sorted(set(self.reused))}


def _atomic_save(value: Any, path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(value, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
