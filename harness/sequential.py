"""Layer-sequential calibration: compress one decoder layer at a time on the inputs the
already-compressed layers before it produce.

The calibration windows enter decoder layer 0 (everything each layer is called with,
masks and rotary embeddings included, is captured once); then, layer by layer, hooks
gather what a method asked for about the weights it targets, the method compresses the
layer, and the layer is run again to turn its inputs into the next layer's inputs, in
place. Only one layer's activations are held at any time, so memory does not grow with
depth; the peak is recorded. Usage::

    run = Sequential(model, windows, targets=["experts"], collect={"sq"})
    for step in run:                       # one decoder layer
        for group in step.groups:          # weights compressed together
            group.write(prune(group.weight, group.stats.sq))
    run.summary()                          # layers, tokens, peak memory

Routed experts are seen through the experts module's call
``(hidden_states, top_k_index, top_k_weights)``: each expert's statistics use only the
tokens routed to it, and with ``router_weighted`` each token's input is scaled by its
routing weight (the MoE-Pruner rule; it makes the statistics describe the expert's
contribution to the block output). The input of an expert's ``down`` matrix is that
expert's ``act(gate x) * up x``.
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter import MoEModel
from .forward import StopForward, forward_windows
from .errors import MoebenchError

#: module kinds a method can target
KINDS = ("experts", "shared", "attention", "dense")
#: how many slices :meth:`Group.chunks` cuts a layer's experts into (float32 temporaries: 1/CHUNKS of them)
CHUNKS = 8
#: statistics a method can ask for, per input channel of each targeted matrix
COLLECT = ("sq", "abs", "hessian", "samples", "calls")


def check_targets(targets: Iterable[str]) -> None:
    """``ValueError`` naming a module kind that does not exist, or an empty selection."""
    targets = list(targets)
    if not targets:
        raise ValueError(f"targets must name at least one of {', '.join(KINDS)}")
    for t in targets:
        if t not in KINDS:
            raise ValueError(f"targets: unknown module kind {t!r}; expected some of {', '.join(KINDS)}")


# -- what is compressed -------------------------------------------------------------------
@dataclass
class Stats:
    """Per-input-channel statistics of a group's inputs (each row weighted as configured).

    ``sq [B, cols]``: sum of squared inputs (WANDA's ``||X_j||^2``); ``abs [B, cols]``: sum
    of absolute inputs; ``hessian [B, cols, cols]``: ``X^T X``; ``samples``: up to
    ``max_samples`` input rows per matrix; ``tokens [B]``: rows seen per matrix;
    ``calls`` (a routed-experts group only): up to ``max_samples`` rows of the experts
    module's own input, unweighted, each with its ``top_k_index`` and ``top_k_weights``
    (what a search on the whole block's output needs, as AWQ's).
    """

    cols: int
    tokens: torch.Tensor
    sq: torch.Tensor | None = None
    abs: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    samples: list[list[torch.Tensor]] | None = None
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def empty(cls, batch: int, cols: int, collect: set[str], device) -> "Stats":
        zeros = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
        return cls(
            cols=cols,
            tokens=torch.zeros(batch, dtype=torch.long, device=device),
            sq=zeros(batch, cols) if "sq" in collect else None,
            abs=zeros(batch, cols) if "abs" in collect else None,
            hessian=zeros(batch, cols, cols) if "hessian" in collect else None,
            samples=[[] for _ in range(batch)] if "samples" in collect else None,
            calls=[] if "calls" in collect else None,
        )

    def add(self, b: int, x: torch.Tensor, cap: int) -> None:
        """Accumulate input rows ``x [n, cols]`` (already weighted) into matrix ``b``; keep at most ``cap`` samples of them."""
        self.tokens[b] += x.shape[0]
        if self.sq is not None:
            self.sq[b] += x.pow(2).sum(0)
        if self.abs is not None:
            self.abs[b] += x.abs().sum(0)
        if self.hessian is not None:
            self.hessian[b] += x.T @ x
        if self.samples is not None and cap > 0:
            self.samples[b].append(x[:: max(1, math.ceil(x.shape[0] / cap))][:cap].clone())

    def routed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kept experts-module inputs ``(hidden [n, cols], top_k_index [n, k], top_k_weights [n, k])``."""
        parts = self.calls or []
        if not parts:
            raise ValueError("no experts-module inputs were kept (collect 'calls')")
        return tuple(torch.cat(t) for t in zip(*parts))

    def sample(self, b: int) -> torch.Tensor:
        """The kept input rows of matrix ``b`` ``[n, cols]`` (``n`` may be 0)."""
        chunks = self.samples[b] if self.samples is not None else []
        return torch.cat(chunks) if chunks else torch.zeros(0, self.cols, device=self.tokens.device)

    def nbytes(self) -> int:
        tensors = [t for t in (self.tokens, self.sq, self.abs, self.hessian) if t is not None]
        tensors += [c for chunks in (self.samples or []) for c in chunks]
        tensors += [t for call in (self.calls or []) for t in call]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Group:
    """Weight matrices compressed together: one Linear (``B = 1``) or one packed tensor of a block's experts.

    ``weight`` is ``[B, rows, cols]`` with inputs along ``cols``: ``gate_up_proj``
    ``[E, 2I, H]`` (gate and up rows share the input) or ``down_proj`` ``[E, H, I]``.
    """

    name: str  # module path plus tensor, e.g. "model.layers.1.mlp.experts.gate_up_proj"
    kind: str  # one of KINDS
    layer: int
    module: nn.Module
    attr: str  # "weight" (Linear), "gate_up_proj" or "down_proj"
    stats: Stats | None = None
    #: routed experts only: the slice of the layer's experts this group holds (``expert_chunk``; None: all)
    experts: slice | None = None
    #: statistics gathered only when the group's turn comes (:meth:`LayerStep.sequential`), so the
    #: Hessians of one slice of experts are held at a time instead of the whole layer's
    deferred: bool = False

    @property
    def weight(self) -> torch.Tensor:
        w = getattr(self.module, self.attr).data
        if self.attr == "weight":
            return w.unsqueeze(0)
        return w if self.experts is None else w[self.experts]  # a view: writes reach the layer

    @property
    def path(self) -> str:
        """Path of the module that holds the weight (what :meth:`MoEModel.replace_module` takes)."""
        return self.name.rsplit(".", 1)[0] if self.attr != "weight" else self.name

    def write(self, new: torch.Tensor) -> None:
        """Store new values ``[B, rows, cols]`` in place (same shape, the parameter's dtype)."""
        self.weight.copy_(new.to(self.weight.dtype).reshape(self.weight.shape))

    def chunks(self, count: int = CHUNKS) -> Iterator[slice]:
        """Slices of the stacked matrices, at most ``count`` of them: a method that works on one slice at a
        time holds float32 copies of ``1/count`` of a layer's experts, never of all of them."""
        n = self.weight.shape[0]
        size = max(1, math.ceil(n / count))
        for i in range(0, n, size):
            yield slice(i, min(i + size, n))


def split_experts(groups: list[Group], size: int, staged: bool = True) -> list[Group]:
    """The routed-experts groups cut into slices of at most ``size`` experts, every slice after the first
    deferred: a layer's experts are then gathered and solved ``size`` at a time (DeepSeek-V3: 256 experts
    of 7168-wide inputs are 52 GB of float32 Hessians at once, 3.3 GB in slices of 16).

    Staged: every gate_up slice, then every down slice (down's statistics follow the written gate_up).
    Not staged: gate_up and down of one slice after the other, gathered together before either is written,
    which gives each slice the statistics of the unmodified layer."""
    out: list[Group] = []
    for g in groups:
        n = g.weight.shape[0]
        if g.attr == "weight" or n <= size:
            out.append(g)
            continue
        for k, start in enumerate(range(0, n, size)):
            out.append(Group(g.name, g.kind, g.layer, g.module, g.attr, experts=slice(start, min(start + size, n)), deferred=k > 0))
    if not staged:  # stable: non-expert groups keep their places, slices of one module interleave by first expert
        slices = [g for g in out if g.experts is not None]
        ordered = iter(sorted(slices, key=lambda g: (id(g.module), g.experts.start)))
        out = [next(ordered) if g.experts is not None else g for g in out]
    return out


def due(groups: list[Group]) -> list[Group]:
    """Of ``groups`` (the rest of a layer, in order), those whose statistics a gather fills now: all but
    deferred expert slices, of which only the first pending one per matrix (at most one per experts tensor)."""
    out, seen = [], set()
    for g in groups:
        key = (id(g.module), g.attr)
        if g.experts is not None:
            if key in seen:
                continue
            seen.add(key)
        out.append(g)
    return out


def find_groups(model: MoEModel, layer: int, targets: Iterable[str]) -> list[Group]:
    """The groups of decoder ``layer`` for the module kinds ``targets``, in execution order."""
    targets = set(targets)
    module = model.layers[layer]
    names = {id(m): n for n, m in model.model.named_modules()}
    block = model.block(layer)
    mlp = block.module if block is not None else getattr(module, "mlp", None)
    groups: list[Group] = []

    def linears(root: nn.Module | None, kind: str, skip: nn.Module | None = None) -> None:
        if root is None or kind not in targets:
            return
        inside_skip = {id(m) for m in skip.modules()} if skip is not None else set()
        for m in root.modules():
            if isinstance(m, nn.Linear) and id(m) not in inside_skip:
                groups.append(Group(names[id(m)], kind, layer, m, "weight"))

    linears(module, "attention", skip=mlp)
    if block is None:
        linears(mlp, "dense")
        return groups
    if "experts" in targets:
        experts = block.experts
        if not isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter):
            raise MoebenchError(
                f"layer {layer}: experts are stored as {type(experts).__name__}; prune or quantize before storing them quantized"
            )
        path = names[id(experts)]
        groups += [Group(f"{path}.gate_up_proj", "experts", layer, experts, "gate_up_proj"),
                   Group(f"{path}.down_proj", "experts", layer, experts, "down_proj")]
    linears(block.shared, "shared")
    return groups


# -- the pass -----------------------------------------------------------------------------
@dataclass
class LayerStep:
    """One decoder layer during the pass: its index, module, and the groups to compress.

    ``stage[name]`` keys the groups that read the same input tensor (q/k/v; an expert
    block's ``gate_up``); a group's statistics go stale when a group of another stage
    before it is rewritten. :meth:`refresh` gathers them again from the layer as it is
    now, which is what GPTQ's "true sequential" order needs.
    """

    index: int
    layer: nn.Module
    groups: list[Group] = field(default_factory=list)
    stage: dict[str, tuple] = field(default_factory=dict)
    gather: Callable[[list[Group]], None] | None = None
    #: False (expert slices in the reference order, not staged): statistics come from the layer as it was before
    #: any group was written; :meth:`sequential` then only gathers deferred slices (gate_up and down of a slice
    #: together) and never refreshes a stale stage
    refresh_stale: bool = True

    def refresh(self, groups: list[Group]) -> None:
        """Re-collect the statistics of ``groups`` by running the layer again on its held inputs."""
        if groups and self.gather is not None:
            self.gather(groups)

    def sequential(self) -> Iterator[Group]:
        """The groups in order, each with statistics gathered after every earlier stage was written.

        The reference's "true sequential" order (GPTQ's ``--true-sequential``; AutoGPTQ's
        ``inside_layer_modules``): q/k/v, then o on the quantized q/k/v, then gate/up, then
        down on the quantized gate/up. One extra layer run per stage after the first.
        """
        current = None
        for i, group in enumerate(self.groups):
            stage = self.stage.get(group.name, i)
            if group.stats is None or (self.refresh_stale and current is not None and stage != current):
                self.refresh(due(self.groups[i:]))
                stage = self.stage.get(group.name, i)
            current = stage
            yield group
            group.stats = None  # solved: its statistics are not needed again


class Sequential:
    """Iterate over decoder layers, each with statistics of its targets on the compressed model's own inputs.

    ``collect`` names what the groups need (``COLLECT``). ``max_samples`` caps the kept
    input rows per matrix (for ``samples``). With ``staged`` the experts' ``down_proj``
    statistics are left to :meth:`LayerStep.sequential` (true-sequential methods). After each step's body the layer is re-run
    (as the method left it) to produce the next layer's inputs.

    Within a step whose groups are all routed experts, the experts module's inputs recorded by the
    first gather serve the later ones (down_proj after gate/up, further expert slices): a method may
    write the grouped weights between gathers, nothing upstream of the experts.
    """

    #: reuse the experts' inputs within an experts-only step (off: every gather runs the layer, for tests)
    reuse_expert_inputs = True

    def __init__(
        self,
        model: MoEModel,
        windows: torch.Tensor,
        targets: Iterable[str] = ("experts",),
        collect: Iterable[str] = ("sq",),
        batch_size: int = 8,
        router_weighted: bool = True,
        max_samples: int = 2048,
        staged: bool = False,
        weight_power: float = 1.0,
        through: bool = False,
        expert_chunk: int | None = None,
    ):
        self.model = model
        self.windows = windows
        self.targets = list(targets)
        self.collect = set(collect)
        unknown = self.collect - set(COLLECT)
        if unknown:
            raise ValueError(f"collect: unknown statistics {sorted(unknown)}; expected some of {', '.join(COLLECT)}")
        if self.targets or not through:
            check_targets(self.targets)
        #: run the last layer too and keep its outputs in :attr:`outputs` (a forward pass, layer by layer)
        self.through = through
        self.outputs: list[torch.Tensor] = []
        #: routed experts gathered and solved this many at a time (:func:`split_experts`); the method iterates
        #: :meth:`LayerStep.sequential`, which gathers each deferred slice when its turn comes
        self.expert_chunk = expert_chunk
        if expert_chunk is not None and expert_chunk < 1:
            raise ValueError(f"expert_chunk must be a positive number of experts, got {expert_chunk}")
        self.batch_size = max(1, batch_size)
        self.router_weighted = router_weighted
        #: a routed token's input is scaled by ``weight ** weight_power`` (0.5: Hessians weighted by the weight itself, MoEQuant)
        self.weight_power = weight_power
        self.max_samples = max_samples
        self.staged = staged
        self.device = model.device
        self._hidden: list[torch.Tensor] = []
        self._calls: list[list[tuple[tuple, dict]]] = []  # per batch, per layer: (extra args, kwargs)
        self.memory = {"activation_bytes": 0, "peak_stats_bytes": 0, "peak_tracked_bytes": 0}
        self.layers_done = 0
        self.tokens = int(windows.numel())
        self.experts_without_tokens = 0
        self._counted: set[tuple] = set()  # (layer, group name, first expert) whose experts without tokens were counted
        #: the experts module's inputs per batch, kept by the current layer's first experts-only gather
        self._expert_inputs: dict[int, list[tuple]] = {}

    @property
    def inputs(self) -> list[torch.Tensor]:
        """The held inputs of the current layer, one ``[batch, seqlen, hidden]`` tensor per batch."""
        return self._hidden

    # the capture: layer 0's inputs and every layer's call arguments, for each batch
    @torch.no_grad()
    def _capture(self) -> None:
        layers = self.model.layers
        last = len(layers) - 1
        saved = [layer.__dict__.get("forward") for layer in layers]
        current: dict = {}

        def recorder(i: int):
            def forward(*args, **kwargs):
                hidden = args[0] if args else kwargs.pop("hidden_states")
                if i == 0:
                    current["hidden"] = hidden
                current["calls"].append((tuple(args[1:]), kwargs))
                if i == last:
                    raise StopForward
                return hidden

            return forward

        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        try:
            current["calls"] = []
            for _ in forward_windows(self.model.model, self.windows, self.batch_size, self.device):
                self._hidden.append(current["hidden"])
                self._calls.append(current["calls"])
                current.clear()
                current["calls"] = []
        finally:
            for layer, old in zip(layers, saved):
                if old is None:
                    del layer.forward
                else:
                    layer.forward = old
        self.memory["activation_bytes"] = sum(h.numel() * h.element_size() for h in self._hidden)

    def _run_layer(self, i: int, b: int) -> torch.Tensor:
        args, kwargs = self._calls[b][i]
        out = self.model.layers[i](self._hidden[b], *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def _gather(self, step: LayerStep, groups: list[Group] | None = None) -> None:
        """Run layer ``step.index`` over the held inputs with hooks filling the statistics of ``groups`` (all by default)."""
        groups = step.groups if groups is None else groups
        handles = []
        cap = math.ceil(self.max_samples / max(1, len(self._hidden)))
        experts_groups: dict[int, list[Group]] = {}
        inputs: list[torch.Tensor] = []  # the first batch's Linear inputs, kept alive so their ids stay unique
        for g in groups:
            w = g.weight
            g.stats = Stats.empty(w.shape[0], w.shape[-1], self.collect, w.device)
            if g.attr == "weight":
                def pre(module, args, g=g):
                    if g.name not in step.stage:  # first batch: Linears called on one tensor share a stage
                        k = next((i for i, t in enumerate(inputs) if t is args[0]), None)
                        if k is None:
                            inputs.append(args[0])
                            k = len(inputs) - 1
                        step.stage[g.name] = ("input", k)
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                    g.stats.add(0, x, cap)

                handles.append(g.module.register_forward_pre_hook(pre))
            else:
                experts_groups.setdefault(id(g.module), []).append(g)
                step.stage.setdefault(g.name, ("experts", id(g.module), g.attr))
        # A step whose groups are all routed experts changes nothing upstream of the experts between its gathers
        # (only expert weights are written), so the experts' inputs of the first gather serve every later one:
        # expert slices (expert_chunk) and staged down_proj cost no further layer runs.
        reuse = self.reuse_expert_inputs and len(experts_groups) == 1 and all(g.attr != "weight" for g in step.groups)
        keep = reuse and (self.staged or self.expert_chunk is not None)
        held = self._expert_inputs.get(step.index) if reuse else None
        if held is not None:
            (gs,) = experts_groups.values()
            hook = self._experts_hook(gs, cap)
            for args, kwargs in held:
                hook(gs[0].module, args, kwargs)
        else:
            record: list[tuple] = []
            for gs in experts_groups.values():
                hook = self._experts_hook(gs, cap)

                def pre(module, args, kwargs, hook=hook):
                    hook(module, args, kwargs)
                    if reuse:  # the rest of the layer is not needed for statistics
                        if keep:  # for the step's later gathers (only staged or sliced steps have any)
                            record.append((args, kwargs))
                        raise StopForward

                handles.append(gs[0].module.register_forward_pre_hook(pre, with_kwargs=True))
            try:
                for b in range(len(self._hidden)):
                    try:
                        self._run_layer(step.index, b)
                    except StopForward:
                        pass
            finally:
                for h in handles:
                    h.remove()
                inputs.clear()
            if keep:
                self._expert_inputs = {step.index: record}
        for g in groups:  # counted at a slice's first gather (deferred slices included), not again when re-gathered
            key = (step.index, g.name, g.experts.start if g.experts is not None else 0)
            if g.attr == "gate_up_proj" and key not in self._counted:
                self._counted.add(key)
                self.experts_without_tokens += int((g.stats.tokens == 0).sum())
        stats_bytes = sum(g.stats.nbytes() for g in step.groups if g.stats is not None)
        batch_bytes = max(h.numel() * h.element_size() for h in self._hidden)
        held_bytes = sum(t.numel() * t.element_size() for args, kwargs in self._expert_inputs.get(step.index, ())
                         for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor))
        self.memory["peak_stats_bytes"] = max(self.memory["peak_stats_bytes"], stats_bytes)
        tracked = sum(h.numel() * h.element_size() for h in self._hidden) + stats_bytes + batch_bytes + held_bytes
        self.memory["peak_tracked_bytes"] = max(self.memory["peak_tracked_bytes"], tracked)

    def _experts_hook(self, groups: list[Group], cap: int):
        by_attr = {g.attr: g for g in groups}
        experts = groups[0].module
        weighted = self.router_weighted
        count = experts.gate_up_proj.shape[0]
        # which experts each matrix's statistics cover ([start, stop): a slice with expert_chunk) and the union
        spans = {a: (g.experts.start, g.experts.stop) if g.experts is not None else (0, count) for a, g in by_attr.items()}
        first, last = min(a for a, _ in spans.values()), max(b for _, b in spans.values())

        def pre(module, args, kwargs):
            values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
            hidden, index, weights = values[:3]
            hidden = hidden.detach().reshape(-1, hidden.shape[-1])
            calls = by_attr.get("gate_up_proj") and by_attr["gate_up_proj"].stats.calls
            if calls is not None and cap > 0:
                rows = slice(None, None, max(1, math.ceil(hidden.shape[0] / cap)))
                calls.append((hidden[rows][:cap].float(), index[rows][:cap].clone(), weights[rows][:cap].detach().float()))
            for e in range(first, last):
                tok, pos = torch.where(index == e)
                if tok.numel() == 0:
                    continue
                x = hidden[tok].float()
                scale = weights[tok, pos].detach().float()[:, None] ** self.weight_power if weighted else None
                lo, hi = spans.get("gate_up_proj", (0, 0))
                if lo <= e < hi:
                    by_attr["gate_up_proj"].stats.add(e - lo, x * scale if weighted else x, cap)
                lo, hi = spans.get("down_proj", (0, 0))
                if lo <= e < hi:
                    gate, up = nn.functional.linear(x, experts.gate_up_proj[e].float()).chunk(2, dim=-1)
                    h = experts.act_fn(gate) * up
                    by_attr["down_proj"].stats.add(e - lo, h * scale if weighted else h, cap)

        return pre

    @torch.no_grad()
    def _advance(self, i: int) -> None:
        """Replace the held inputs of layer ``i`` by its outputs, batch by batch."""
        for b in range(len(self._hidden)):
            self._hidden[b] = self._run_layer(i, b)

    def __iter__(self) -> Iterator[LayerStep]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._capture()
        stream = getattr(self.model, "stream", None)  # [model] offload: layers read and written one at a time
        try:
            for i, layer in enumerate(self.model.layers):
                if stream is not None:
                    stream.load(i)
                groups = find_groups(self.model, i, self.targets) if self.targets else []
                if groups and self.expert_chunk is not None:
                    groups = split_experts(groups, self.expert_chunk, self.staged)
                if groups:
                    step = LayerStep(i, layer, groups, refresh_stale=self.staged or self.expert_chunk is None)
                    step.gather = lambda gs, step=step: self._gather(step, gs)
                    # staged: down_proj's statistics wait for LayerStep.sequential(), so both Hessians are never held at once
                    self._gather(step, [g for g in groups if not (self.staged and g.attr == "down_proj") and not g.deferred])
                    yield step
                    for g in groups:
                        g.stats = None  # free this layer's statistics before the next
                    self._expert_inputs = {}
                if self.through or i < len(self.model.layers) - 1:  # the last layer's outputs feed nothing here
                    self._advance(i)
                if stream is not None:
                    stream.done(i)
                self.layers_done += 1
            if self.through:
                self.outputs = list(self._hidden)
        finally:
            self._hidden.clear()
            self._calls.clear()

    def summary(self) -> dict:
        """What the pass held and saw: layers, tokens, activation bytes, peak tracked/process/CUDA memory."""
        out = {
            "layers": self.layers_done,
            "tokens": self.tokens,
            "router_weighted": self.router_weighted,
            "experts_without_tokens": self.experts_without_tokens,
            **self.memory,
            "process_peak_rss_bytes": peak_rss_bytes(),
        }
        if self.device.type == "cuda":
            out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return out


@torch.no_grad()
def forward_layers(model: MoEModel, windows: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """``windows [n, seqlen]`` through every decoder layer, one layer at a time; the last layer's outputs per batch.

    The same loop as a compression pass (:class:`Sequential` with nothing to compress), so
    a model streamed from disk (``model.stream``) holds one layer at a time: calibration
    statistics hook into it, and a streamed perplexity puts the head on its outputs.
    """
    run = Sequential(model, windows, targets=(), collect=(), batch_size=batch_size, through=True)
    for _ in run:
        pass
    return run.outputs


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (a high-water mark; bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def from_context(model: MoEModel, ctx, method: str, **kwargs) -> Sequential:
    """A :class:`Sequential` pass over the suite's calibration windows: ``ctx.sequential`` (kept for callers of this name)."""
    return ctx.sequential(model, method, **kwargs)


def static_steps(model: MoEModel, targets: Iterable[str]) -> Iterator[LayerStep]:
    """The layers' groups without calibration (for data-free methods: magnitude, RTN, bitsandbytes).

    A streamed model (``model.stream``) has each layer read before its step and written after it."""
    check_targets(targets)
    stream = getattr(model, "stream", None)
    for i, layer in enumerate(model.layers):
        if stream is not None:
            stream.load(i)
        groups = find_groups(model, i, targets)
        if groups:
            yield LayerStep(i, layer, groups)
        if stream is not None:
            stream.done(i)


def record_edit(model: MoEModel, method: str, params) -> None:
    """Write an in-place weight edit into the model's lineage, so cached statistics of the old weights are not reused.

    The runner records every pipeline step by itself (:meth:`MoEModel.record_step`); call
    this only for an edit in the middle of a step that then reads statistics again."""
    model.record_step(method, params)


def inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` for ``[B, n, n]``.

    Damping grows tenfold (up to five times) for any matrix that is not positive definite.
    """
    n = hessian.shape[-1]
    eye = torch.eye(n, device=hessian.device, dtype=hessian.dtype)
    mean = hessian.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[:, None, None]
    factor = torch.full_like(mean, damp)
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(hessian + factor * mean * eye)
        if not bool((info > 0).any()):
            break
        factor = torch.where(info[:, None, None] > 0, factor * 10, factor)
    else:
        raise RuntimeError("Hessian is not positive definite even with heavy damping")
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
