"""What a compression method and a metric are: a parameter dataclass plus one call.

Like torchao's ``quantize_(model, config)``, a method is a config (its ``Params``) and an
in-place transform (``apply``). It reads calibration statistics through the context,
edits the model only through :class:`~moebench.adapter.MoEModel`, and returns what it
changed (recorded under ``changes``). Anything approximated (masked sparsity, fake
quantization) is said with ``ctx.note``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from .params import NoParams

if TYPE_CHECKING:
    from pathlib import Path

    from .adapter import MoEModel
    from .calibration import Calibration
    from .columns import Column
    from .suite import Suite


@dataclass
class Context:
    """What a method or metric may use besides the model: calibration, seed, notes, baseline."""

    seed: int = 0
    calibration: "Calibration | None" = None
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)
    #: metrics of this suite's baseline run in this process (for speedups), if measured
    baseline: dict[str, Any] | None = None
    #: the suite being run (its file path, model, plugin tables such as ``tables["tasks"]``); None outside a suite
    suite: "Suite | None" = None
    #: what the pipeline's steps so far returned, keyed as in the record's ``changes``
    #: (``method``, ``method#2``...): later steps and the run's metrics read it
    changes: dict[str, Any] = field(default_factory=dict)
    #: the uncompressed model, when a caller already holds one (healing distils from it;
    #: otherwise it is reloaded from the suite's model source)
    teacher: "MoEModel | Any" = None
    log: Callable[[str], None] = print
    #: this run's folder for files a metric keeps (``<--out>/runs/<run name>-<run id>``, made
    #: by whoever writes there; e.g. lm-eval's per-sample logs); None outside ``moebench run``
    run_dir: "Path | None" = None

    def note(self, text: str) -> None:
        """Record a caveat about this run (approximations, fallbacks) in its record."""
        if text not in self.notes:
            self.notes.append(text)

    def stats(self, model: "MoEModel", *names: str) -> dict[str, Any]:
        """Calibration statistics for the model as it is now (computed once, then cached)."""
        if self.calibration is None:
            raise RuntimeError("this method needs calibration data; add a [calibration] table to the suite")
        return self.calibration.stats(model, names)

    def sequential(self, model: "MoEModel", method: str, **kwargs):
        """A layer-sequential pass (:class:`moebench.sequential.Sequential`) over the calibration
        windows: the entry for methods that compress one decoder layer at a time on the inputs
        the already-compressed earlier layers produce (WANDA, SparseGPT, GPTQ, AWQ)."""
        from .sequential import Sequential

        if self.calibration is None:
            from .errors import MoebenchError

            raise MoebenchError(f"{method} needs calibration data; add a [calibration] table to the suite")
        windows = kwargs.pop("windows", None)  # a method may pass its own (e.g. more samples than the suite's)
        if windows is None:
            windows = self.calibration.windows(model.tokenizer)
        return Sequential(model, windows, batch_size=self.calibration.spec.batch_size, **kwargs)


@dataclass(frozen=True)
class Needs:
    """What one method step reads from calibration: statistics (gathered in one cached pass,
    read with ``ctx.stats``) and per-layer collections (a layer-sequential pass, ``ctx.sequential``)."""

    stats: tuple[str, ...] = ()
    sequential: bool = False

    def __bool__(self) -> bool:
        return bool(self.stats) or self.sequential


class Method:
    """A compression method. Subclass, set ``name`` and ``Params``, implement ``apply``.

    What it needs from calibration is declared with ``stats`` (or ``needs(params)`` when it
    depends on the parameters) and ``needs_calibration``; the harness reads both through
    :meth:`requires`.
    """

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    #: calibration statistics this method reads, so the runner can gather them in one pass
    stats: ClassVar[tuple[str, ...]] = ()
    #: reads the calibration windows itself (layer-sequential methods: WANDA, SparseGPT, GPTQ, AWQ),
    #: so a suite needs [calibration] even when the method names no statistic
    needs_calibration: ClassVar[bool] = False
    #: one-line summary shown by ``moebench methods`` (defaults to the docstring's first line)
    summary: ClassVar[str] = ""
    #: compresses one decoder layer at a time through the layer loop (``ctx.sequential`` or
    #: ``static_steps``), so it runs on a model streamed from disk (``[model] offload``)
    streams: ClassVar[bool] = False

    def needs(self, params) -> tuple[str, ...]:
        """Statistics needed for these parameters (override when they depend on a criterion)."""
        return self.stats

    @classmethod
    def check_model(cls, params, shape) -> None:
        """Refuse parameters that do not fit the model before any work (``shape``: a
        :class:`moebench.preflight.ModelShape` read from its config); raise
        :class:`moebench.params.ParamError` naming the parameter. Default: no check."""

    def streaming(self, params) -> str | None:
        """Why this step cannot run on a model streamed layer by layer (``[model] offload``), or None when it can.

        Default: ``streams``. Override when it depends on the parameters."""
        if self.streams:
            return None
        return "it is not layer-sequential (it needs the whole model in memory)"

    def requires(self, params) -> Needs:
        """Everything this step reads from calibration, in one place (the suite check and the
        runner's up-front calibration pass read this)."""
        return Needs(tuple(self.needs(params)), self.needs_calibration)

    def apply(self, model: "MoEModel", params, ctx: Context) -> dict[str, Any]:
        raise NotImplementedError


class Metric:
    """A measurement, configured by the suite's ``[eval.<name>]`` table.

    ``columns`` describe the figures ``measure`` writes (header, which direction is better,
    table order, change against the baseline, default tolerance of ``moebench compare``);
    the report, the gate and the leaderboard read them from there.
    """

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    summary: ClassVar[str] = ""
    #: measured on every run even without an [eval.<name>] table (cheap, static figures)
    always: ClassVar[bool] = False
    #: relative to the baseline (e.g. speedups): needs the baseline measured in this process
    #: (``ctx.baseline``), so a resumed suite re-measures the baseline for it
    relative: ClassVar[bool] = False
    #: how reports read each column this metric writes (see :class:`moebench.columns.Column`)
    columns: ClassVar[tuple["Column", ...]] = ()
    #: measures a model streamed layer by layer from disk (``[model] offload``): ``model.stream`` is set
    #: and the decoder layers are on ``meta`` until :func:`moebench.sequential.forward_layers` reads them
    streams: ClassVar[bool] = False

    def measure(self, model: "MoEModel", params, ctx: Context) -> dict[str, Any]:
        """Return entries to merge into the record's ``metrics``."""
        raise NotImplementedError

    @classmethod
    def preflight(cls, params, suite) -> None:
        """Checks that need no model, run by ``validate`` and before a suite starts (e.g. task names);
        raise :class:`moebench.errors.MoebenchError` or :class:`moebench.params.ParamError`. Default: none."""


def summary_of(cls) -> str:
    doc = (cls.__doc__ or "").strip().splitlines()
    return cls.summary or (doc[0] if doc else "")
