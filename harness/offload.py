"""Models larger than memory: ``[model] offload = "disk"`` streams decoder layers from the checkpoint.

With offload the model is never loaded whole. It is built on the meta device
(:class:`moebench.checkpoint.LayerStream`): embeddings, final norm and head are read
into memory, every decoder layer stays on ``meta`` until its turn. The one layer loop
(:class:`moebench.sequential.Sequential`) then, for each decoder layer:

1. reads the layer from the checkpoint (:meth:`DiskOffload.load`),
2. runs it on the held hidden states of the calibration (or evaluation) tokens, with
   whatever hooks a method or a statistic attached, and lets a method compress it,
3. writes it to the step's output checkpoint, one safetensors shard per layer, and drops
   it back to ``meta`` (:meth:`DiskOffload.done`).

So peak memory is one decoder layer, the embeddings and the head, the hidden states of
the tokens and a method's statistics of one layer: flat in depth. Layer-sequential
methods (WANDA, SparseGPT, GPTQ, AWQ, MoEQuant, and the data-free magnitude and RTN),
calibration statistics that look at one layer at a time, and perplexity run this way;
anything else is refused up front (:func:`refusal`). This is llm-compressor's
sequential pipeline (one layer's weights on the device, the next layer's inputs kept as
a cache of hidden states) with accelerate's disk offload as the weight store, except
that weights are read from and written to plain safetensors checkpoints.

Each step's output is a checkpoint folder (shards ``model-0000k-of-0000n.safetensors``,
``model.safetensors.index.json``, ``config.json`` with ``config.moebench`` when the
method changed the structure, e.g. packed int4 experts, and the tokenizer) that
:func:`moebench.models.load_pretrained` loads back, and plain transformers too when no
moebench structure is recorded. Weights keep the in-memory (packed experts) names.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import paths
from .errors import MoebenchError

if TYPE_CHECKING:
    from .adapter import MoEModel
    from .checkpoint import LayerStream

#: values of ``[model] offload``
MODES = ("disk",)


class DiskOffload:
    """Where a streamed model's decoder layers come from and, during a compression step, go to.

    ``model.stream`` of a model opened with :func:`open_model`. Outside a step, layers are
    only read (statistics, perplexity); between :meth:`begin` and :meth:`end` each layer
    :meth:`done` with is also written to the step's output folder, which then becomes the
    source of the next step and of the metrics.
    """

    def __init__(self, reader: "LayerStream"):
        self.reader = reader
        self.model = reader.model
        self.out: Path | None = None
        self.written: set[int] = set()
        self._weight_map: dict[str, str] = {}
        self._total = 0
        #: folders this offload wrote and removes when closed (intermediate and unsaved outputs)
        self._owned: list[Path] = []

    @property
    def source(self) -> Path:
        """The checkpoint the layers are read from now."""
        return self.reader.path

    @property
    def layers(self) -> int:
        return len(self.reader.layers)

    # -- one layer ---------------------------------------------------------------------
    def load(self, i: int) -> None:
        """Read decoder layer ``i`` into memory."""
        self.reader.load_layer(i)

    def done(self, i: int) -> None:
        """Layer ``i`` is finished: written to the step's output (during a step), then dropped to ``meta``."""
        if self.out is not None:
            self._write_layer(i)
        self.reader.free_layer(i)
        self.reader.ckpt.release()  # the file's mapped pages stop counting as this process's memory
        trim()

    def _shard(self, k: int) -> str:
        return f"model-{k:05d}-of-{self.layers + 1:05d}.safetensors"

    def _write_layer(self, i: int) -> None:
        prefix = self.reader.layer_prefix(i)
        state = {prefix + k: v.detach().contiguous() for k, v in self.reader.layers[i].state_dict().items()}
        self._save(state, self._shard(i + 1))
        self.written.add(i)

    def _save(self, state: dict[str, torch.Tensor], file: str) -> None:
        from safetensors.torch import save_file

        meta = [k for k, v in state.items() if v.is_meta]
        if meta:
            raise MoebenchError(f"offload: {meta[0]!r} is not in memory when its layer is written (was the layer loaded?)")
        save_file({k: v.cpu() for k, v in state.items()}, str(self.out / file), metadata={"format": "pt"})
        self._weight_map.update(dict.fromkeys(state, file))
        self._total += sum(v.numel() * v.element_size() for v in state.values())

    # -- one compression step -------------------------------------------------------------
    def begin(self, folder: Path | None = None) -> Path:
        """Start writing a step's output to ``folder`` (a fresh folder under the cache when None, removed on :meth:`close`)."""
        if folder is None:
            folder = Path(tempfile.mkdtemp(prefix="stream-", dir=paths.cache_dir("offload")))
            self._owned.append(folder)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.out, self.written, self._weight_map, self._total = folder, set(), {}, 0
        return folder

    def end(self, method: str) -> Path:
        """Finish the step: every layer must have been written; the head, index, config and tokenizer are
        written, and the output becomes the source of what follows."""
        out = self.out
        if out is None:
            raise MoebenchError("offload: no step is being written")
        try:
            missing = sorted(set(range(self.layers)) - self.written)
            if missing:
                raise MoebenchError(
                    f"method {method!r} did not stream decoder layers {missing[:5]} through the layer loop; "
                    "with [model] offload = 'disk' a method must compress one layer at a time (ctx.sequential)"
                )
            prefixes = tuple(self.reader.layer_prefix(i) for i in range(self.layers))
            tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
            outer = {k: v for k, v in self.model.model.state_dict().items()
                     if not k.startswith(prefixes) and not (tied and k == "lm_head.weight")}
            self._save(outer, self._shard(self.layers + 1))
            index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(self._weight_map.items()))}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
            write_config(self.model, out)
        finally:
            self.out = None
        previous = self.source
        self.reader.reopen(out)
        if previous in self._owned:  # an intermediate output nothing reads any more
            self._owned.remove(previous)
            shutil.rmtree(previous, ignore_errors=True)
        return out

    def keep(self, folder) -> Path:
        """Move the last step's output (the current source) to ``folder`` (``--save-models``), files replaced one by one."""
        current, folder = self.source, Path(folder)
        if current == folder:
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        for file in sorted(current.iterdir()):
            shutil.move(str(file), str(folder / file.name))
        if current in self._owned:
            self._owned.remove(current)
            shutil.rmtree(current, ignore_errors=True)
        self.reader.reopen(folder)
        return folder

    def abort(self) -> None:
        """A step failed: stop writing (its partial output is removed with the others on :meth:`close`)."""
        self.out = None

    def close(self) -> None:
        """Remove the folders this offload wrote that nobody asked to keep."""
        for folder in self._owned:
            shutil.rmtree(folder, ignore_errors=True)
        self._owned.clear()


def trim() -> None:
    """Hand the heap memory a dropped layer leaves free back to the system (glibc's ``malloc_trim``).

    A layer's smaller tensors (norms, attention projections below the mmap threshold) are
    served from the heap, and glibc keeps freed heap pages: without this, each streamed
    layer leaves tens of MiB behind and the peak creeps up with depth. Elsewhere a no-op.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def write_config(model: "MoEModel", folder: Path) -> str:
    """The config (with ``config.moebench`` when the structure needs moebench's loader) and tokenizer; returns the format."""
    from .saved import refuse_plain_loaders

    own = model.needs_moebench_loader()
    model.config.save_pretrained(folder)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(folder)
    if own:
        refuse_plain_loaders(folder, model.config.model_type)
    model.saved_format = "moebench" if own else "transformers"
    return model.saved_format


def open_model(path, *, dtype: str = "float32", device: str = "cpu", source: str | None = None) -> "MoEModel":
    """The model of checkpoint ``path`` with embeddings, final norm and head in memory and every decoder layer
    on ``meta``, read layer by layer through ``model.stream`` (a :class:`DiskOffload`).

    ``source`` (the suite's model source) names it in cache keys as :func:`moebench.models.load` does, so
    statistics cached for the in-memory model are reused.
    """
    from .checkpoint import LayerStream
    from .models import fingerprint

    path = Path(path)
    identity = f"{source}@{fingerprint(path)}" if source else None
    reader = LayerStream(path, dtype=dtype, device=device, head=True, identity=identity)
    model = reader.model
    model.source = source or str(path)
    model.stream = DiskOffload(reader)
    return model


@torch.no_grad()
def logits(model: "MoEModel", hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on the last decoder layer's output (final norm, then ``lm_head``)."""
    inner = getattr(model.model, "model", model.model)
    norm = getattr(inner, "norm", None)
    if norm is not None:
        hidden = norm(hidden)
    return model.model.get_output_embeddings()(hidden)


def refusal(suite) -> tuple[str, str] | None:
    """``(field, message)`` for the first part of ``suite`` that cannot run with offload, or None.

    Every method step must stream (:meth:`moebench.method.Method.streaming`), every
    evaluation must be a metric that runs streamed (``Metric.streams``), and the model
    must sit on one device (``device = "auto"`` is accelerate's own offload).
    """
    from .plugins import host

    if suite.model.device == "auto":
        return "model.offload", "offload = 'disk' streams layers itself; expected model.device = 'cpu' or 'cuda', not 'auto'"
    for name in suite.evals:
        if not host().metric(name).streams:
            able = sorted(n for n, cls in host().metrics.items() if cls.streams and not cls.always)
            return f"eval.{name}", f"metric {name!r} needs the whole model in memory; with [model] offload = 'disk' the evaluations are: {', '.join(able)}"
    for i, entry in enumerate(suite.methods):
        for run in entry["runs"]:
            for step in run.pipeline:
                why = host().method(step.method)().streaming(step.params)
                if why:
                    return f"methods[{i}]", f"method {step.method!r} cannot run with [model] offload = 'disk': {why}"
    return None
